"""Network campaign: broker restarts, a dead broker, cut connections.

Run from the repository top::

    .venv/bin/python -m campaigns.network [--outage 120] [--stall 20]
                                          [--cap 30] [--stores tpm,software]

Each device runs ``device-agent run`` with heartbeats (QoS 1) every
``--heartbeat`` seconds, connected to the broker through its own
loopback proxy (``campaigns/proxy.py``). A monitor subscribed directly
at the broker counts every heartbeat by its sequence number. The
campaign then goes through its faults, one after the other:

* broker restart, and broker killed (SIGKILL) for ``--outage`` seconds.
  The proxy holds traffic a moment before the broker goes, so nothing
  acknowledged by the broker is lost inside the dying broker, and while
  it is away it resets every connection at once, as a host without a
  broker would (so every attempt is counted); the monitor resubscribes
  before the devices are let back in;
* connections cut in the middle of the TLS handshake (three in a row);
* connections reset, and closed cleanly, mid-session;
* the link stalled for ``--stall`` seconds, every byte held.

For each fault it checks that every device reconnected within its
backoff cap (``--cap``, the agent's ``retry_cap``) of the fault's end,
that it never spun (connection attempts during the fault no more than
the backoff allows, CPU time below ``--cpu`` of the fault's length),
and at the end that every heartbeat sent was delivered, except those a
full offline queue refused, which the agent counts: one device runs
with a queue of ``--tight-queue`` messages so that the outage overflows
it. The exit status is non-zero if any check failed.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from bench import report
from bench.stopping import stoppable
from bench.world import Device, World, world
from campaigns import common
from campaigns.common import STORES
from campaigns.proxy import Proxy
from device_agent.core import backoff
from firmware_sim.ca import chain_pem, key_pem
from firmware_sim.process import stop_process
from tpm_simulator.ports import free_port

FAULTS = ("restart", "kill", "handshake", "reset", "close", "stall")
TIGHT = "tight"
# What a reconnect may take beyond the backoff cap: the TLS handshake,
# the TPM signature, and the agent's own tick.
SLACK = 2.0
SETTLE = 1.0
DRAIN_TIMEOUT = 60.0
CLK_TCK = os.sysconf("SC_CLK_TCK")


class CheckError(Exception):
    """The campaign could not run a step; the message says which."""


# -- the monitor ----------------------------------------------------------


class Monitor:
    """Counts one device's heartbeats, connected straight to the broker.

    It holds a certificate for the device's own name, which the broker's
    ACL lets read the device's topics; its client id is its own.
    """

    def __init__(self, here: World, device_id: str, directory: Path):
        chain, key = here.factory_ca.issue_client_cert(device_id, days=1)
        directory.mkdir(parents=True, exist_ok=True)
        self.chain_path = directory / "monitor-chain.pem"
        self.key_path = directory / "monitor-key.pem"
        self.chain_path.write_bytes(chain_pem(chain))
        self.key_path.write_bytes(key_pem(key))
        self.key_path.chmod(0o600)
        self.ca_file = here.factory_ca.root_path
        self.here = here
        self.client_id = f"{device_id}.monitor"
        self.topic = f"devices/{device_id}/heartbeat"
        self.seen: collections.Counter[int] = collections.Counter()
        self.lock = threading.Lock()
        self.client: mqtt.Client | None = None

    def connect(self, timeout: float = 10.0) -> None:
        """(Re)connect and subscribe; return once the broker granted it."""
        self.close()
        context = ssl.create_default_context(cafile=str(self.ca_file))
        context.load_cert_chain(self.chain_path, self.key_path)
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5,
        )
        client.tls_set_context(context)
        connected, subscribed = threading.Event(), threading.Event()
        client.on_connect = lambda *args: connected.set()
        client.on_subscribe = lambda *args: subscribed.set()
        client.on_message = self._on_message
        client.connect("127.0.0.1", self.here.broker.port, keepalive=30)
        client.loop_start()
        self.client = client
        if not connected.wait(timeout):
            raise CheckError("the monitor got no CONNACK")
        client.subscribe(self.topic, qos=1)
        if not subscribed.wait(timeout):
            raise CheckError("the monitor got no SUBACK")

    def close(self) -> None:
        client, self.client = self.client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def received(self) -> set[int]:
        with self.lock:
            return set(self.seen)

    def duplicates(self) -> int:
        with self.lock:
            return sum(n - 1 for n in self.seen.values())

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        try:
            seq = int(json.loads(message.payload)["seq"])
        except (ValueError, KeyError, TypeError):
            return
        with self.lock:
            self.seen[seq] += 1


# -- a device under test --------------------------------------------------


@dataclasses.dataclass
class Fault:
    """What one fault did to one device, as measured."""

    name: str
    device: str
    seconds: float
    attempts: int
    allowed: int
    reconnect: float | None
    cpu: float
    kept: bool = False


class Agent:
    """A device, its proxy, its monitor and its running daemon."""

    def __init__(
        self,
        here: World,
        device: Device,
        queue: int,
        options: argparse.Namespace,
        logs: Path,
    ) -> None:
        self.device = device
        self.name = device.id
        self.queue = queue
        self.proxy = Proxy(free_port(), here.broker.port)
        self.monitor = Monitor(here, device.id, logs / device.id)
        self.log_path = logs / device.id / "agent.log"
        self.options = options
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped_line = ""

    def start(self) -> None:
        self.proxy.start()
        self.monitor.connect()
        settings = {
            "broker_port": self.proxy.port,
            "heartbeat_interval": self.options.heartbeat,
            "retry_base": min(1.0, self.options.cap),
            "retry_cap": self.options.cap,
            "keepalive": 5,
            "connect_timeout": 3,
            "offline_queue": self.queue,
        }
        overrides = [f"--set={k}={v}" for k, v in settings.items()]
        command = self.device.command("-v", *overrides, "run")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=log, start_new_session=True
            )

    def state(self) -> dict[str, Any]:
        try:
            report_ = json.loads(
                (self.device.state / "status.json").read_text()
            )
        except (OSError, ValueError):
            return {}
        return report_ if isinstance(report_, dict) else {}

    def wait_connected(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.state().get("state") == "connected":
                return
            if self.process is not None and self.process.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-400:]
                raise CheckError(f"{self.name}: the agent exited: {tail}")
            time.sleep(0.1)
        raise CheckError(f"{self.name}: not connected after {timeout} s")

    def cpu(self) -> float:
        """CPU seconds the agent used so far, user and system."""
        assert self.process is not None
        try:
            fields = Path(f"/proc/{self.process.pid}/stat").read_text()
        except OSError:
            return 0.0
        after_name = fields.rsplit(")", 1)[1].split()
        return (int(after_name[11]) + int(after_name[12])) / CLK_TCK

    def drain(self, timeout: float) -> None:
        """Wait until the agent holds no queued heartbeat."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            report_ = self.state()
            held = (report_.get("offline_queue") or {}).get("held")
            if report_.get("state") == "connected" and held == 0:
                return
            time.sleep(0.2)
        raise CheckError(f"{self.name}: queue not drained in {timeout} s")

    def stop(self) -> None:
        """Stop the daemon and read its own account of what it sent."""
        if self.process is not None:
            stop_process(self.process, timeout=20)
        self.proxy.stop()
        self.monitor.close()
        text = self.log_path.read_text(errors="replace")
        found = re.findall(r"agent stopped: .*", text)
        self.stopped_line = found[-1] if found else ""

    def account(self) -> tuple[int, int, int]:
        """Heartbeats sent, still queued at the stop, dropped when full."""
        found = re.search(
            r"(\d+) heartbeats made, (\d+) messages still queued "
            r"\(never sent\), "
            r"(\d+) dropped",
            self.stopped_line,
        )
        if found is None:
            raise CheckError(f"{self.name}: no stop line in its log")
        sent, queued, dropped = (int(g) for g in found.groups())
        return sent, queued, dropped


