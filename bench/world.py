"""A private world for one benchmark run: swtpm, mosquitto, CAs, devices.

Everything lives under a fresh temporary directory and on loopback ports
picked free; leaving the ``world`` context stops every server it started
and removes the files, also after an error or Ctrl-C.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography import x509

from firmware_sim.broker import Broker
from firmware_sim.ca import CertificateAuthority, chain_pem, key_pem
from tpm_simulator.errors import PortInUseError
from tpm_simulator.ports import free_port, free_port_pair
from tpm_simulator.swtpm import Swtpm

TOP = Path(__file__).resolve().parent.parent
PORT_ATTEMPTS = 3
CLI_TIMEOUT = 60.0

# Registrars answer quickly in a benchmark; the lifetime only has to
# outlast one run.
REGISTRAR_LIFETIME = 3600


class _Server(Protocol):
    def start(self, timeout: float = ...) -> None: ...

    def stop(self, timeout: float = ...) -> object: ...


S = TypeVar("S", bound=_Server)


def start_on_free_port(
    stack: contextlib.ExitStack, make: Callable[[], S]
) -> S:
    """Start a server built by ``make``, on new ports if they were taken.

    Its stop goes on ``stack`` before it starts: a stop signal while it
    starts up must not leave it running.
    """
    for attempt in range(1, PORT_ATTEMPTS + 1):
        server = make()
        stack.callback(server.stop)
        try:
            server.start()
        except PortInUseError:
            if attempt == PORT_ATTEMPTS:
                raise
            continue
        return server
    raise AssertionError("unreachable")


class Device:
    """A device set up and driven by ``device-agent`` processes."""

    def __init__(self, directory: Path, device_id: str, tcti: str | None):
        self.dir = directory
        self.id = device_id
        self.tcti = tcti
        self.config = directory / "agent.toml"
        self.state = directory / "state"

    def command(self, *args: str) -> list[str]:
        return [
            sys.executable, "-m", "device_agent",
            "--config", str(self.config), *args,
        ]  # fmt: skip

    def run(self, *args: str) -> str:
        result = subprocess.run(
            self.command(*args),
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"device-agent {' '.join(args)} failed: {result.stderr}"
            )
        return result.stdout

    def init(self, port: int, ca_file: Path, *extra: str) -> None:
        args = [
            "init", "--device-id", self.id, "--serial", "BENCH1",
            "--key-store", "tpm" if self.tcti else "software",
            "--state-dir", str(self.state),
            "--broker", f"127.0.0.1:{port}", "--ca-file", str(ca_file),
            *extra,
        ]  # fmt: skip
        if self.tcti:
            args += ["--tcti", self.tcti]
        self.run(*args)

    def enroll(self, ca: CertificateAuthority) -> None:
        """A factory identity: a key, a CSR, a chain from ``ca``."""
        self.run("keygen")
        request = x509.load_pem_x509_csr(self.run("csr").encode())
        path = self.dir / "factory-chain.pem"
        path.write_bytes(chain_pem(ca.sign_csr(request)))
        self.run("install-chain", str(path))

    def configure(self, **settings: object) -> None:
        """Append settings to the config file ``init`` wrote."""
        with self.config.open("a") as stream:
            for name, value in settings.items():
                shown = f'"{value}"' if isinstance(value, str) else value
                stream.write(f"{name} = {shown}\n")

    def current(self, lineage: str = "idevid") -> tuple[Path, Path]:
        """The chain and key files of the lineage's current generation."""
        current = self.state / lineage / "current"
        chain = current / "chain.pem"
        key = next(p for p in current.iterdir() if p.name.startswith("key"))
        return chain, key


