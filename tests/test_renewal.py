"""Renewal against a real registrar, mosquitto and swtpm."""

from __future__ import annotations

import itertools
import json
import signal
import socket
import time
from pathlib import Path

import pytest
from cryptography import x509
from device_cli import Device, wait_for

FAST = {
    "heartbeat_interval": 0.5,
    "renew_fraction": 0.5,
    "renew_jitter": 0.0,
    "renew_floor": 0.0,
    "retry_base": 0.5,
    "retry_cap": 2.0,
    "enroll_timeout": 3.0,
    "clock_skew": 5.0,
}


def bring_up(tmp_path, world, tcti, **settings) -> Device:
    """A device with its factory identity, configured for fast renewals."""
    device = Device(tmp_path, tcti, device_id=world.device_id)
    device.init(
        world.port,
        world.factory_ca.root_path,
        "--trust-anchor",
        str(world.ca_bundle),
    )
    device.enroll(world.factory_ca)
    device.configure(**{**FAST, **settings})
    return device


def status(device: Device) -> dict:
    """What ``status --json`` reports; it exits non-zero on a problem."""
    return json.loads(device.run("status", "--json", check=False).out)


def generations(device: Device, lineage: str = "ldevid") -> list[str]:
    root = device.state / lineage / "generations"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def stop(process) -> str:
    process.send_signal(signal.SIGTERM)
    try:
        out, _ = process.communicate(timeout=15)
    except Exception:
        process.kill()
        raise
    assert process.returncode == 0, out
    return out


@pytest.fixture
def heartbeat_listener(world_identity, mqtt_probe, registrar_world):
    """A second client of the same device that records heartbeats."""
    probe = mqtt_probe("listener")
    assert probe.connect(
        registrar_world.port, registrar_world.factory_ca.root_path,
        world_identity,
    )  # fmt: skip
    topic = f"devices/{registrar_world.device_id}/heartbeat"
    assert probe.subscribe(topic)[0].value < 0x80
    return probe


@pytest.fixture
def world_identity(make_identity, registrar_world):
    return make_identity(registrar_world.device_id)


def test_daemon_renews_with_a_new_tpm_key_each_time_without_a_gap(
    tmp_path, registrar_world, swtpm, heartbeat_listener
):
    """30-second certificates, renewed at half their life, three times."""
    world = registrar_world
    world.start_registrar(lifetime=30)
    device = bring_up(tmp_path, world, swtpm.tcti)
    idevid_before = device.snapshot("idevid")

    agent = device.start()
    try:
        wait_for(
            lambda: len(world.registry.issuances(world.device_id)) >= 4,
            120,
            "four operational certificates",
        )
        wait_for(
            lambda: len(generations(device)) == 1,
            10,
            "old generations retired",
        )
        # The keys were made and used by a helper process: the daemon
        # itself never loaded the TSS bindings.
        maps = Path(f"/proc/{agent.pid}/maps").read_text()
        assert "_libtpm2_pytss" not in maps
        assert "libtss2-fapi" not in maps
    finally:
        out = stop(agent)

    issued = world.registry.issuances(world.device_id)
    serials = {f"{i.cert_serial:x}" for i in issued}
    beats = [
        (m.timestamp, json.loads(m.payload))
        for m in heartbeat_listener.messages
        if m.topic.endswith("/heartbeat")
    ]
    seen = {b["serial"] for _, b in beats if b["identity"] == "ldevid"}
    assert len(seen) >= 3, out
    assert seen <= serials

    gaps = [b[0] - a[0] for a, b in itertools.pairwise(beats)]
    assert max(gaps) < 0.5 + 1.5, gaps

    keys = {
        p.read_bytes() for p in device.state.glob("ldevid/generations/*/key.*")
    }
    assert len(keys) == 1
    assert device.snapshot("idevid") == idevid_before
    assert swtpm.transient_handles() == []
    log = world.broker.log_text()
    generations_seen = {
        b["generation"] for _, b in beats if b["identity"] == "ldevid"
    }
    for number in generations_seen:
        assert f"as dev-1.ldevid.{number} " in log
    assert log.count("u'dev-1'") >= 5