def allowed_attempts(seconds: float, cap: float, base: float = 1.0) -> int:
    """The most attempts backoff permits in ``seconds``, plus a margin.

    Each wait is at least half its ceiling, so counting with those
    shortest waits bounds what a client that does not spin can make.
    """
    attempts, elapsed = 1, 0.0
    while True:
        wait = backoff.delay(attempts - 1, base, cap, 0.0)
        if elapsed + wait > seconds:
            break
        elapsed += wait
        attempts += 1
    return attempts + 2


# -- faults ---------------------------------------------------------------


class Campaign:
    """The world, the devices, and the faults played on them."""

    def __init__(self, here: World, agents: list[Agent], options: Any):
        self.here = here
        self.agents = agents
        self.options = options
        self.faults: list[Fault] = []
        self.failures: list[str] = []

    def run(self) -> None:
        outage, stall = self.options.outage, self.options.stall
        plays = {
            "restart": ("broker restart", self.broker_down(0.0)),
            "kill": (f"broker killed {outage:g} s", self.broker_down(outage)),
            "handshake": ("3 handshakes cut", self.cut_handshakes),
            "reset": ("reset mid-session", self.each(Proxy.reset_all)),
            "close": ("closed mid-session", self.each(Proxy.close_all)),
            "stall": (f"stalled {stall:g} s", self.stall(stall)),
        }
        for fault in self.options.faults:
            self.fault(*plays[fault])

    def each(self, action: Callable[[Proxy], object]) -> Callable[[], None]:
        def play() -> None:
            for agent in self.agents:
                action(agent.proxy)

        return play

    def broker_down(self, seconds: float) -> Callable[[], None]:
        def play() -> None:
            for agent in self.agents:
                agent.proxy.stall()
            time.sleep(0.5)  # what is in flight stays with the devices
            for agent in self.agents:
                agent.proxy.reject()
                agent.proxy.close_all()
                agent.proxy.resume()
            pid = self.here.broker.pid
            if seconds and pid is not None:
                os.kill(pid, signal.SIGKILL)
                time.sleep(seconds)
            self.here.broker.stop()
            self.here.broker.start()
            for agent in self.agents:
                agent.monitor.connect()
                agent.proxy.admit()

        return play

    def cut_handshakes(self) -> None:
        for agent in self.agents:
            agent.proxy.cut_handshakes(3)
            agent.proxy.reset_all()
        deadline = time.monotonic() + 6 * self.options.cap + 30
        while time.monotonic() < deadline:
            if all(
                a.proxy.snapshot().cut_in_handshake >= 3 for a in self.agents
            ):
                return
            time.sleep(0.1)
        raise CheckError("the devices did not try three handshakes")

    def stall(self, seconds: float) -> Callable[[], None]:
        def play() -> None:
            for agent in self.agents:
                agent.proxy.stall()
            time.sleep(seconds)
            for agent in self.agents:
                agent.proxy.resume()

        return play

    def fault(self, name: str, play: Callable[[], None]) -> None:
        started = time.monotonic()
        cpu = {agent.name: agent.cpu() for agent in self.agents}
        try:
            play()
        except CheckError as exc:
            self.failures.append(f"{name}: {exc}")
            return
        ended = time.monotonic()
        for agent in self.agents:
            used = agent.cpu() - cpu[agent.name]
            attempts = len(agent.proxy.attempts_between(started, ended))
            self.faults.append(
                Fault(
                    name,
                    agent.name,
                    ended - started,
                    attempts,
                    allowed_attempts(ended - started, self.options.cap),
                    None,
                    used,
                )
            )
        self.wait_reconnected(started, ended + self.options.cap + SLACK)
        for fault in self.faults[-len(self.agents) :]:
            agent = next(a for a in self.agents if a.name == fault.device)
            kept = agent.proxy.first_kept_since(started)
            if kept is not None:
                fault.reconnect = max(kept - ended, 0.0)
            elif agent.proxy.kept_through(started):
                fault.kept, fault.reconnect = True, 0.0
            self.judge(fault)

    def wait_reconnected(self, started: float, deadline: float) -> None:
        """Return once every device has a link again that lasts a moment,
        or at ``deadline``.

        After a stall the old connection looks open until the proxy
        reads what the device did meanwhile, so a link counts only once
        it is still there ``SETTLE`` seconds later.
        """
        while time.monotonic() < deadline:
            if self.linked(started):
                time.sleep(SETTLE)
                if self.linked(started):
                    return
            time.sleep(0.05)

    def linked(self, started: float) -> bool:
        return all(
            agent.proxy.first_kept_since(started) is not None
            or agent.proxy.kept_through(started)
            for agent in self.agents
        )

    def judge(self, fault: Fault) -> None:
        where = f"{fault.name} ({fault.device})"
        if fault.reconnect is None:
            self.failures.append(f"{where}: did not reconnect")
        elif fault.reconnect > self.options.cap + SLACK:
            self.failures.append(
                f"{where}: reconnected after {fault.reconnect:.1f} s, "
                f"beyond the cap of {self.options.cap:g} s"
            )
        if fault.attempts > fault.allowed:
            self.failures.append(
                f"{where}: {fault.attempts} connection attempts in "
                f"{fault.seconds:.1f} s (at most {fault.allowed})"
            )
        if fault.cpu > self.options.cpu * max(fault.seconds, 1.0):
            self.failures.append(
                f"{where}: {fault.cpu:.2f} s of CPU in {fault.seconds:.1f} s"
            )