@dataclasses.dataclass
class World:
    """What a benchmark runs against; see :func:`world`."""

    root: Path
    swtpm: Swtpm
    factory_ca: CertificateAuthority
    broker: Broker
    client_ca_file: Path
    registrar: Any = None
    registry: Any = None

    @property
    def port(self) -> int:
        return self.broker.port

    def device(
        self, device_id: str, tpm: bool, trust_anchor: Path | None = None
    ) -> Device:
        """A device with a factory identity, its key in swtpm or software."""
        made = Device(
            self.root / device_id, device_id, self.swtpm.tcti if tpm else None
        )
        extra = ["--trust-anchor", str(trust_anchor)] if trust_anchor else []
        made.init(self.port, self.factory_ca.root_path, *extra)
        made.enroll(self.factory_ca)
        return made


@contextlib.contextmanager
def world(registered: Sequence[str] = ()) -> Iterator[World]:
    """Start swtpm (logging every command) and a mutual-TLS mosquitto.

    With ``registered`` device ids, a registrar with its own operational
    CA serves renewals for those devices as well; the broker then trusts
    both roots and checks CRLs, as in the field.
    """
    with contextlib.ExitStack() as stack:
        root = _temporary(stack, "bench-")
        # As root, mosquitto works as its own user, which cannot enter
        # the 0700 directory above, so the broker gets one of its own.
        broker_dir = _temporary(stack, "bench-broker-")

        swtpm = start_on_free_port(
            stack, lambda: Swtpm(root / "swtpm", free_port_pair())
        )
        factory_ca = CertificateAuthority.create(root / "factory-ca")
        options = _server_files(factory_ca, root / "server")
        client_ca_file = factory_ca.root_path
        layout = None

        if registered:
            from firmware_sim import registrar

            layout = registrar.prepare(root / "registrar")
            operational = CertificateAuthority.load(layout.ca_dir)
            client_ca_file = root / "client-cas.pem"
            client_ca_file.write_bytes(
                factory_ca.root_path.read_bytes()
                + layout.root_path.read_bytes()
            )
            crl_path = root / "crls.pem"
            crl_path.write_bytes(factory_ca.crl() + operational.crl())
            options.update(
                crl_file=crl_path,
                service_users={registrar.NAME: list(registrar.ACL_TOPICS)},
            )

        broker = start_on_free_port(
            stack,
            lambda: Broker(
                workdir=broker_dir,
                port=free_port(),
                ca_file=client_ca_file,
                **options,
            ),
        )
        made = World(root, swtpm, factory_ca, broker, client_ca_file)

        if registered:
            assert layout is not None
            made.registry, made.registrar = _start_registrar(
                stack, layout, operational, broker, client_ca_file
            )
            for device_id in registered:
                made.registry.add(device_id)
        yield made


def _temporary(stack: contextlib.ExitStack, prefix: str) -> Path:
    """A new temporary directory, removed when ``stack`` closes."""
    # The removal is on the stack before anything is written in it, so
    # that keys never outlive the run, however it ends.
    path = Path(tempfile.mkdtemp(prefix=prefix))
    stack.callback(shutil.rmtree, path, ignore_errors=True)
    return path


def _start_registrar(
    stack: contextlib.ExitStack,
    layout: Any,
    ca: CertificateAuthority,
    broker: Broker,
    ca_file: Path,
) -> tuple[Any, Any]:
    from firmware_sim.registrar import Registrar
    from firmware_sim.registry import Registry

    registry = Registry(layout.registry_path)
    stack.callback(registry.close)
    registrar = Registrar(
        ca,
        registry,
        broker.host,
        broker.port,
        ca_file,
        layout.chain_path,
        layout.key_path,
        lifetime=REGISTRAR_LIFETIME,
    )
    stack.callback(registrar.stop)
    registrar.start()
    return registry, registrar


def _server_files(ca: CertificateAuthority, directory: Path) -> dict[str, Any]:
    chain, key = ca.issue_server_cert()
    directory.mkdir(mode=0o700)
    cert_path = directory / "server.pem"
    key_path = directory / "server.key"
    cert_path.write_bytes(chain_pem(chain))
    key_path.write_bytes(key_pem(key))
    os.chmod(key_path, 0o600)
    return {"server_cert_file": cert_path, "server_key_file": key_path}
