"""Fleet benchmark: a thousand software-key devices made and brought online.

Run from the repository top::

    .venv/bin/python -m bench.fleet [--devices N] [--runs N]

Manufacturing, one device after another, through the agent's own code:
settings, a private state directory, ``credential.keygen`` (a software
P-256 key, 0600), ``credential.make_csr``, the factory CA signs, and
``credential.install_chain`` checks the chain to the trust anchor and
makes it current. Then every device opens its MQTT session (mutual TLS
1.3, CONNACK) to one mosquitto, and all of them stay connected until the
last one is; then the memory of mosquitto and of the processes holding
the sessions. Those are a few workers of a few hundred sessions each,
started together: paho waits on its sockets with select(), which takes
no descriptor above 1023, so no one process can hold a thousand.

Baselines, in the same run, ``--runs`` of each spread over the fleet:
cryptography alone making a key, a CSR and its certificate, with no
files and no checks; and a plain ``ssl`` socket sending an MQTT CONNECT
with a device's key and chain, read from its state directory, with no
paho and no Session, while the fleet is connected.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bench import report
from bench.native import CONNACK, DISCONNECT, mqtt5_connect
from bench.stopping import stoppable
from bench.world import World, world
from device_agent import config, credential
from device_agent.config import Settings
from device_agent.store import CredentialStore
from firmware_sim.ca import CertificateAuthority, chain_pem
from firmware_sim.process import reap_process

DEFAULT_DEVICES = 1000
SESSIONS_PER_WORKER = 250
WORKER_TIMEOUT = 60.0
# Each session holds a TLS socket and paho's wake-up socket pair in its
# worker, and a socket in mosquitto, which inherits this process's limit.
FDS_PER_DEVICE = 4
FD_SPARE = 256


def _more(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--devices",
        type=int,
        default=DEFAULT_DEVICES,
        help=f"devices to make and connect (default {DEFAULT_DEVICES})",
    )


def raise_fd_limit(devices: int) -> int:
    """Raise this process's open-file limit for ``devices`` sessions."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = devices * FDS_PER_DEVICE + FD_SPARE
    if hard != resource.RLIM_INFINITY and wanted > hard:
        raise SystemExit(
            f"{devices} devices need {wanted} open files; the hard "
            f"limit is {hard}"
        )
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    return wanted


def settings_for(
    root: Path, port: int, ca_file: Path, number: int
) -> Settings:
    """What ``device-agent init`` would write for a software-key device."""
    device_id = f"fleet-{number:05d}"
    return config.build(
        {
            "device_id": device_id,
            "serial": device_id.upper(),
            "key_store": "software",
            "state_dir": str(root / "fleet" / device_id),
            "broker_host": "127.0.0.1",
            "broker_port": port,
            "ca_file": str(ca_file),
            "tls_min_version": "1.3",
        }
    )


def manufacture(ca: CertificateAuthority, settings: Settings) -> None:
    """Key, CSR, certificate and chain, the way a factory line does it."""
    CredentialStore(settings.state_dir).prepare()
    credential.keygen(settings)
    request = x509.load_pem_x509_csr(credential.make_csr(settings))
    credential.install_chain(settings, chain_pem(ca.sign_csr(request)))