def deliveries(agent: Agent) -> tuple[list[str], list[str]]:
    """The delivery figures of one device, and what is wrong with them."""
    sent, queued, dropped = agent.account()
    received = agent.monitor.received()
    lost = sent - queued - dropped - len(received & set(range(1, sent + 1)))
    row = [
        agent.name,
        str(agent.queue),
        str(sent),
        str(len(received)),
        str(dropped),
        str(queued),
        str(agent.monitor.duplicates()),
        str(lost),
    ]
    problems = []
    if lost:
        problems.append(f"{agent.name}: {lost} heartbeats lost")
    if received - set(range(1, sent + 1)):
        problems.append(f"{agent.name}: heartbeats received never sent")
    return row, problems


def _reconnect_cell(fault: Fault) -> str:
    if fault.kept:
        return "link kept"
    if fault.reconnect is None:
        return "never"
    return f"{fault.reconnect:.2f} s"


def build_tables(
    campaign: Campaign, rows: list[list[str]], seconds: float
) -> list[report.Table]:
    options = campaign.options
    faults = report.Table(
        f"network campaign: faults, backoff cap {options.cap:g} s, "
        f"heartbeat every {options.heartbeat:g} s",
        ["fault", "device", "lasted", "attempts (allowed)", "reconnect",
         "CPU"],
    )  # fmt: skip
    for fault in campaign.faults:
        faults.add(
            fault.name,
            fault.device,
            f"{fault.seconds:.1f} s",
            f"{fault.attempts} ({fault.allowed})",
            _reconnect_cell(fault),
            f"{fault.cpu:.2f} s",
        )
    messages = report.Table(
        "network campaign: heartbeats (QoS 1)",
        ["device", "queue", "sent", "delivered", "dropped (full)",
         "queued at stop", "duplicates", "lost"],
    )  # fmt: skip
    for row in rows:
        messages.add(*row)
    messages.rule()
    blank = [""] * 6
    messages.add("failed", str(len(campaign.failures)), *blank)
    messages.add("time", f"{seconds:.1f} s", *blank)
    return [faults, messages]


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = common.argument_parser("network", __doc__)
    parser.add_argument(
        "--outage", type=float, default=120.0,
        help="seconds the broker stays killed (default 120)",
    )  # fmt: skip
    parser.add_argument(
        "--stall", type=float, default=20.0,
        help="seconds the link stays stalled (default 20)",
    )  # fmt: skip
    parser.add_argument(
        "--cap", type=float, default=30.0,
        help="the agents' backoff cap, retry_cap (default 30)",
    )  # fmt: skip
    parser.add_argument(
        "--heartbeat", type=float, default=0.5,
        help="seconds between heartbeats (default 0.5)",
    )  # fmt: skip
    parser.add_argument(
        "--tight-queue", type=int, default=5,
        help="offline queue of the device meant to overflow (default 5)",
    )  # fmt: skip
    parser.add_argument(
        "--cpu", type=float, default=0.1,
        help="CPU share an agent may use during a fault (default 0.1)",
    )  # fmt: skip
    parser.add_argument("--stores", default=",".join(STORES))
    parser.add_argument(
        "--faults", default=",".join(FAULTS),
        help=f"which faults, in order (default {','.join(FAULTS)})",
    )  # fmt: skip
    options = parser.parse_args(argv)
    options.faults = common.choose(parser, "--faults", options.faults, FAULTS)
    options.stores = common.choose(parser, "--stores", options.stores, STORES)
    common.positive(
        parser, options, "outage", "stall", "cap", "heartbeat", "cpu"
    )
    # The agent's offline_queue is at least 1: a message holds its
    # place until the broker acknowledges it.
    common.positive(parser, options, "tight_queue")
    return options


