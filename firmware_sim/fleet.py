"""The fleet runner: many simulated devices through a scenario of their life.

A scenario is planned from its seed alone (device ids, serials, who is
revoked, decommissioned, reset or cloned, and what state each must end
in), then run against a real world: factory line, operational CA and
registrar, mosquitto with a CRL, and one agent process per device (or
racks of agents for large software-key fleets). What must be the same
for the same seed (the plan and whether each device reached its state)
is kept apart from what the clock decides (times, serials, gaps).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import itertools
import json
import logging
import math
import os
import queue
import random
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from device_agent.credential import FACTORY, OPERATIONAL
from device_agent.session import Session
from device_agent.tls import client_context
from firmware_sim import lock
from firmware_sim import registrar as registrar_module
from firmware_sim.broker import Broker
from firmware_sim.ca import CertificateAuthority, chain_pem, key_pem
from firmware_sim.device import (
    SOFTWARE,
    TPM,
    DeviceError,
    Rack,
    SimDevice,
    probe_command,
)
from firmware_sim.errors import SimError
from firmware_sim.factory import CloneError, FactoryLine, ek_ca_config
from firmware_sim.registrar import Registrar
from firmware_sim.registry import DECOMMISSIONED, MONITOR, REVOKED, Registry
from firmware_sim.revocation import CrlPublisher, revoke_device
from tpm_simulator.ports import free_port

logger = logging.getLogger(__name__)

SCENARIOS = ("lifecycle", "storm", "outage", "clone")
# The fewest devices each scenario runs with; the README and the fleet
# command's help list the same numbers.
MINIMUM_DEVICES = {"lifecycle": 5, "storm": 2, "outage": 2, "clone": 2}
HEARTBEATS = "devices/+/heartbeat"
# In --out: locked by the run that uses the directory; see OutDir.
LOCK_FILE = ".fleet.lock"

KEEP = "keep"
REVOKE = "revoke"
DECOMMISSION = "decommission"
RESET = "reset"
CLONE = "clone"

# The state each role must end in, as the agent reports it.
EXPECTED = {
    KEEP: "connected with an operational certificate",
    RESET: "re-enrolled after a factory reset",
    REVOKE: "needs service, on its IDevID",
    DECOMMISSION: "needs service, refused with every credential",
    CLONE: "refused at the factory",
}

RACK_SIZE = 50
SETUP_WORKERS = 4
CRL_LIFETIME = datetime.timedelta(minutes=10)
# The storm's "minute": the renewal window the policy defines (from
# the renewal fraction to fraction + jitter of the lifetime) is cut
# into at most ten buckets, fewer for small fleets so that each bucket
# expects at least STORM_PER_BUCKET requests: a peak-over-mean ratio of
# buckets expecting less than one request measures only noise.
STORM_MAX_BUCKETS = 10
STORM_PER_BUCKET = 4
# The busiest bucket may hold at most this many times the mean.
STORM_PEAK_LIMIT = 2
# No bucket holds more than all requests, which is the mean times the
# bucket count: with STORM_PEAK_LIMIT buckets or fewer the check passes
# however the renewals fell (1.00 with one bucket), so it is judged only
# for fleets large enough for one bucket more.
STORM_JUDGED_FROM = (STORM_PEAK_LIMIT + 1) * STORM_PER_BUCKET
STORM_CHECK = "storm: busiest bucket at most twice the mean"


class FleetError(SimError):
    """A fleet could not be set up or a scenario could not run."""


@dataclasses.dataclass(frozen=True)
class PlannedDevice:
    device_id: str
    serial: str
    key_store: str
    role: str

    @property
    def expected(self) -> str:
        return EXPECTED[self.role]


@dataclasses.dataclass(frozen=True)
class Plan:
    """Everything a seed decides: it is the same for the same seed."""

    scenario: str
    seed: int
    lifetime: int
    heartbeat: float
    renewals: int
    devices: tuple[PlannedDevice, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario,
            "seed": self.seed,
            "lifetime_s": self.lifetime,
            "heartbeat_s": self.heartbeat,
            "renewals": self.renewals,
            "devices": [dataclasses.asdict(d) for d in self.devices],
        }


def plan(
    scenario: str,
    count: int,
    seed: int,
    software_keys: bool = False,
    lifetime: int | None = None,
) -> Plan:
    """The scenario's plan, from the seed alone."""
    if scenario not in SCENARIOS:
        raise FleetError(
            f"scenario {scenario!r} is not one of {', '.join(SCENARIOS)}"
        )
    minimum = MINIMUM_DEVICES[scenario]
    if count < minimum:
        raise FleetError(f"{scenario} needs at least {minimum} devices")
    # A seeded generator on purpose: the same seed replays the plan.
    rng = random.Random(seed)  # noqa: S311
    key_store = SOFTWARE if software_keys else TPM
    batch = rng.randrange(1000, 10000)
    ids = [f"sim-{batch}-{n:04d}" for n in range(1, count + 1)]
    serials = [f"SN{rng.randrange(16**8):08X}" for _ in ids]
    roles = [KEEP] * count
    order = list(range(count))
    rng.shuffle(order)
    if scenario == "lifecycle":
        share = max(1, count // 10)
        for index, role in enumerate((REVOKE, DECOMMISSION, RESET)):
            for n in order[index * share : (index + 1) * share]:
                roles[n] = role
    devices = [
        PlannedDevice(i, s, key_store, r)
        for i, s, r in zip(ids, serials, roles, strict=True)
    ]
    if scenario == "clone":
        original = devices[order[0]]
        devices.append(
            PlannedDevice(
                f"sim-{batch}-clone",
                f"SN{rng.randrange(16**8):08X}",
                SOFTWARE,
                CLONE,
            )
        )
        devices[order[0]] = dataclasses.replace(original, key_store=SOFTWARE)
    defaults = {"lifecycle": 20, "storm": 40, "outage": 30, "clone": 30}
    return Plan(
        scenario=scenario,
        seed=seed,
        lifetime=lifetime or defaults[scenario],
        heartbeat=1.0 if count <= 20 else 2.0,
        renewals=2 if scenario == "lifecycle" else 1,
        devices=tuple(devices),
    )


@dataclasses.dataclass
class Beat:
    at: float
    device_id: str
    identity: str
    serial: str | None


@dataclasses.dataclass
class Outcome:
    """What a run observed; the report is made from it."""

    plan: Plan
    started: float = 0.0
    finished: float = 0.0
    reached: dict[str, bool] = dataclasses.field(default_factory=dict)
    final: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # None for a check this run cannot decide; ``unjudged`` says why.
    checks: dict[str, bool | None] = dataclasses.field(default_factory=dict)
    unjudged: dict[str, str] = dataclasses.field(default_factory=dict)
    details: dict[str, str] = dataclasses.field(default_factory=dict)
    beats: list[Beat] = dataclasses.field(default_factory=list)
    events: list[tuple[float, str, str]] = dataclasses.field(
        default_factory=list
    )
    factory: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    factory_refusals: list[dict[str, str]] = dataclasses.field(
        default_factory=list
    )
    issuances: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    revocations: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    probes: dict[str, str] = dataclasses.field(default_factory=dict)
    storm: dict[str, Any] = dataclasses.field(default_factory=dict)
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    memory_mb: float = 0.0

    def check(self, name: str, passed: bool, detail: str = "") -> None:
        self.checks[name] = bool(passed)
        if detail:
            self.details[name] = detail

    def not_judged(self, name: str, reason: str, detail: str = "") -> None:
        """A check this run cannot decide either way, and why not."""
        self.checks[name] = None
        self.unjudged[name] = reason
        if detail:
            self.details[name] = detail

    def verdict(self, name: str) -> str:
        """ "pass", "FAIL" or "not judged" for the check ``name``."""
        passed = self.checks[name]
        if passed is None:
            return "not judged"
        return "pass" if passed else "FAIL"

    @property
    def failed(self) -> list[str]:
        """The checks that failed; one not judged has not failed."""
        return [
            name for name, passed in self.checks.items() if passed is False
        ]

    def event(self, kind: str, detail: str) -> None:
        self.events.append((time.time(), kind, detail))


class World:
    """Factory line, registrar, broker, CRL publisher and a monitor."""

    def __init__(self, directory: Path, plan: Plan) -> None:
        self.directory = directory
        self.plan = plan
        self.stack = contextlib.ExitStack()
        self.beats: list[Beat] = []
        self._beats_lock = threading.Lock()

    def __enter__(self) -> World:
        try:
            self._build()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stack.close()

    def _build(self) -> None:
        d = self.directory
        self.factory_ca = CertificateAuthority.create(d / "factory-ca")
        self.line = FactoryLine(self.factory_ca, d / "factory.sqlite")
        self.stack.callback(self.line.close)
        self.ek_setup = ek_ca_config(d / "ek-ca")
        self.layout = registrar_module.prepare(d / "registrar")
        self.operational_ca = CertificateAuthority.load(self.layout.ca_dir)
        self.registry = Registry(self.layout.registry_path)
        self.stack.callback(self.registry.close)

        self.anchors = d / "device-cas.pem"
        self.anchors.write_bytes(
            self.factory_ca.root_path.read_bytes()
            + self.layout.root_path.read_bytes()
        )
        self.crl_path = d / "crl.pem"
        self._start_broker()
        self.publisher = CrlPublisher(
            self.factory_ca,
            self.operational_ca,
            self.crl_path,
            self.broker.reload,
            CRL_LIFETIME,
        )
        self.publisher.publish()
        self.publisher.start()
        self.stack.callback(self.publisher.stop)
        self.registrar = Registrar(
            self.operational_ca,
            self.registry,
            "127.0.0.1",
            self.broker.port,
            self.anchors,
            self.layout.chain_path,
            self.layout.key_path,
            lifetime=self.plan.lifetime,
        )
        self.registrar.start()
        self.stack.callback(self.registrar.stop)
        self._start_monitor()

    def _start_broker(self) -> None:
        server = self.directory / "broker-credentials"
        server.mkdir(mode=0o700)
        chain, key = self.factory_ca.issue_server_cert()
        (server / "server.pem").write_bytes(chain_pem(chain))
        (server / "server.key").write_bytes(key_pem(key))
        (server / "server.key").chmod(0o600)
        self.crl_path.write_bytes(
            self.factory_ca.crl() + self.operational_ca.crl()
        )
        # mosquitto drops root privileges: its directory must be one it
        # can enter, outside the fleet's private one.
        workdir = Path(tempfile.mkdtemp(prefix="fleet-broker-"))
        self.stack.callback(shutil.rmtree, workdir, True)
        self.broker = Broker(
            workdir=workdir,
            port=free_port(),
            ca_file=self.anchors,
            server_cert_file=server / "server.pem",
            server_key_file=server / "server.key",
            crl_file=self.crl_path,
            service_users={
                registrar_module.NAME: list(registrar_module.ACL_TOPICS),
                MONITOR: [HEARTBEATS],
            },
        )
        self.broker.start()
        self.stack.callback(self.broker.stop)

    def _start_monitor(self) -> None:
        chain, key = self.operational_ca.issue_client_cert(
            MONITOR, days=1, service=True
        )
        directory = self.directory / "monitor"
        directory.mkdir(mode=0o700)
        chain_path, key_path = directory / "chain.pem", directory / "key.pem"
        chain_path.write_bytes(chain_pem(chain))
        key_path.write_bytes(key_pem(key))
        key_path.chmod(0o600)

        def context() -> ssl.SSLContext:
            return client_context(self.anchors, chain_path, key_path)

        self._monitor_context = context
        self.monitor = self._open_monitor()
        # The monitor may be replaced meanwhile: close whichever is open.
        self.stack.callback(self._close_monitor)
        stop = threading.Event()
        thread = threading.Thread(
            target=self._drain, args=(stop,), daemon=True
        )
        thread.start()
        self.stack.callback(thread.join, 2)
        self.stack.callback(stop.set)

    def _open_monitor(self) -> Session:
        monitor = Session(
            "127.0.0.1", self.broker.port, MONITOR, self._monitor_context
        )
        monitor.open()
        monitor.subscribe(HEARTBEATS)
        return monitor

    def _close_monitor(self) -> None:
        self.monitor.close()

    def reconnect_monitor(self) -> None:
        """A new monitor session at once, not after its reconnect backoff."""
        old, self.monitor = self.monitor, self._open_monitor()
        old.close()

    def _drain(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                message = self.monitor.messages.get(timeout=0.5)
            except queue.Empty:
                continue
            try:
                beat = json.loads(message.payload)
                device_id = message.topic.split("/")[1]
            except (ValueError, IndexError):
                continue
            if not isinstance(beat, dict) or "identity" not in beat:
                continue
            with self._beats_lock:
                self.beats.append(
                    Beat(
                        time.time(),
                        device_id,
                        str(beat["identity"]),
                        beat.get("serial"),
                    )
                )

    def beats_copy(self) -> list[Beat]:
        with self._beats_lock:
            return list(self.beats)

    def restart_broker(self) -> None:
        self.broker.start()


class Fleet:
    """Runs one plan in ``directory``; see :func:`run`."""

    def __init__(
        self,
        plan: Plan,
        directory: Path,
        console: Console | None = None,
    ) -> None:
        self.plan = plan
        self.directory = directory
        self.console = console
        self.outcome = Outcome(plan)
        self.devices: dict[str, SimDevice] = {}
        self.racks: list[Rack] = []

    # -- running --------------------------------------------------------

    def run(self) -> Outcome:
        self.outcome.started = time.time()
        with World(self.directory / "world", self.plan) as world:
            self.world = world
            try:
                with self._progress() as progress:
                    self.progress = progress
                    getattr(self, f"_{self.plan.scenario}")()
            except FleetError as exc:
                # A scenario that stalls still leaves a report saying
                # where, with everything observed until then.
                self.outcome.check(
                    "the scenario ran to its end", False, str(exc)
                )
            finally:
                try:
                    self._judge_unsettled()
                finally:
                    self._stop_all()
                self.outcome.beats = world.beats_copy()
                self._collect_records()
        self.outcome.finished = time.time()
        return self.outcome

    @contextlib.contextmanager
    def _progress(self) -> Iterator[Progress | None]:
        if self.console is None:
            yield None
            return
        progress = Progress(
            TextColumn("{task.description:<28}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
        )
        with progress:
            yield progress

    def _phase(
        self, name: str, total: int | None = None
    ) -> Callable[[int], None]:
        """A progress bar for one phase; returns how to advance it."""
        self.outcome.event("phase", name)
        started = time.monotonic()
        self.outcome.phases[name] = 0.0
        if total is None:
            total = len(self._genuine())
        task = None
        if self.progress is not None:
            task = self.progress.add_task(name, total=total)

        def advance(done: int) -> None:
            self.outcome.phases[name] = time.monotonic() - started
            if self.progress is not None and task is not None:
                self.progress.update(task, completed=done)

        return advance

    def _lifecycle(self) -> None:
        self._manufacture()
        self._boot()
        self._wait_renewals(self.plan.renewals)
        steady_from = time.time()
        self._act()
        self._settle()
        self._check_gaps(steady_from)
        self._check_records()

    def _storm(self) -> None:
        self._manufacture()
        issued_at = self._identical_operational()
        self._boot()
        self._wait_storm(issued_at)
        self._settle()
        self._check_records()

    def _outage(self) -> None:
        self._manufacture()
        self._boot()
        self._wait_renewals(1)
        down = self.plan.lifetime * 0.4
        self.outcome.event("outage", f"broker and registrar down {down} s")
        self.world.registrar.stop()
        self.world.broker.stop()
        time.sleep(down)
        self.world.restart_broker()
        self.world.reconnect_monitor()
        self.world.registrar.start()
        self.outcome.event("outage", "broker and registrar back")
        back = time.time()
        self._wait_renewals_after(back)
        self._settle()
        self._check_outage(back - down)
        self._check_records()

    def _clone(self) -> None:
        self._manufacture()
        self._boot()
        self._settle()
        self._check_records()

    # -- phases -----------------------------------------------------------

    def _genuine(self) -> list[PlannedDevice]:
        return [d for d in self.plan.devices if d.role != CLONE]

    def _settings(self) -> dict[str, Any]:
        return {
            "heartbeat_interval": self.plan.heartbeat,
            "renew_fraction": 0.5,
            "renew_jitter": 0.25 if self.plan.scenario == "storm" else 0.2,
            "renew_floor": 0,
            "retry_base": 1,
            "retry_cap": 4,
            "enroll_timeout": 5,
            "connect_timeout": 5,
            "keepalive": 30,
        }

    def _manufacture(self) -> None:
        advance = self._phase("factory line")
        world = self.world
        for planned in self.plan.devices:
            self.devices[planned.device_id] = SimDevice(
                self.directory / "devices" / planned.device_id,
                planned.device_id,
                planned.serial,
                planned.key_store,
            )
        genuine = [self.devices[d.device_id] for d in self._genuine()]

        # swtpm_setup makes the EK and its certificate, which takes most
        # of a second in swtpm; several run at once.
        with ThreadPoolExecutor(SETUP_WORKERS) as pool:
            list(
                pool.map(lambda d: d.manufacture_tpm(world.ek_setup), genuine)
            )
        for number, device in enumerate(genuine, 1):
            if device.key_store == TPM:
                device.start_tpm()
            self._configure(device)
            world.line.manufacture(device)
            world.registry.add(device.device_id, device.serial)
            advance(number)
        self.outcome.event("factory", f"{len(genuine)} devices made")
        for planned in self.plan.devices:
            if planned.role == CLONE:
                self._clone_attempt(planned)

    def _configure(self, device: SimDevice) -> None:
        device.configure(
            "127.0.0.1",
            self.world.broker.port,
            self.world.factory_ca.root_path,
            self.world.anchors,
            **self._settings(),
        )

    def _clone_attempt(self, planned: PlannedDevice) -> None:
        """A board carrying a copy of another's key comes down the line."""
        original = next(
            self.devices[d.device_id]
            for d in self.plan.devices
            if d.role != CLONE and d.key_store == SOFTWARE
        )
        clone = self.devices[planned.device_id]
        self._configure(clone)
        source = original.state_dir / FACTORY / "generations"
        first = sorted(source.iterdir())[0]
        target = clone.state_dir / FACTORY / "generations" / first.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(first, target)
        (target / "chain.pem").unlink(missing_ok=True)
        (clone.state_dir / FACTORY / "pending").symlink_to(
            Path("generations") / first.name
        )
        try:
            self.world.line.manufacture(clone)
        except CloneError as exc:
            self.outcome.event("clone", f"refused at the factory: {exc}")
            self.outcome.reached[planned.device_id] = True
            self.outcome.final[planned.device_id] = {"refused": str(exc)}
            return
        self.outcome.reached[planned.device_id] = False
        self.outcome.event("clone", "the factory accepted a cloned key")

    def _identical_operational(self) -> float:
        """Give every device an LDevID with the very same validity."""
        advance = self._phase("identical LDevIDs")
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        not_after = now + datetime.timedelta(seconds=self.plan.lifetime)
        for number, planned in enumerate(self._genuine(), 1):
            device = self.devices[planned.device_id]
            device.keygen(OPERATIONAL)
            csr = x509.load_pem_x509_csr(device.csr(OPERATIONAL))
            leaf, _ = self.world.operational_ca.sign_csr(
                csr, not_before=now, not_after=not_after
            )
            self.world.registry.record_issuance(
                device.device_id,
                leaf.serial_number,
                leaf.fingerprint(hashes.SHA256()).hex(),
                leaf.not_valid_before_utc,
                leaf.not_valid_after_utc,
                registrar_module.KIND,
            )
            device.install_chain(
                chain_pem([leaf, self.world.operational_ca.intermediate]),
                OPERATIONAL,
            )
            advance(number)
        return now.timestamp()

    def _boot(self) -> None:
        advance = self._phase("boot and enroll")
        genuine = [self.devices[d.device_id] for d in self._genuine()]
        hosted = [d for d in genuine if d.key_store == SOFTWARE]
        if len(hosted) > RACK_SIZE:
            for start in range(0, len(hosted), RACK_SIZE):
                rack = Rack(
                    hosted[start : start + RACK_SIZE],
                    self.directory / f"rack-{start // RACK_SIZE}.log",
                )
                rack.start()
                self.racks.append(rack)
            alone = [d for d in genuine if d.key_store == TPM]
        else:
            alone = genuine
        for device in alone:
            device.start()
        self._wait(
            lambda d: _is_operational(d.status()),
            advance,
            60 + len(genuine) * 0.5,
            "every device to connect with an operational certificate",
        )

    def _wait_renewals(self, renewals: int) -> None:
        plural = "renewal" if renewals == 1 else "renewals"
        advance = self._phase(f"{renewals} {plural} each")
        wanted = renewals + 1

        def done(device: SimDevice) -> bool:
            return len(self._serials(device.device_id)) >= wanted

        self._wait(
            done,
            advance,
            30 + self.plan.lifetime * (renewals + 1),
            f"{renewals} {plural} on every device",
        )

    def _wait_renewals_after(self, moment: float) -> None:
        advance = self._phase("renewal after the outage")
        since = datetime.datetime.fromtimestamp(moment, datetime.UTC)

        def done(device: SimDevice) -> bool:
            return any(
                i.issued_at >= since
                for i in self.world.registry.issuances(device.device_id)
            )

        self._wait(
            done,
            advance,
            30 + self.plan.lifetime * 2,
            "a renewal after the outage on every device",
        )

    def _serials(self, device_id: str) -> set[str]:
        return {
            b.serial
            for b in self.world.beats_copy()
            if b.device_id == device_id
            and b.identity == OPERATIONAL
            and b.serial
        }

    def _wait(
        self,
        predicate: Callable[[SimDevice], bool],
        advance: Callable[[int], None],
        timeout: float,
        what: str,
    ) -> None:
        devices = [self.devices[d.device_id] for d in self._genuine()]
        deadline = time.monotonic() + timeout
        while True:
            self._sample_memory()
            done = sum(1 for d in devices if predicate(d))
            advance(done)
            if done == len(devices):
                return
            if time.monotonic() > deadline:
                raise FleetError(
                    f"timed out waiting for {what}: {done} of {len(devices)}"
                )
            time.sleep(0.25)

    def _act(self) -> None:
        """Revoke, decommission and reset the devices the plan names."""
        acting = [d for d in self._genuine() if d.role != KEEP]
        advance = self._phase("revoke, decommission, reset", len(acting))
        world = self.world
        acted = 0
        for planned in self._genuine():
            device = self.devices[planned.device_id]
            if planned.role == REVOKE:
                revoke_device(
                    world.registry,
                    world.operational_ca,
                    device.device_id,
                    world.factory_ca,
                    REVOKED,
                )
            elif planned.role == DECOMMISSION:
                record = world.line.record_of(device.device_id)
                assert record is not None
                revoke_device(
                    world.registry,
                    world.operational_ca,
                    device.device_id,
                    world.factory_ca,
                    DECOMMISSIONED,
                    idevid_serials=[record.cert_serial],
                )
            else:
                continue
            self.outcome.event(planned.role, device.device_id)
        world.publisher.publish()
        self.outcome.event("crl", "published and broker reloaded")
        self._probe_revoked()

        for planned in self._genuine():
            if planned.role == KEEP:
                continue
            device = self.devices[planned.device_id]
            # A reboot: the next connection meets the new CRL.
            device.stop()
            if planned.role == RESET:
                device.factory_reset()
                self.outcome.event("reset", device.device_id)
            device.start()
            acted += 1
            advance(acted)

    def _probe_revoked(self) -> None:
        """Connect once with each cut-off credential: the broker refuses.

        Probes run at once, while the operational certificates are
        still within their validity, so a refusal names revocation.
        """
        targets: list[tuple[str, str]] = []
        keep = next(d for d in self._genuine() if d.role == KEEP)
        targets.append((keep.device_id, OPERATIONAL))
        for planned in self._genuine():
            if planned.role in (REVOKE, DECOMMISSION):
                targets.append((planned.device_id, OPERATIONAL))
            if planned.role == DECOMMISSION:
                targets.append((planned.device_id, FACTORY))
        # One device's probes run one after the other: its TPM has three
        # object slots, and its own agent holds one of them.
        by_device: dict[str, list[str]] = {}
        for device_id, lineage in targets:
            by_device.setdefault(device_id, []).append(lineage)
        with ThreadPoolExecutor(SETUP_WORKERS) as pool:
            answers = pool.map(self._probe_device, by_device.items())
            for found in answers:
                self.outcome.probes.update(found)

    def _probe_device(self, item: tuple[str, list[str]]) -> dict[str, str]:
        device_id, lineages = item
        found = {}
        for lineage in lineages:
            result = subprocess.run(
                probe_command(self.devices[device_id], lineage),
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            lines = result.stdout.strip().splitlines()
            found[f"{device_id}/{lineage}"] = (
                lines[-1] if lines else "no answer"
            )
        return found

    def _settle(self) -> None:
        advance = self._phase("devices settle")

        def reached(device: SimDevice) -> bool:
            role = self._role(device.device_id)
            return _in_state(role, device.status())

        try:
            self._wait(reached, advance, 60, "every device's final state")
        except FleetError as exc:
            self.outcome.event("settle", str(exc))
        for planned in self._genuine():
            device = self.devices[planned.device_id]
            status = device.status() or {}
            self.outcome.final[planned.device_id] = status
            self.outcome.reached[planned.device_id] = _in_state(
                planned.role, status
            )
        self.outcome.check(
            "every device reached its state",
            all(self.outcome.reached.values()),
        )
        self._check_probes()

    def _judge_unsettled(self) -> None:
        """Judge every device a scenario ended without judging.

        A scenario that stopped early (or one that never settles) must
        still say, device by device, where each one ended; and the run
        fails unless each reached its state.
        """
        for planned in self._genuine():
            if planned.device_id in self.outcome.reached:
                continue
            device = self.devices.get(planned.device_id)
            status = (device.status() if device else None) or {}
            self.outcome.final[planned.device_id] = status
            self.outcome.reached[planned.device_id] = _in_state(
                planned.role, status
            )
        self.outcome.check(
            "every device reached its state",
            all(self.outcome.reached.values()),
        )

    def _check_probes(self) -> None:
        if not self.outcome.probes:
            return
        refused = all(
            answer.startswith("refused") and "REVOKED" in answer.upper()
            for name, answer in self.outcome.probes.items()
            if self._role(name.split("/")[0]) != KEEP
        )
        accepted = all(
            answer == "accepted"
            for name, answer in self.outcome.probes.items()
            if self._role(name.split("/")[0]) == KEEP
        )
        self.outcome.check(
            "revoked credentials refused by the broker", refused
        )
        self.outcome.check(
            "a kept device's credential still accepted", accepted
        )

    def _check_gaps(self, since: float) -> None:
        beats = self.world.beats_copy()
        limit = 2 * self.plan.heartbeat
        worst = 0.0
        for planned in self._genuine():
            if planned.role != KEEP:
                continue
            times = sorted(
                b.at
                for b in beats
                if b.device_id == planned.device_id and b.at >= since
            )
            gaps = [b - a for a, b in itertools.pairwise(times)]
            worst = max([worst, *gaps])
        self.outcome.check(
            "kept devices never lost their session longer than a heartbeat",
            worst <= limit,
            f"longest gap {worst:.2f} s, limit {limit:.2f} s",
        )

    def _check_outage(self, went_down: float) -> None:
        """Each device heartbeats again after the outage; how long it took."""
        beats = self.world.beats_copy()
        worst = 0.0
        silent = []
        for planned in self._genuine():
            after = [
                b.at
                for b in beats
                if b.device_id == planned.device_id and b.at >= went_down
            ]
            if not after:
                silent.append(planned.device_id)
                continue
            worst = max(worst, min(after) - went_down)
        self.outcome.check(
            "every device came back after the outage",
            not silent,
            f"longest from the broker going down to a device's first "
            f"heartbeat after it: {worst:.1f} s"
            + (f"; silent: {', '.join(silent)}" if silent else ""),
        )

    def _check_records(self) -> None:
        """The records say what the devices hold, and the reverse."""
        world = self.world
        mismatches = []
        for planned in self._genuine():
            device = self.devices[planned.device_id]
            record = world.line.record_of(device.device_id)
            idevid = device.leaf(FACTORY)
            if record is None or idevid is None:
                mismatches.append(f"{device.device_id}: no IDevID record")
                continue
            if record.cert_serial != idevid.serial_number:
                mismatches.append(f"{device.device_id}: IDevID serial")
            issued = {
                i.cert_serial
                for i in world.registry.issuances(device.device_id)
            }
            ldevid = device.leaf(OPERATIONAL)
            if ldevid is not None and ldevid.serial_number not in issued:
                mismatches.append(f"{device.device_id}: unrecorded LDevID")
        self.outcome.check(
            "records match the certificates on the devices",
            not mismatches,
            "; ".join(mismatches),
        )

    def _wait_storm(self, issued_at: float) -> None:
        advance = self._phase("storm renewals")
        since = datetime.datetime.fromtimestamp(issued_at, datetime.UTC)
        # The identical batch itself is recorded too; renewals come after.
        batch = {i.cert_serial for i in self.world.registry.issuances()}

        def renewed(device: SimDevice) -> bool:
            return any(
                i.cert_serial not in batch
                for i in self.world.registry.issuances(device.device_id)
            )

        self._wait(
            renewed,
            advance,
            60 + self.plan.lifetime * 2,
            "every device's renewal",
        )
        times = [
            (i.issued_at - since).total_seconds()
            for i in self.world.registry.issuances()
            if i.cert_serial not in batch
        ]
        settings = self._settings()
        lifetime = self.plan.lifetime
        self.outcome.storm = storm_spread(
            times,
            settings["renew_fraction"] * lifetime,
            settings["renew_jitter"] * lifetime,
        )
        judge_storm(self.outcome, len(self._genuine()))

    def _sample_memory(self) -> None:
        """Add up the resident memory of everything the fleet runs."""
        pids = [os.getpid()]
        broker = self.world.broker.pid
        if broker is not None:
            pids.append(broker)
        for device in self.devices.values():
            if device.process is not None:
                pids.append(device.process.pid)
            if device.tpm is not None and device.tpm.pid is not None:
                pids.append(device.tpm.pid)
        for rack in self.racks:
            if rack.process is not None:
                pids.append(rack.process.pid)
        total = sum(_rss_kib(pid) for pid in pids) / 1024
        self.outcome.memory_mb = max(self.outcome.memory_mb, total)

    def _role(self, device_id: str) -> str:
        return next(
            d.role for d in self.plan.devices if d.device_id == device_id
        )

    def _stop_all(self) -> None:
        """Stop every agent, rack and swtpm the run started.

        One that fails to stop is logged and the others are stopped all
        the same; the TPMs go last, as the agents use them, but they go
        even when stopping the agents was cut short.
        """
        try:
            stops = [(rack.log_path.name, rack.stop) for rack in self.racks]
            stops += [(d.device_id, d.stop) for d in self.devices.values()]
            with ThreadPoolExecutor(SETUP_WORKERS) as pool:
                list(pool.map(_stop_quietly, stops))
        finally:
            for device in self.devices.values():
                _stop_quietly((f"{device.device_id} TPM", device.stop_tpm))

    def _collect_records(self) -> None:
        world = self.world
        self.outcome.factory = [
            {
                "device_id": r.device_id,
                "device_serial": r.device_serial,
                "idevid_serial": f"{r.cert_serial:x}",
                "public_key_sha256": r.public_key,
                "ek_cert_sha256": r.ek_cert,
                "key_store": r.key_store,
                "made_at": r.finished_at.isoformat(),
            }
            for r in world.line.records()
        ]
        self.outcome.factory_refusals = [
            {"device_serial": s, "device_id": i, "reason": r}
            for s, i, r in world.line.refusals()
        ]
        self.outcome.issuances = [
            {
                "device_id": i.device_id,
                "serial": f"{i.cert_serial:x}",
                "kind": i.kind,
                "issued_at": i.issued_at.timestamp(),
                "not_after": i.not_after.timestamp(),
            }
            for i in world.registry.issuances()
        ]
        revoked: list[tuple[int, str, datetime.datetime]] = []
        for kind, ca in (
            ("idevid", world.factory_ca),
            ("ldevid", world.operational_ca),
        ):
            for serial, when in sorted(ca.revocations().items()):
                revoked.append((serial, kind, when))
        owners = {i["serial"]: i["device_id"] for i in self.outcome.issuances}
        owners.update(
            {f["idevid_serial"]: f["device_id"] for f in self.outcome.factory}
        )
        statuses = {d.device_id: d.status for d in world.registry.devices()}
        self.outcome.revocations = [
            {
                "device_id": owners.get(f"{serial:x}", "?"),
                "serial": f"{serial:x}",
                "kind": kind,
                "revoked_at": when.isoformat(),
                "status": statuses.get(owners.get(f"{serial:x}", ""), "?"),
            }
            for serial, kind, when in revoked
        ]


def storm_spread(
    times: list[float], window_start: float, window: float
) -> dict[str, Any]:
    """Renewal requests per bucket over the policy's renewal window.

    ``times`` are seconds after the identical certificates were issued;
    the window runs from ``window_start`` for ``window`` seconds. The
    mean is taken over the window the policy spreads renewals across,
    not over the span the requests happened to cover: with a few
    devices that span shrinks to whichever buckets were hit and any
    spread looks like a peak. The bucket count falls with the fleet so
    each bucket expects at least ``STORM_PER_BUCKET`` requests. Late
    requests (retries, a slow broker) get buckets of their own past the
    window and count towards the peak but not the mean.
    """
    count = max(1, min(STORM_MAX_BUCKETS, len(times) // STORM_PER_BUCKET))
    bucket = window / count if window > 0 else 1.0
    if not times:
        return {"requests": 0, "bucket_s": bucket, "peak_over_mean": 0.0}
    counts: dict[int, int] = {}
    for moment in times:
        index = math.floor((moment - window_start) / bucket)
        counts[index] = counts.get(index, 0) + 1
    low = min(0, *counts)
    high = max(count - 1, *counts)
    series = [counts.get(n, 0) for n in range(low, high + 1)]
    mean = len(times) / count
    return {
        "requests": len(times),
        "bucket_s": bucket,
        "window_s": window,
        "first_s": window_start + low * bucket,
        "buckets": series,
        "peak": max(series),
        "mean": mean,
        "peak_over_mean": max(series) / mean,
    }


def judge_storm(outcome: Outcome, devices: int) -> None:
    """The storm check over ``outcome.storm``, or why it is not judged."""
    storm = outcome.storm
    detail = (
        f"busiest {storm.get('peak', 0)}, peak over mean "
        f"{storm['peak_over_mean']:.2f}"
    )
    if devices < STORM_JUDGED_FROM:
        outcome.not_judged(
            STORM_CHECK,
            f"{devices} devices are too few for the spread statistic (at "
            f"least {STORM_JUDGED_FROM} needed)",
            detail,
        )
        return
    outcome.check(STORM_CHECK, storm_spread_ok(storm), detail)


def storm_spread_ok(storm: dict[str, Any]) -> bool:
    """Whether the busiest bucket holds at most twice the mean.

    A busiest bucket of one request is always spread: no bucket can
    hold less and still be busy.
    """
    if not storm.get("requests"):
        return False
    return bool(
        storm["peak"] <= 1 or storm["peak_over_mean"] <= STORM_PEAK_LIMIT
    )


def _stop_quietly(stop: tuple[str, Callable[[], None]]) -> None:
    name, action = stop
    try:
        action()
    except Exception as exc:
        logger.warning("%s not stopped: %s", name, exc)


def _rss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as stream:
            for line in stream:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def _is_operational(status: dict[str, Any] | None) -> bool:
    return (
        status is not None
        and status.get("state") == "connected"
        and status.get("identity") == OPERATIONAL
    )


def _in_state(role: str, status: dict[str, Any] | None) -> bool:
    status = status or {}
    if role in (KEEP, RESET):
        return _is_operational(status)
    if role == REVOKE:
        return (
            status.get("state") == "needs_service"
            and status.get("identity") == FACTORY
        )
    if role == DECOMMISSION:
        return (
            status.get("identity") is None
            and status.get("state") == "needs_service"
            and "refused every credential" in str(status.get("last_result"))
        )
    return False


def run(
    scenario: str,
    count: int,
    seed: int,
    out: Path,
    software_keys: bool = False,
    lifetime: int | None = None,
    console: Console | None = None,
) -> tuple[Outcome, Path]:
    """Run a scenario; the world and devices live in ``out``/run.

    ``out`` is held for the run: see :class:`OutDir`.
    """
    the_plan = plan(scenario, count, seed, software_keys, lifetime)
    with OutDir(out) as held:
        return held.run(the_plan, console)


class OutDir:
    """A fleet's --out directory, which one run at a time may use.

    The lock is taken before anything in the directory is replaced and
    held until the run is over (the report written, for a caller that
    writes it inside): a second run would otherwise delete the first's
    devices while their swtpm and agents still run.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path).absolute()
        self._held: contextlib.ExitStack | None = None

    @property
    def run_dir(self) -> Path:
        """Where the world and devices of the run live."""
        return self.path / "run"

    def __enter__(self) -> OutDir:
        self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        held = contextlib.ExitStack()
        held.enter_context(lock.hold(self.path / LOCK_FILE, self._refuse))
        self._held = held
        return self

    def __exit__(self, *exc: object) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None

    def _refuse(self, pid: int | None) -> FleetError:
        holder = f" (pid {pid})" if pid is not None else ""
        return FleetError(
            f"{self.path} is in use by another fleet run{holder}"
        )

    def run(
        self, the_plan: Plan, console: Console | None = None
    ) -> tuple[Outcome, Path]:
        """Run ``the_plan`` in :attr:`run_dir`, replacing a previous run."""
        if self._held is None:
            raise FleetError(f"{self.path} is not held: use 'with OutDir'")
        workdir = self.run_dir
        if workdir.exists():
            logger.info("replacing the previous run in %s", workdir)
            shutil.rmtree(workdir)
        workdir.mkdir(mode=0o700)

        fleet = Fleet(the_plan, workdir, console)
        try:
            outcome = fleet.run()
        except DeviceError as exc:
            raise FleetError(str(exc)) from None
        return outcome, workdir