def manufacture_raw(
    ca_key: ec.EllipticCurvePrivateKey, issuer: x509.Name
) -> None:
    """The floor: cryptography alone, a key, a CSR, a certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "raw")])
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .sign(key, hashes.SHA256())
    )
    now = datetime.datetime.now(datetime.UTC)
    (
        x509.CertificateBuilder()
        .subject_name(request.subject)
        .issuer_name(issuer)
        .public_key(request.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=365))
        .sign(ca_key, hashes.SHA256())
    )


def connect_raw(settings: Settings) -> float:
    """A TLS socket and an MQTT CONNECT with a device's own files."""
    generation = CredentialStore(settings.state_dir).current()
    assert generation is not None and settings.ca_file is not None
    key = generation.key_path()
    assert key is not None
    began = time.perf_counter()
    context = ssl.create_default_context(cafile=str(settings.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(generation.chain_path, key)
    raw = socket.create_connection(
        (settings.broker_host, settings.broker_port), 10
    )
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    with context.wrap_socket(raw, server_hostname="127.0.0.1") as link:
        link.sendall(mqtt5_connect(f"{settings.device_id}.raw"))
        reply = link.recv(4)
        took = time.perf_counter() - began
        if len(reply) < 4 or reply[0] != CONNACK or reply[3] != 0:
            raise RuntimeError(f"raw connect refused: {reply.hex()}")
        link.sendall(DISCONNECT)
    return took


@contextlib.contextmanager
def _timed_fsync() -> Iterator[list[float]]:
    """Add up the time spent in os.fsync, which keeps the store durable."""
    spent = [0.0]
    real = os.fsync

    def fsync(fd: Any) -> None:
        began = time.perf_counter()
        try:
            real(fd)
        finally:
            spent[0] += time.perf_counter() - began

    os.fsync = fsync
    try:
        yield spent
    finally:
        os.fsync = real


class Fleet:
    """The devices of one run, their sessions, and what was measured."""

    def __init__(self, here: World, devices: int, runs: int) -> None:
        self.here = here
        self.count = devices
        self.sample = set(range(0, devices, max(devices // runs, 1)))
        self.settings: list[Settings] = []
        self.workers: list[Worker] = []
        self.seconds: dict[str, float] = {}
        self.raw: dict[str, list[float]] = {"make": [], "connect": []}
        self.memory: dict[str, tuple[float, float]] = {}

    def make(self) -> None:
        with _timed_fsync() as synced:
            self._make()
        self.seconds["fsync"] = synced[0]

    def _make(self) -> None:
        ca = self.here.factory_ca
        key = serialization.load_pem_private_key(
            (ca.directory / "intermediate.key").read_bytes(), None
        )
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        spent = 0.0
        for number in range(self.count):
            settings = settings_for(
                self.here.root, self.here.port, ca.root_path, number
            )
            began = time.perf_counter()
            manufacture(ca, settings)
            spent += time.perf_counter() - began
            self.settings.append(settings)
            if number in self.sample:
                began = time.perf_counter()
                manufacture_raw(key, ca.intermediate.subject)
                self.raw["make"].append(time.perf_counter() - began)
        self.seconds["make"] = spent

    def connect(self) -> None:
        """Workers open every session; then the baseline, fleet still up."""
        workers = [
            Worker(
                self.here, first, min(SESSIONS_PER_WORKER, self.count - first)
            )
            for first in range(0, self.count, SESSIONS_PER_WORKER)
        ]
        self.workers = workers
        for worker in workers:
            worker.wait_for("ready")
        ready = [report.memory(worker.process.pid)[0] for worker in workers]
        self.memory["workers_ready"] = (sum(ready), 0.0)
        began = time.perf_counter()
        for worker in workers:
            worker.tell("go")
        for worker in workers:
            worker.wait_for("connected")
        self.seconds["connect"] = time.perf_counter() - began

        for number in sorted(self.sample):
            self.raw["connect"].append(connect_raw(self.settings[number]))

        broker_pid = self.here.broker.pid
        assert broker_pid is not None
        self.memory["bench"] = report.memory("self")
        self.memory["mosquitto"] = report.memory(broker_pid)
        memory = [report.memory(worker.process.pid) for worker in workers]
        self.memory["workers"] = (
            sum(rss for rss, _ in memory),
            sum(peak for _, peak in memory),
        )

    def abandon(self) -> None:
        """End every worker, whatever it was doing: the run is stopping."""
        for worker in self.workers:
            with contextlib.suppress(OSError):
                worker.tell("close")
        for worker in self.workers:
            worker.drain()
            worker.end()

    def close(self) -> None:
        began = time.perf_counter()
        for worker in self.workers:
            worker.tell("close")
        for worker in self.workers:
            worker.wait_for("closed")
            worker.end()
        self.seconds["close"] = time.perf_counter() - began


class Worker:
    """A process holding the sessions of a slice of the fleet."""

    def __init__(self, here: World, first: int, count: int) -> None:
        spec = {
            "root": str(here.root),
            "port": here.port,
            "ca_file": str(here.factory_ca.root_path),
            "first": first,
            "count": count,
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.fleet",
                "--worker",
                json.dumps(spec),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            # A terminal's Ctrl-C reaches the benchmark alone, which
            # then closes its workers' sessions in order, rather than
            # every worker ending on its own with a line of its own.
            start_new_session=True,
        )

    def tell(self, word: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(word + "\n")
        self.process.stdin.flush()

    def wait_for(self, word: str) -> None:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if line.strip() != word:
            self.end()
            raise RuntimeError(
                f"fleet worker said {line.strip()!r}, not {word!r} "
                f"(exit {self.process.returncode})"
            )

    def drain(self) -> None:
        """Read what the worker says until it closed or ended."""
        assert self.process.stdout is not None
        with contextlib.suppress(OSError):
            for line in self.process.stdout:
                if line.strip() == "closed":
                    return

    def end(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        reap_process(self.process, timeout=WORKER_TIMEOUT)


def serve(spec: dict[str, Any]) -> int:
    """The worker's side: connect when told, hold, close when told."""
    raise_fd_limit(spec["count"])
    settings = [
        settings_for(
            Path(spec["root"]), spec["port"], Path(spec["ca_file"]), number
        )
        for number in range(spec["first"], spec["first"] + spec["count"])
    ]
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    sessions = []
    try:
        for one in settings:
            session = credential.open_session(one, max_tls_version="1.3")
            session.open()
            sessions.append(session)
        print("connected", flush=True)
        sys.stdin.readline()
    finally:
        for session in sessions:
            session.close()
    print("closed", flush=True)
    return 0


def _add_rate(
    table: report.Table, fleet: Fleet, step: str, label: str, baseline: str
) -> None:
    """A step's rate and time per device, against its median baseline."""
    seconds, raw = fleet.seconds[step], report.median(fleet.raw[step])
    each = seconds / fleet.count
    table.add(
        label,
        f"{fleet.count / seconds:.0f}/s",
        report.ms(each),
        f"{baseline} {report.ms(raw)}; ratio {report.ratio(each, raw)}",
    )


def build_table(
    fleet: Fleet, start: tuple[float, float], start_broker: tuple[float, float]
) -> report.Table:
    count = fleet.count
    table = report.Table(
        f"fleet: {count} software-key devices, one mosquitto on 127.0.0.1, "
        f"TLS 1.3; baselines on {len(fleet.raw['make'])} of them",
        ["measure", "rate", "each", "baseline and ratio"],
    )
    _add_rate(
        table,
        fleet,
        "make",
        "manufactured: keygen, CSR, CA signs, install-chain",
        "cryptography alone (key, CSR, cert)",
    )
    table.add(
        "    of which fsync (files and directories made durable)",
        "",
        report.ms(fleet.seconds["fsync"] / count),
        f"{100 * fleet.seconds['fsync'] / fleet.seconds['make']:.0f} % of it",
    )
    _add_rate(
        table,
        fleet,
        "connect",
        "connected: Session.open to CONNACK, all held open",
        "ssl socket + CONNECT, fleet up,",
    )
    table.add(
        "closed: DISCONNECT, threads joined",
        f"{count / fleet.seconds['close']:.0f}/s",
        report.ms(fleet.seconds["close"] / count),
    )
    table.rule()
    workers = fleet.workers
    for name, before, label in (
        (
            "workers",
            fleet.memory["workers_ready"],
            f"the {len(workers)} session processes, together",
        ),
        ("mosquitto", start_broker, "mosquitto"),
        ("bench", start, "this process (made the fleet)"),
    ):
        rss, peak = fleet.memory[name]
        per_device = (rss - before[0]) * 1024 / count
        note = f"RSS {rss:.1f} MB all connected, {before[0]:.1f} MB before"
        table.add(
            f"memory, {label}",
            f"peak {peak:.1f} MB",
            f"{per_device:.0f} kB a device",
            note,
        )
    return table


@stoppable
def main() -> int:
    options = report.arguments("bench.fleet", __doc__ or "", _more)
    report.quiet_logging()
    if options.worker:
        return serve(json.loads(options.worker))
    if options.devices < 1:
        raise SystemExit("--devices must be at least 1")
    raise_fd_limit(options.devices)

    with world() as here:
        broker_pid = here.broker.pid
        assert broker_pid is not None
        start = report.memory("self")
        start_broker = report.memory(broker_pid)
        fleet = Fleet(here, options.devices, options.runs)
        try:
            fleet.make()
            fleet.connect()
        except BaseException:
            fleet.abandon()
            raise
        fleet.close()
    build_table(fleet, start, start_broker).print()
    count = fleet.count
    report.summarize(
        f"fleet: {count} software-key devices manufactured",
        f"{count / fleet.seconds['make']:.0f}/s",
        "cryptography alone (key, CSR, cert) "
        + report.ms(report.median(fleet.raw["make"])),
        f"fsync {100 * fleet.seconds['fsync'] / fleet.seconds['make']:.0f} "
        "% of the time",
    )
    workers, broker = fleet.memory["workers"], fleet.memory["mosquitto"]
    report.summarize(
        f"fleet: {count} devices connected to one mosquitto, all held",
        f"{count / fleet.seconds['connect']:.0f}/s",
        "ssl socket + CONNECT "
        + report.ms(report.median(fleet.raw["connect"])),
        f"peak memory: sessions {workers[1]:.0f} MB, mosquitto "
        f"{broker[1]:.0f} MB",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