@stoppable
def main(argv: Sequence[str] | None = None) -> int:
    options = arguments(argv)
    report.quiet_logging()
    # The registrar runs in this process and reconnects after every
    # broker fault; its warnings say nothing about the devices.
    logging.getLogger("device_agent.session").setLevel(logging.ERROR)
    started = time.monotonic()
    plan = [(f"net-{s}", s == "tpm", 1000) for s in options.stores]
    plan.append((f"net-{TIGHT}", False, options.tight_queue))

    with (
        world(registered=[n for n, _, _ in plan]) as here,
        common.scratch("network-") as logs,
    ):
        agents = []
        for name, tpm, queue in plan:
            device = common.enrolled(here, name, tpm)
            agents.append(Agent(here, device, queue, options, logs))
        campaign = Campaign(here, agents, options)
        rows = []
        try:
            for agent in agents:
                agent.start()
            for agent in agents:
                agent.wait_connected(30)
            time.sleep(SETTLE)
            campaign.run()
            for agent in agents:
                agent.drain(DRAIN_TIMEOUT)
        except CheckError as exc:
            campaign.failures.append(str(exc))
        finally:
            for agent in agents:
                agent.stop()
        for agent in agents:
            try:
                row, problems = deliveries(agent)
            except CheckError as exc:
                campaign.failures.append(str(exc))
                continue
            rows.append(row)
            campaign.failures += problems

    seconds = time.monotonic() - started
    for table in build_tables(campaign, rows, seconds):
        table.print()
        print()
    return 1 if common.failed(campaign.failures) else 0


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
