"""The daemon's decisions under a wrong clock and odd CAs (in-process)."""

from __future__ import annotations

import json
import signal
import socket
import threading
import time

import pytest
from device_cli import Device, wait_for
from test_renewal import active, bring_up, generations

from device_agent import config
from device_agent.agent import LAST_GOOD_FILE, Agent
from device_agent.core import clock

DAY = 86400.0


class Clock:
    """A wall clock the test can set; it runs with real time otherwise."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
def make_agent(tmp_path, registrar_world):
    agents = []

    def make(wall: Clock, lifetime: int = 120, **options) -> Agent:
        registrar_world.start_registrar(lifetime=lifetime, **options)
        device = bring_up(tmp_path, registrar_world, None)
        agent = Agent(lambda: config.load(device.config), now=wall)
        agent.device = device
        agent._recover()
        agent.last_good = agent._read_last_good()
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent._shutdown()


def issued(world) -> int:
    return len(world.registry.issuances(world.device_id))


def test_first_tick_enrolls_an_operational_identity(
    make_agent, registrar_world
):
    agent = make_agent(Clock())
    agent._tick()
    assert agent.identity[0] == "ldevid"
    assert issued(registrar_world) == 1
    assert agent.next_renewal > time.time() + 30


def test_clock_months_back_at_boot_decides_nothing(
    make_agent, registrar_world
):
    wall = Clock()
    agent = make_agent(wall)
    agent._tick()  # enrolls with a good clock and records it
    agent._write_last_good(time.time())
    agent.last_good = agent._read_last_good()
    before = active(agent.device)
    count = issued(registrar_world)

    wall.offset = -90 * DAY  # a board without an RTC, booted offline
    agent._renew_now = False
    agent.next_renewal = 0.0  # even an overdue renewal must wait
    agent._tick()
    assert agent._summary() == "clock_untrusted"
    assert "behind the last known-good" in agent.clock_reason
    assert issued(registrar_world) == count
    assert active(agent.device) == before

    wall.offset = 0.0  # NTP fixed it: work resumes within one tick
    agent._tick()
    assert agent.clock_state == "trusted"
    assert issued(registrar_world) == count + 1


def test_deleting_the_known_good_time_trusts_the_clock_without_a_restart(
    make_agent, registrar_world
):
    """What status advises for a known-good time in the future works."""
    agent = make_agent(Clock())
    agent._tick()
    path = agent.device.state / LAST_GOOD_FILE
    agent._write_last_good(4102444800.0)  # 2100: a board once ran there
    agent.last_good = agent._read_last_good()
    agent._tick()
    assert agent.clock_state == "untrusted"
    assert f"delete {path}" in agent.clock_reason

    path.unlink()
    agent._tick()
    assert agent.clock_state == "trusted"
    assert agent.last_good is not None and agent.last_good < 4102444800.0


def test_renewals_an_operator_asks_for_are_never_a_loop(
    make_agent, registrar_world
):
    """renew --now, again and again, renews each time and stays scheduled."""
    agent = make_agent(Clock())
    agent._tick()
    count = issued(registrar_world)
    for _ in range(5):
        agent._renew_now = True
        agent._tick()
        assert agent.state == "connected", agent.last_result
    assert issued(registrar_world) == count + 5
    assert agent.next_renewal > time.time() + 30

    # Scheduled renewals that keep coming due at once still are a loop.
    for _ in range(5):
        agent.next_renewal = 0.0
        agent._tick()
    assert agent.state == "renewal_loop"


def test_jump_forward_past_the_renewal_point_renews_on_the_next_tick(
    make_agent, registrar_world
):
    wall = Clock()
    agent = make_agent(wall)
    agent._tick()
    count = issued(registrar_world)
    due = agent.next_renewal
    wall.offset = due - time.time() + 1  # suspend, resume after the due time
    agent._tick()
    assert issued(registrar_world) == count + 1


def test_jump_back_stops_renewal_decisions(make_agent, registrar_world):
    wall = Clock()
    agent = make_agent(wall)
    agent._tick()
    agent.last_good = time.time()
    count = issued(registrar_world)
    wall.offset = -3600
    agent.next_renewal = 0.0
    agent._tick()
    assert agent.clock_state == "untrusted"
    assert issued(registrar_world) == count


def test_a_backdating_ca_does_not_cause_a_renewal_storm(
    make_agent, registrar_world
):
    agent = make_agent(Clock(), lifetime=60, backdate=3600)
    agent._tick()
    assert agent.identity[0] == "ldevid"
    assert agent.next_renewal - time.time() > 20


def test_a_ca_capping_the_lifetime_is_renewed_by_the_real_lifetime(
    make_agent, registrar_world
):
    agent = make_agent(Clock(), lifetime=120, max_lifetime=6)
    agent._tick()
    assert agent.leaf is not None
    lifetime = agent.leaf.not_valid_after_utc - agent.leaf.not_valid_before_utc
    assert lifetime.total_seconds() <= 6
    assert agent.next_renewal - time.time() <= 6


def test_last_good_time_survives_garbage(tmp_path):
    assert clock.decode_last_good("not a time") is None
    assert clock.decode_last_good(clock.encode_last_good(1234.5)) == 1234.5
    assert LAST_GOOD_FILE


def test_a_failing_tick_is_reported_and_the_agent_goes_on(
    make_agent, monkeypatch
):
    agent = make_agent(Clock())
    agent._tick()

    def broken(now):
        raise OSError(28, "No space left on device", "/state/x")

    monkeypatch.setattr(agent, "_heartbeat", broken)
    agent.next_heartbeat = 0.0
    monkeypatch.setattr(agent._wake, "wait", lambda seconds: None)
    agent._guarded_tick()
    assert agent.state == "error"
    assert "/state/x: No space left on device" in agent.last_result
    assert agent.tick_failures == 1

    monkeypatch.undo()
    agent._guarded_tick()
    assert agent.tick_failures == 0
    assert agent.state == "connected"


# -- start-up and stop, with the real agent process ---------------------


def written_status(device: Device) -> dict:
    try:
        return json.loads((device.state / "status.json").read_text())
    except (OSError, ValueError):
        return {}


@pytest.fixture
def silent_broker():
    """A TCP port that accepts connections and never says a word."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted = []

    def accept() -> None:
        while True:
            try:
                accepted.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()
    for conn in accepted:
        conn.close()


