"""The quick-start demo: one device from no key to a live mTLS session."""

from __future__ import annotations

import contextlib
import json
import queue
import shlex
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from device_agent.session import Session
from device_agent.tls import client_context
from firmware_sim import registrar
from firmware_sim.broker import Broker
from firmware_sim.ca import CertificateAuthority, chain_pem, key_pem
from firmware_sim.errors import SimError
from firmware_sim.process import stop_process
from firmware_sim.registry import MONITOR
from tpm_simulator.ports import free_port, free_port_pair
from tpm_simulator.swtpm import Swtpm

Echo = Callable[[str], None]

HEARTBEATS = "devices/+/heartbeat"
RENEWAL_LIFETIME = 12
RENEWALS = 3
AGENT_STOP_TIMEOUT = 15.0


class Demo:
    """Runs the bring-up of one device and says what happens at each step.

    The device side runs as separate ``device-agent`` processes, exactly
    the commands a person would type during bring-up; the world around it
    (TPM simulator, factory CA, broker) is started here and stopped when
    the demo ends, also when a step fails.
    """

    def __init__(
        self,
        workdir: Path,
        echo: Echo,
        key_store: str = "tpm",
        device_id: str = "demo-device-0001",
        serial: str = "SN-0001-DEMO",
    ) -> None:
        self.workdir = workdir
        self.echo = echo
        self.key_store = key_store
        self.device_id = device_id
        self.serial = serial
        self.config = workdir / "device" / "agent.toml"
        self._step = 0

    def run(self) -> None:
        with contextlib.ExitStack() as stack:
            tcti = self._start_tpm(stack)
            ca = self._make_ca()
            layout = self._make_registrar_ca()
            broker = self._start_broker(stack, ca, layout)
            self._bring_up(tcti, ca, broker)
            self._talk(broker)
            self._start_registrar(stack, layout, broker)
            self._renew_live(stack, broker)
            self._check_tpm_clean(stack)
            self._title("Stopping everything the demo started")
        self.echo(
            "demo finished: the device came up with its factory identity, "
            "enrolled an operational one and renewed it live."
        )

    def _start_tpm(self, stack: contextlib.ExitStack) -> str | None:
        if self.key_store != "tpm":
            self._title("No TPM for this run: the software key store is used")
            return None
        self._title("Starting a TPM 2.0 simulator (swtpm)")
        tpm = Swtpm(self.workdir / "swtpm", free_port_pair())
        tpm.start()
        stack.callback(tpm.stop)
        self.tpm = tpm
        self.echo(f"   TCTI {tpm.tcti}")
        return tpm.tcti

    def _make_ca(self) -> CertificateAuthority:
        self._title("Creating the factory CA (P-256 root -> intermediate)")
        ca = CertificateAuthority.create(self.workdir / "factory-ca")
        self.echo(f"   trust anchor {ca.root_path}")
        return ca

    def _make_registrar_ca(self) -> registrar.Layout:
        self._title("Creating the operational CA the registrar signs with")
        layout = registrar.prepare(self.workdir / "registrar")
        self.echo(f"   trust anchor {layout.root_path}")
        return layout

    def _start_broker(
        self,
        stack: contextlib.ExitStack,
        ca: CertificateAuthority,
        layout: registrar.Layout,
    ) -> Broker:
        self._title("Starting mosquitto with mutual TLS on 127.0.0.1")
        operational = CertificateAuthority.load(layout.ca_dir)
        server_dir = self.workdir / "broker-credentials"
        server_dir.mkdir(mode=0o700)
        chain, key = ca.issue_server_cert()
        (server_dir / "server.pem").write_bytes(chain_pem(chain))
        (server_dir / "server.key").write_bytes(key_pem(key))
        (server_dir / "server.key").chmod(0o600)
        (server_dir / "crl.pem").write_bytes(ca.crl() + operational.crl())
        self.anchors = server_dir / "device-cas.pem"
        self.anchors.write_bytes(
            ca.root_path.read_bytes() + layout.root_path.read_bytes()
        )
        self._make_monitor(operational)

        # mosquitto drops root privileges, so it works in a directory of
        # its own rather than inside the demo's private one.
        broker_dir = Path(tempfile.mkdtemp(prefix="device-agent-broker-"))
        stack.callback(shutil.rmtree, broker_dir, True)
        broker = Broker(
            workdir=broker_dir,
            port=free_port(),
            ca_file=self.anchors,
            server_cert_file=server_dir / "server.pem",
            server_key_file=server_dir / "server.key",
            crl_file=server_dir / "crl.pem",
            service_users={
                registrar.NAME: list(registrar.ACL_TOPICS),
                MONITOR: [HEARTBEATS],
            },
        )
        broker.start()
        stack.callback(broker.stop)
        self.echo(
            f"   port {broker.port}: client certificate required, "
            "CN = user name, ACL devices/<CN>/#"
        )
        return broker

    def _bring_up(
        self, tcti: str | None, ca: CertificateAuthority, broker: Broker
    ) -> None:
        device_dir = self.workdir / "device"
        self._title("Writing the device's config")
        init = [
            "init",
            "--device-id", self.device_id,
            "--serial", self.serial,
            "--key-store", self.key_store,
            "--state-dir", str(device_dir / "state"),
            "--broker", f"127.0.0.1:{broker.port}",
            "--ca-file", str(ca.root_path),
            "--trust-anchor", str(self.anchors),
        ]  # fmt: skip
        if tcti is not None:
            init += ["--tcti", tcti]
        self._agent(*init)

        where = "inside the TPM" if tcti else "in software"
        self._title(f"Making the device key {where}")
        self._agent("keygen")

        csr_path = device_dir / "device.csr"
        self._title("Emitting a CSR signed by that key")
        self._agent("csr", "--out", str(csr_path))

        chain_path = device_dir / "chain.pem"
        self._title("The factory CA signs the CSR (only the CSR left)")
        self._run(
            "firmware-sim",
            [sys.executable, "-m", "firmware_sim"],
            "ca", "sign", str(csr_path),
            "--dir", str(ca.directory),
            "--out", str(chain_path),
        )  # fmt: skip

        self._title("Checking and installing the chain that came back")
        self._agent("install-chain", str(chain_path))
        self._agent("status")

    def _talk(self, broker: Broker) -> None:
        topic = f"devices/{self.device_id}/hello"
        self._title("Opening a mutual-TLS MQTT session: publish and receive")
        self._agent(
            "connect",
            "--subscribe", topic,
            "--publish", topic, "hello from the device key",
            "--count", "1",
            "--timeout", "10",
        )  # fmt: skip
        connects = broker.log_text().count(f"u'{self.device_id}'")
        self.echo(f"   the broker logged {connects} connection(s) as this CN")

    def _make_monitor(self, operational: CertificateAuthority) -> None:
        """A back-end client that may read every device's heartbeat."""
        chain, key = operational.issue_client_cert(
            MONITOR, days=1, service=True
        )
        directory = self.workdir / "monitor"
        directory.mkdir(mode=0o700)
        self.monitor_chain = directory / "chain.pem"
        self.monitor_key = directory / "key.pem"
        self.monitor_chain.write_bytes(chain_pem(chain))
        self.monitor_key.write_bytes(key_pem(key))
        self.monitor_key.chmod(0o600)

    def _start_registrar(
        self,
        stack: contextlib.ExitStack,
        layout: registrar.Layout,
        broker: Broker,
    ) -> None:
        self._title(
            f"Starting the registrar: {RENEWAL_LIFETIME}-second "
            "operational certificates, over MQTT"
        )
        service = registrar.Registrar.from_directory(
            layout.directory,
            "127.0.0.1",
            broker.port,
            self.workdir / "factory-ca" / "root.pem",
            lifetime=RENEWAL_LIFETIME,
        )
        service.registry.add(self.device_id, self.serial)
        service.start()
        stack.callback(service.close)
        self.registrar = service
        self.echo(f"   {self.device_id} registered as a known device")

    def _renew_live(self, stack: contextlib.ExitStack, broker: Broker) -> None:
        self._title(
            "Running the agent: it enrolls an operational identity, then "
            "renews it with a new key each time, switching its live session"
        )
        with self.config.open("a") as stream:
            stream.write(
                "heartbeat_interval = 1\nrenew_fraction = 0.5\n"
                "renew_jitter = 0\nrenew_floor = 0\n"
                "retry_base = 1\nretry_cap = 4\n"
            )
        monitor = self._monitor(broker)
        stack.callback(monitor.close)
        self.echo("   $ device-agent run   (heartbeat every 1 s)")
        agent = subprocess.Popen(
            [sys.executable, "-m", "device_agent", "--config",
             str(self.config), "run"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        stack.callback(stop_process, agent, AGENT_STOP_TIMEOUT)

        serials = self._watch(monitor, RENEWALS + 1)
        stop_process(agent, AGENT_STOP_TIMEOUT)
        self.echo(
            f"   {len(serials) - 1} renewals, each certificate seen in a "
            f"heartbeat over its own session; longest gap between "
            f"heartbeats {self.longest_gap:.2f} s"
        )
        log = broker.log_text()
        sessions = log.count(f"u'{self.device_id}'")
        self.echo(f"   the broker logged {sessions} sessions as this CN")

    def _monitor(self, broker: Broker) -> Session:
        def context() -> ssl.SSLContext:
            return client_context(
                self.workdir / "factory-ca" / "root.pem",
                self.monitor_chain,
                self.monitor_key,
            )

        monitor = Session("127.0.0.1", broker.port, MONITOR, context)
        monitor.open()
        monitor.subscribe(HEARTBEATS)
        return monitor

    def _watch(self, monitor: Session, wanted: int) -> list[str]:
        """Print heartbeats until ``wanted`` operational certificates."""
        serials: list[str] = []
        last: float | None = None
        self.longest_gap = 0.0
        deadline = time.monotonic() + 30 + wanted * RENEWAL_LIFETIME
        while len(serials) < wanted:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SimError("the agent did not renew in time")
            try:
                message = monitor.messages.get(timeout=left)
            except queue.Empty:
                continue
            now = time.monotonic()
            if last is not None:
                self.longest_gap = max(self.longest_gap, now - last)
            last = now
            beat = json.loads(message.payload)
            if beat["identity"] != "ldevid":
                continue
            if beat["serial"] not in serials:
                serials.append(beat["serial"])
                verb = "enrolled" if len(serials) == 1 else "renewed"
                self.echo(
                    f"   {verb}: generation {beat['generation']}, "
                    f"certificate {beat['serial'][:16]}..."
                )
        return serials

    def _check_tpm_clean(self, stack: contextlib.ExitStack) -> None:
        tpm = getattr(self, "tpm", None)
        if tpm is None:
            return
        self._title("Checking that no key was left loaded in the TPM")
        left = len(tpm.transient_handles())
        self.echo(f"   transient handles in the TPM: {left}")
        if left:
            raise SimError(f"{left} TPM handles were left loaded")

    def _title(self, text: str) -> None:
        self._step += 1
        self.echo(f"\n[{self._step}] {text}")

    def _agent(self, *args: str) -> None:
        self._run(
            "device-agent",
            [sys.executable, "-m", "device_agent", "--config",
             str(self.config)],
            *args,
        )  # fmt: skip

    def _run(self, shown: str, command: list[str], *args: str) -> None:
        self.echo(f"   $ {shown} {shlex.join(args)}")
        started = time.monotonic()
        result = subprocess.run(
            [*command, *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        took = (time.monotonic() - started) * 1000
        for line in (result.stdout + result.stderr).splitlines():
            self.echo(f"     {line}")
        if result.returncode != 0:
            raise SimError(
                f"'{shown} {args[0]}' failed with exit {result.returncode}"
            )
        self.echo(f"     ({took:.0f} ms)")


@contextlib.contextmanager
def workspace(keep: Path | None) -> Iterator[Path]:
    """A private directory for the demo, removed after unless kept."""
    if keep is not None:
        keep.mkdir(mode=0o700, parents=True, exist_ok=False)
        yield keep
        return
    path = Path(tempfile.mkdtemp(prefix="device-agent-demo-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