def active(device: Device) -> dict[str, bytes | str]:
    """The operational credential in use: its pointer and its files."""
    link = device.state / "ldevid" / "current"
    target = link.readlink()
    files = {p.name: p.read_bytes() for p in (link.parent / target).iterdir()}
    return {"current": str(target), **files}


def one_line_error(result) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    return lines[0]


@pytest.fixture
def operational(tmp_path, registrar_world):
    """A software-key device that already holds an operational identity."""
    registrar_world.start_registrar(lifetime=120)
    device = bring_up(tmp_path, registrar_world, None)
    device.run("renew", "--now")
    return device


@pytest.mark.parametrize(
    ("fault", "expect"),
    [
        ("refused", "registrar refused: busy"),
        ("down", "no answer from the registrar"),
        ("lost", "no answer from the registrar"),
        ("foreign-ca", "unknown-ca"),
    ],
)
def test_a_failed_renewal_changes_nothing_and_the_next_succeeds(
    operational, registrar_world, tmp_path, fault, expect
):
    world, device = registrar_world, operational
    before = active(device)
    if fault == "refused":
        world.start_registrar(lifetime=120, refuse_all="busy")
    elif fault == "down":
        world.registrar.stop()
    elif fault == "lost":
        world.start_registrar(lifetime=120, drop_responses=1)
    elif fault == "foreign-ca":
        from firmware_sim.ca import CertificateAuthority

        stranger = CertificateAuthority.create(tmp_path / "x", name="X")
        world.registrar.stop()
        world.registrar.ca = stranger
        world.registrar.start()

    line = one_line_error(device.run("renew", "--now", check=False))
    assert expect in line
    assert active(device) == before
    assert device.run("connect").returncode == 0

    world.start_registrar(lifetime=120)
    device.run("renew", "--now")
    assert active(device) != before
    assert len(generations(device)) == 1


@pytest.mark.parametrize(
    "step", ["key", "csr", "enroll", "verify", "stage", "connect", "commit"]
)
def test_killed_at_any_step_the_device_keeps_a_working_credential(
    operational, registrar_world, step
):
    device = operational
    before = active(device)
    killed = device.run(
        "renew", "--now", check=False,
        env={"DEVICE_AGENT_TEST_KILL_AT": step},
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL

    if step == "commit":
        assert active(device) != before  # the new one was already in use
    else:
        assert active(device) == before
    assert device.run("connect").returncode == 0
    device.run("renew", "--now")
    assert device.run("connect").returncode == 0
    assert len(generations(device)) == 1


def test_expired_operational_identity_is_replaced_through_the_factory_one(
    tmp_path, registrar_world
):
    world = registrar_world
    world.start_registrar(lifetime=2)
    device = bring_up(tmp_path, world, None)
    device.run("renew", "--now")
    expired = active(device)
    time.sleep(2.5)

    world.start_registrar(lifetime=120)
    device.run("renew", "--now")
    report = status(device)["identities"]["ldevid"]
    assert report["certificate"]["state"] == "valid"
    assert active(device) != expired
    assert len(generations(device)) == 1


def test_reset_destroys_the_operational_identity_and_keeps_the_factory_one(
    operational, registrar_world
):
    device = operational
    factory = device.snapshot("idevid")
    one_line_error(device.run("reset", check=False))  # needs --yes
    assert generations(device)

    device.run("reset", "--yes")
    assert not (device.state / "ldevid").exists()
    assert device.snapshot("idevid") == factory
    assert status(device)["identities"]["ldevid"]["key"] is None

    device.run("renew", "--now")  # enrolls again with the factory identity
    assert len(generations(device)) == 1


def test_daemon_signals_renew_now_and_reload(tmp_path, registrar_world):
    world = registrar_world
    world.start_registrar(lifetime=300)
    device = bring_up(tmp_path, world, None, heartbeat_interval=30.0)
    agent = device.start("-v")
    try:
        wait_for(
            lambda: (
                (status(device).get("agent") or {}).get("identity") == "ldevid"
            ),
            30,
            "an operational identity",
        )
        count = len(world.registry.issuances(world.device_id))
        result = device.run("renew", "--now")
        assert "asked the running agent" in result.out
        wait_for(
            lambda: len(world.registry.issuances(world.device_id)) > count,
            20,
            "a renewal on request",
        )
        agent.send_signal(signal.SIGHUP)
        wait_for(
            lambda: status(device)["agent"]["state"] == "connected",
            20,
            "reconnect after reload",
        )
        one_line_error(device.run("reset", "--yes", check=False))
    finally:
        out = stop(agent)
    assert "config reloaded" in out
    assert status(device)["agent"]["state"] == "stopped"
    assert status(device)["agent"]["running"] is False


def test_a_second_daemon_on_the_same_state_is_refused(
    tmp_path, registrar_world
):
    device = bring_up(tmp_path, registrar_world, None)
    agent = device.start()
    try:
        wait_for((device.state / "agent.pid").exists, 20, "pid")
        second = device.run("run", check=False)
        assert "held by another" in one_line_error(second)
    finally:
        stop(agent)


def test_daemon_tells_systemd_and_runs_the_hook(tmp_path, registrar_world):

    world = registrar_world
    world.start_registrar(lifetime=300)
    record = tmp_path / "hook.txt"
    hook = tmp_path / "hook.sh"
    hook.write_text(
        # The hook's variables must not read as the agent's own settings
        # to a device-agent command the hook runs.
        f'#!/bin/sh\necho "$RENEWED_SERIAL $RENEWED_DEVICE_ID '
        f'[$DEVICE_AGENT_SERIAL]" >> {record}\n'
    )
    hook.chmod(0o755)
    device = bring_up(tmp_path, world, None, renewal_hook=str(hook))

    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(20)
    agent = device.start(
        env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "2000000"}
    )
    try:
        said = []
        while not any("READY=1" in s for s in said) or not any(
            "WATCHDOG=1" in s for s in said
        ):
            said.append(listener.recv(4096).decode())
        wait_for(record.exists, 20, "the renewal hook")
    finally:
        stop(agent)
        listener.close()
    serial, device_id, clash = record.read_text().split()
    assert clash == "[]"
    issued = world.registry.issuances(world.device_id)
    assert serial == f"{issued[-1].cert_serial:x}"
    assert device_id == world.device_id
    assert any("STATUS=" in s for s in said)