def stop_within(process, seconds: float) -> float:
    """SIGTERM the agent; return how long it took to exit cleanly."""
    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=30)
    assert process.returncode == 0, out
    assert "Traceback" not in out
    took = time.monotonic() - started
    assert took < seconds, out
    return took


@pytest.fixture
def silent_device(tmp_path, factory_ca, silent_broker):
    """A device whose broker accepts TCP and never answers."""
    device = Device(tmp_path, None)
    device.init(silent_broker, factory_ca.root_path)
    device.enroll(factory_ca)
    device.configure(connect_timeout=20)
    return device


def test_run_replaces_the_last_runs_status_before_it_connects(
    silent_device,
):
    device = silent_device
    old = {"pid": 1, "state": "stopped", "last_result": "from the old run"}
    (device.state / "status.json").write_text(json.dumps(old))

    agent = device.start()
    try:
        report = wait_for(
            lambda: (
                written_status(device).get("pid") == agent.pid
                and written_status(device)
            ),
            10,
            "the new run's status",
        )
        assert report["state"] in ("starting", "connecting")
        assert report["last_result"] != "from the old run"
        shown = device.run("status", check=False).out
        assert "(running)" in shown and "stopped (running)" not in shown
    finally:
        stop_within(agent, 10)


def test_sigterm_while_connecting_is_a_stop_not_a_failure(
    silent_device, silent_broker
):
    device = silent_device

    agent = device.start()
    wait_for(
        lambda: written_status(device).get("state") == "connecting",
        10,
        "the agent to connect",
    )
    time.sleep(1.0)
    stop_within(agent, 5)

    report = written_status(device)
    assert report["state"] == "stopped"
    assert report["last_result"] == (
        f"stopped while waiting for the broker at 127.0.0.1:{silent_broker}"
    )
    assert report["failures_in_row"] == 0


def test_sigterm_while_awaiting_the_registrar_is_a_stop_not_a_failure(
    tmp_path, registrar_world
):
    registrar_world.registrar.stop()  # the request goes unanswered
    device = bring_up(tmp_path, registrar_world, None, enroll_timeout=30)

    agent = device.start()
    wait_for(
        lambda: written_status(device).get("state") == "connected",
        15,
        "the factory credential to connect",
    )
    time.sleep(1.5)  # key, CSR, request out: now waiting for the answer
    stop_within(agent, 8)

    report = written_status(device)
    assert report["state"] == "stopped"
    assert report["last_result"] == (
        "stopped while waiting for the registrar's answer"
    )
    assert report["failures_in_row"] == 0
    assert report["identity"] == "idevid"
    assert generations(device) == []  # the abandoned key is gone
