"""A simulated device: its flash, its TPM, its serial and a running agent.

The flash is a directory of its own, the TPM a swtpm of its own (or the
software key store when asked), and the firmware the real agent, run
as ``device-agent run`` in a process of its own. Large software-key
fleets may instead host many agents in one process (a *rack*), each in
a thread, which costs one interpreter instead of one per device.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from cryptography import x509

from device_agent import config, credential
from device_agent.agent import Agent, running_pid
from device_agent.config import Settings
from device_agent.credential import FACTORY
from device_agent.errors import AgentError
from firmware_sim.errors import SimError
from firmware_sim.process import stop_process
from tpm_simulator.ports import free_port_pair
from tpm_simulator.swtpm import Swtpm

logger = logging.getLogger(__name__)

CONFIG_FILE = "agent.toml"
STATE_DIR = "state"
TPM_DIR = "tpm"
EK_DIR = "ek"
LOG_FILE = "agent.log"
STOP_TIMEOUT = 15.0
TPM = "tpm"
SOFTWARE = "software"


class DeviceError(SimError):
    """A simulated device cannot be set up, started or stopped."""


class SimDevice:
    """One simulated board, kept in ``directory``.

    ``settings`` are the agent settings beyond identity and broker, such
    as short heartbeats and renewal fractions for a fast fleet.
    """

    def __init__(
        self,
        directory: Path,
        device_id: str,
        serial: str,
        key_store: str = TPM,
    ) -> None:
        if key_store not in (TPM, SOFTWARE):
            raise DeviceError(f"key store {key_store!r} is not tpm/software")
        self.directory = Path(directory).absolute()
        self.device_id = device_id
        self.serial = serial
        self.key_store = key_store
        self.tpm: Swtpm | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.directory / CONFIG_FILE

    @property
    def state_dir(self) -> Path:
        """The device's flash: keys, certificates, status."""
        return self.directory / STATE_DIR

    @property
    def log_path(self) -> Path:
        return self.directory / LOG_FILE

    @property
    def ek_dir(self) -> Path:
        return self.directory / EK_DIR

    @property
    def tcti(self) -> str | None:
        return None if self.tpm is None else self.tpm.tcti

    # -- the TPM ----------------------------------------------------------

    def manufacture_tpm(self, setup_config: Path | None = None) -> None:
        """Give the device a TPM; with ``setup_config``, an EK certificate.

        ``setup_config`` is a swtpm_setup configuration naming a
        certificate tool (see :mod:`firmware_sim.factory`); the EK
        certificates land in :attr:`ek_dir`, as a TPM vendor ships them.
        """
        if self.key_store != TPM:
            return
        state = self.directory / TPM_DIR
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        if setup_config is not None:
            self.ek_dir.mkdir(mode=0o700, exist_ok=True)
            _run_setup(state, setup_config, self.ek_dir)
        self.tpm = Swtpm(state, free_port_pair())

    def start_tpm(self) -> None:
        if self.tpm is None:
            self.manufacture_tpm()
        assert self.tpm is not None
        if not self.tpm.running:
            self.tpm.start()

    def stop_tpm(self) -> None:
        if self.tpm is not None:
            self.tpm.stop()

    def ek_certificates(self) -> list[x509.Certificate]:
        """The EK certificates its TPM came with; none without one."""
        if not self.ek_dir.is_dir():
            return []
        return [
            x509.load_der_x509_certificate(path.read_bytes())
            for path in sorted(self.ek_dir.glob("*.crt"))
        ]

    # -- configuration and the key paths of the firmware --------------------

    def configure(
        self,
        broker_host: str,
        broker_port: int,
        ca_file: Path,
        trust_anchor: Path,
        **settings: Any,
    ) -> None:
        """Write the agent's config file, as ``device-agent init`` does."""
        values: dict[str, Any] = {
            "device_id": self.device_id,
            "serial": self.serial,
            "key_store": self.key_store,
            "state_dir": str(self.state_dir),
            "broker_host": broker_host,
            "broker_port": broker_port,
            # Absolute: the agent runs from its own directory, not ours.
            "ca_file": str(Path(ca_file).absolute()),
            "trust_anchor": str(Path(trust_anchor).absolute()),
            **settings,
        }
        if self.tcti is not None:
            values["tcti"] = self.tcti
        config.build(values)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.state_dir.mkdir(mode=0o700, exist_ok=True)
        self.config_path.write_text(config.to_toml(values))

    def settings(self) -> Settings:
        return config.load(self.config_path, environ={})

    def keygen(self, lineage: str = FACTORY) -> dict[str, Any]:
        """Make a key on the device (in its TPM when it has one)."""
        return credential.keygen(self.settings(), lineage=lineage)

    def has_key(self, lineage: str = FACTORY) -> bool:
        store = credential.open_store(self.settings(), lineage)
        return (store.pending() or store.current()) is not None

    def csr(self, lineage: str = FACTORY) -> bytes:
        """The CSR the device emits: all that leaves it."""
        return credential.make_csr(self.settings(), lineage)

    def install_chain(
        self, pem: bytes, lineage: str = FACTORY
    ) -> x509.Certificate:
        return credential.install_chain(self.settings(), pem, lineage=lineage)

    def leaf(self, lineage: str) -> x509.Certificate | None:
        """The certificate of the current credential of ``lineage``."""
        current = credential.open_store(self.settings(), lineage).current()
        if current is None or not current.chain_path.exists():
            return None
        return x509.load_pem_x509_certificate(current.chain_path.read_bytes())

    # -- the firmware running -------------------------------------------

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        """Boot: run ``device-agent run`` in a process of its own."""
        if self.running:
            raise DeviceError(f"{self.device_id} is already running")
        if self.key_store == TPM:
            self.start_tpm()
        environment = dict(
            os.environ, DEVICE_AGENT_CONFIG=str(self.config_path)
        )
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "device_agent", "run"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=environment,
                start_new_session=True,
            )
        logger.info("%s booted: pid %d", self.device_id, self.process.pid)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Shut the agent down cleanly (SIGTERM), killing it if it hangs."""
        process = self.process
        if process is not None and not stop_process(process, timeout):
            logger.warning("%s ignored SIGTERM", self.device_id)

    def kill(self) -> None:
        """Pull the power: SIGKILL, no chance to clean up."""
        process = self.process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait()

    def status(self) -> dict[str, Any] | None:
        """What the agent last wrote to status.json; None before that."""
        try:
            report = json.loads((self.state_dir / "status.json").read_text())
        except (OSError, ValueError):
            return None
        return report if isinstance(report, dict) else None

    def factory_reset(self) -> int:
        """Destroy the operational identity; keep the factory one.

        Refused while the agent runs, as ``device-agent reset`` does.
        """
        pid = running_pid(self.state_dir)
        if self.running or pid is not None:
            raise DeviceError(f"{self.device_id}: stop the agent first")
        return credential.reset(self.settings())

    def shut_down(self) -> None:
        """Stop the agent and the TPM."""
        self.stop()
        self.stop_tpm()

    def remove(self) -> None:
        self.shut_down()
        shutil.rmtree(self.directory, ignore_errors=True)


class Rack:
    """Several software-key devices' agents hosted in one process.

    Each agent is the real :class:`device_agent.agent.Agent`, in a
    thread, on its own state directory and config; only the
    interpreter is shared. TPM devices need a process each: the tpm2
    OpenSSL provider holds one TPM connection per process.
    """

    def __init__(self, devices: Sequence[SimDevice], log_path: Path) -> None:
        for device in devices:
            if device.key_store != SOFTWARE:
                raise DeviceError(
                    f"{device.device_id}: only software-key devices share "
                    "a process"
                )
        self.devices = list(devices)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "firmware_sim.device"]
                + [str(d.config_path) for d in self.devices],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        if self.process is not None:
            stop_process(self.process, timeout)


class _HostedAgent(Agent):
    """An agent that runs in a thread: the host process owns signals."""

    def _install_signals(self) -> None:
        pass

    def request_stop(self) -> None:
        self._stop = True
        self._wake.set()


def host(config_paths: Sequence[str], environ: Mapping[str, str]) -> None:
    """Run one agent per config file, each in a thread, until SIGTERM."""
    agents = [_HostedAgent(_loader(Path(p))) for p in config_paths]
    done = threading.Event()

    def stop(signum: int, frame: object) -> None:
        done.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    threads = [
        threading.Thread(target=_run_agent, args=(a,), daemon=True)
        for a in agents
    ]
    for thread in threads:
        thread.start()
    done.wait()
    for agent in agents:
        agent.request_stop()
    for thread in threads:
        thread.join(STOP_TIMEOUT)


def _loader(path: Path) -> Callable[[], Settings]:
    return lambda: config.load(path, environ={})


def _run_agent(agent: Agent) -> None:
    try:
        agent.run()
    except Exception:
        logger.exception("agent of %s ended", agent.settings.device_id)


def _run_setup(state: Path, setup_config: Path, ek_dir: Path) -> None:
    result = subprocess.run(
        [
            "swtpm_setup", "--tpm2", "--tpmstate", str(state),
            "--create-ek-cert", "--ecc", "--overwrite",
            "--config", str(setup_config),
            "--write-ek-cert-files", str(ek_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )  # fmt: skip
    if result.returncode != 0:
        tail = " | ".join(result.stderr.strip().splitlines()[-2:])
        raise DeviceError(f"swtpm_setup failed: {tail}")


def probe(config_path: Path, lineage: str) -> str:
    """Connect once with the current credential of ``lineage``.

    Over TLS 1.2, where a refused client certificate comes back as an
    alert naming why (CERTIFICATE_REVOKED, CERTIFICATE_EXPIRED), which
    TLS 1.3 does not show the client. Returns "accepted" or the refusal.
    """
    settings = config.load(config_path, environ={})
    generation = credential.open_store(settings, lineage).current()
    if generation is None:
        return f"no {lineage} credential"
    session = credential.open_session(
        settings, generation, lineage, max_tls_version="1.2"
    )
    session.client_id = f"{settings.device_id}.probe.{os.getpid()}"
    try:
        session.open()
    except AgentError as exc:
        return f"refused: {exc}"
    session.close()
    return "accepted"


def probe_command(device: SimDevice, lineage: str) -> list[str]:
    """The command that runs :func:`probe` for ``device`` in a process."""
    return [
        sys.executable,
        "-m",
        "firmware_sim.device",
        "--probe",
        lineage,
        str(device.config_path),
    ]


if __name__ == "__main__":
    from device_agent.cli.edge import configure_logging

    configure_logging(
        logging.WARNING, "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if sys.argv[1:2] == ["--probe"]:
        print(probe(Path(sys.argv[3]), sys.argv[2]))
    else:
        host(sys.argv[1:], os.environ)