def test_an_agent_without_a_broker_is_ready_and_warns_of_the_watchdog(
    tmp_path, registrar_world
):
    """READY=1 means running: a board that boots offline is not killed
    by the unit's start timeout; a timeout longer than the watchdog's
    half interval is named at start."""
    from tpm_simulator.ports import free_port

    device = bring_up(tmp_path, registrar_world, None)
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(20)
    nobody = free_port()
    agent = device.start(
        "--set", f"broker_port={nobody}",
        env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "8000000"},
    )  # fmt: skip
    try:
        said = listener.recv(4096).decode()
        while "READY=1" not in said:
            said = listener.recv(4096).decode()
    finally:
        out = stop(agent)
        listener.close()
    assert "STATUS=" in said
    assert "connected" not in said.replace("connecting", "")
    assert "half the service's WatchdogSec (8 s)" in out


@pytest.mark.parametrize("kind", ["slow", "failing"])
def test_the_renewal_hook_never_holds_up_the_agent(
    tmp_path, registrar_world, kind
):
    """A hook that takes long runs beside heartbeats and a stop; a failing
    one has its stderr logged."""
    world = registrar_world
    world.start_registrar(lifetime=300)
    started = tmp_path / "hook-started"
    child = tmp_path / "hook-child.pid"
    hook = tmp_path / "hook.sh"
    body = (
        f"sleep 30 & echo $! > {child}; wait"
        if kind == "slow"
        else "echo no such printer >&2; exit 3"
    )
    hook.write_text(f"#!/bin/sh\ntouch {started}\n{body}\n")
    hook.chmod(0o755)
    device = bring_up(tmp_path, world, None, renewal_hook=str(hook))

    agent = device.start()
    try:
        wait_for(started.exists, 20, "the renewal hook")
        beats = status(device)["agent"]
        time.sleep(2.5)  # five heartbeats at 0.5 s, if nothing blocks
        assert status(device)["agent"]["state"] == "connected", beats
        if kind == "failing":
            time.sleep(0.5)
    finally:
        began = time.monotonic()
        out = stop(agent)
    assert time.monotonic() - began < 5, "the stop waited for the hook"
    if kind == "failing":
        assert "renewal hook exited 3: no such printer" in out
    else:
        # Nothing the hook started outlives the agent.
        assert "1 renewal hook(s) still running were stopped" in out
        pid = int(child.read_text())
        wait_for(lambda: not _alive(pid), 5, "the hook's child to end")


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1]
    except FileNotFoundError:
        return False
    return state.split()[0] != "Z"


def test_only_one_renewal_at_a_time(operational):
    from device_agent.renewal import RENEWAL_LOCK
    from device_agent.store import CredentialStore

    before = active(operational)
    with CredentialStore(operational.state).lock(name=RENEWAL_LOCK):
        result = operational.run("renew", "--now", check=False)
    assert "held by another" in one_line_error(result)
    assert active(operational) == before


def test_a_credential_changed_by_someone_else_is_not_overwritten(
    operational, registrar_world
):
    from device_agent import config, credential
    from device_agent.credential import OPERATIONAL
    from device_agent.enroll.mqtt import MqttEnroller
    from device_agent.errors import RenewalError
    from device_agent.renewal import renew

    settings = config.load(operational.config)
    link = operational.state / "ldevid" / "current"
    chain_file = link / "chain.pem"

    class Meddling(MqttEnroller):
        def enroll(self, csr_pem, timeout):
            answer = super().enroll(csr_pem, timeout)
            chain_file.write_bytes(chain_file.read_bytes() + b"\n")
            return answer

    lineage, generation = credential.best_credential(settings)
    session = credential.open_session(settings, generation, lineage)
    session.open()
    try:
        with pytest.raises(RenewalError, match="changed on disk"):
            renew(
                settings,
                Meddling(session, settings.device_id),
                lambda g: credential.open_session(settings, g, OPERATIONAL),
            )
    finally:
        session.close()
    assert chain_file.read_bytes().endswith(b"\n\n")
    assert len(generations(operational)) == 1


def test_operational_identity_by_file(tmp_path, registrar_world):
    """A CA reached only by file: keygen, csr and install-chain with
    --identity operational make an operational identity by hand."""
    from firmware_sim.ca import chain_pem

    world = registrar_world
    device = bring_up(tmp_path, world, None)
    device.run("keygen", "--identity", "operational")
    request = x509.load_pem_x509_csr(
        device.run("csr", "--identity", "operational").stdout
    )
    path = tmp_path / "operational.pem"
    path.write_bytes(chain_pem(world.operational_ca.sign_csr(request)))
    device.run("install-chain", "--identity", "operational", str(path))
    report = status(device)["identities"]["ldevid"]
    assert report["certificate"]["state"] == "valid"
    assert "Device Operations" in report["certificate"]["issuer"]
    assert "with the ldevid credential 1 " in device.run("connect").out


def test_daemon_survives_an_unusable_credential_and_reenrolls(
    tmp_path, registrar_world
):
    """The operational chain is damaged under a running agent and the link
    drops: the agent falls back to the factory identity, enrolls again,
    and says what happened; it never exits."""
    world = registrar_world
    world.start_registrar(lifetime=300)
    device = bring_up(tmp_path, world, None)
    agent = device.start()
    try:
        wait_for(
            lambda: (
                (status(device).get("agent") or {}).get("identity") == "ldevid"
            ),
            30,
            "an operational identity",
        )
        first = status(device)["agent"]["generation"]
        current = device.state / "ldevid" / "current" / "chain.pem"
        world.broker.stop()
        current.write_bytes(b"garbage\n")
        # A failed reconnect makes the session build its TLS context anew,
        # from the damaged file.
        wait_for(
            lambda: status(device)["agent"]["state"] != "connected",
            20,
            "the agent to notice the link dropped",
        )
        time.sleep(2)
        world.broker.start()
        wait_for(
            lambda: (
                (status(device).get("agent") or {}).get("generation")
                not in (None, first)
                and status(device)["agent"]["state"] == "connected"
            ),
            60,
            "a new operational identity",
        )
        assert agent.poll() is None
    finally:
        out = stop(agent)
    assert "Traceback" not in out
    assert status(device)["identities"]["ldevid"]["certificate"]["state"] == (
        "valid"
    )
