"""Defects a new user met in the device-agent CLI, each pinned by a test."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from device_cli import Device, wait_for
from sim_cli import assert_refused, invoke, tree
from test_renewal import bring_up, one_line_error, stop

from device_agent.agent import Agent
from device_agent.config import load


def agent_status(device: Device) -> dict:
    path = device.state / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# -- renew --now against a running agent ------------------------------


def test_renew_now_reports_a_refusal_the_agent_already_met(
    tmp_path, registrar_world
):
    world = registrar_world
    world.registry.set_status(world.device_id, "revoked")
    device = bring_up(tmp_path, world, None)
    agent = device.start()
    try:
        wait_for(
            lambda: agent_status(device).get("state") == "needs_service",
            30,
            "the refusal for good",
        )
        before = agent_status(device)["failures_in_row"]
        result = device.run("renew", "--now", check=False)
        line = one_line_error(result)
        assert "revoked" in line
        assert "one attempt made although the device needs service" in line
        assert "no answer" not in line
        assert "asked the running agent" in result.out
        # It was a real attempt, not the old refusal read back.
        assert agent_status(device)["failures_in_row"] == before + 1
    finally:
        stop(agent)


def test_renew_now_without_a_session_in_needs_service_answers_at_once(
    tmp_path, registrar_world
):
    device = bring_up(tmp_path, registrar_world, None)
    agent = Agent(lambda: load(device.config))
    agent._recover()
    # The broker refused every credential: no session, none coming soon.
    agent.state = "needs_service"
    agent.next_connect = agent.now() + 3600
    agent.next_heartbeat = agent.now() + 3600
    agent._on_renew(signal.SIGUSR1, None)
    agent._tick()
    assert agent.renew_requests_answered == 1
    assert "not attempted: the device needs service" in agent.renew_answer
    written = agent_status(device)["renew_now"]
    assert written == {"answered": 1, "answer": agent.renew_answer}
    assert not agent._renew_now
    assert os.getpid() == agent_status(device)["pid"]


# -- a state directory open to others, and what status notices ---------


@pytest.fixture
def device(tmp_path, factory_ca):
    """A software-key device with its factory identity installed."""
    made = Device(tmp_path, None)
    made.init(1, factory_ca.root_path)
    made.enroll(factory_ca)
    return made


def status_json(device: Device, *options: str) -> tuple[dict, object]:
    result = device.run(*options, "status", "--json", check=False)
    return json.loads(result.out), result


def problems(report: dict, level: str = "error") -> list[str]:
    return [p["problem"] for p in report["problems"] if p["level"] == level]


def test_connect_and_csr_refuse_a_state_dir_open_to_others(device):
    device.state.chmod(0o755)
    before = device.snapshot()
    for verb in (["connect"], ["csr"]):
        line = one_line_error(device.run(*verb, check=False))
        assert "open to group or others (mode 0755)" in line, verb
        assert "chmod 700" in line
    assert device.snapshot() == before


def test_status_flags_a_state_dir_open_to_others(device):
    device.state.chmod(0o755)
    result = device.run("status", check=False)
    assert "key in software" in result.out  # still shows what it can
    assert "PROBLEM:" in result.out
    assert "open to group or others" in result.out
    one_line_error(result)
    report, result = status_json(device)
    assert result.returncode != 0
    assert any("open to group" in p for p in problems(report))


def test_status_of_a_healthy_device_has_no_problems(device):
    report, result = status_json(device)
    assert result.returncode == 0, result.err
    assert report["problems"] == []
    assert "PROBLEM" not in device.run("status").out


def test_status_names_a_garbage_key(device):
    (key,) = (device.state / "idevid" / "generations").glob("*/key.*")
    key.write_bytes(b"garbage, not a key\n")
    result = device.run("status", check=False)
    assert "factory: key unreadable: not a key" in result.out
    one_line_error(result)


def test_status_names_a_broken_current_pointer(device):
    current = device.state / "idevid" / "current"
    current.unlink()
    current.symlink_to("generations/0099")
    result = device.run("status", check=False)
    assert "factory: current pointer broken" in result.out
    assert "generations/0099" in result.out
    one_line_error(result)


def test_status_ignores_an_agent_status_file_with_wrong_types(device):
    (device.state / "status.json").write_text(
        json.dumps({"state": "connected", "failures_in_row": None})
    )
    result = device.run("status")
    assert "None in a row" not in result.out
    assert "warning:" in result.out
    assert "agent status file unreadable (ignored)" in result.out
    report, _ = status_json(device)
    assert report["agent"] is None
    assert problems(report, "warning")


def test_status_notices_another_devices_store(device):
    report, result = status_json(device, "--set", "device_id=sw-01")
    assert result.returncode != 0
    (problem,) = problems(report)
    assert "certificate names another device (CN=dev-0042)" in problem
    assert "sw-01" in problem


# -- init checks the CA file it is given --------------------------------


@pytest.mark.parametrize("content", [b"", b"garbage\n", b"\x00" * 64])
def test_init_refuses_a_ca_file_without_a_certificate(tmp_path, content):
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(content)
    device = Device(tmp_path, None)
    line = one_line_error(
        device.run(
            "init", "--device-id", "d1", "--state-dir", str(device.state),
            "--broker", "127.0.0.1:1", "--ca-file", str(ca_file),
            check=False,
        )
    )  # fmt: skip
    assert "ca_file" in line and "not a CA certificate bundle" in line
    assert not device.config.exists()
    assert not device.state.exists()


# -- the registrar: one per directory, never knocked off -----------------


def test_a_second_registrar_cannot_knock_the_first_off(registrar_world):
    from firmware_sim.registrar import Registrar

    world = registrar_world
    first = world.registrar
    second = Registrar(
        world.operational_ca, world.registry, world.host, world.port,
        world.ca_bundle, world.layout.chain_path, world.layout.key_path,
    )  # fmt: skip
    second.start()
    try:
        assert first.client_id != second.client_id
        assert first.client_id.startswith("registrar.")
        assert f".{os.getpid()}." in first.client_id
        time.sleep(1.0)  # a taken-over session is closed at once
        assert first._session.connected
        assert second._session.connected
    finally:
        second.stop()


def test_a_second_registrar_run_on_one_directory_is_refused(
    registrar_world,
):
    world = registrar_world
    argv = [
        sys.executable, "-m", "firmware_sim", "registrar", "run",
        "--dir", str(world.layout.ca_dir.parent),
        "--broker", f"127.0.0.1:{world.port}",
        "--ca-file", str(world.ca_bundle),
    ]  # fmt: skip
    serving = subprocess.Popen(
        argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        assert "registrar serving" in serving.stderr.readline()
        second = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, check=False
        )
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"a registrar (pid {serving.pid}) serves" in lines[0]
        assert serving.poll() is None
    finally:
        serving.send_signal(signal.SIGTERM)
        serving.communicate(timeout=15)
    assert serving.returncode == 0


# -- device ids at the registrar -----------------------------------------


REFUSED_IDS = [
    ("add", "x" * 5000),
    ("add", "x" * 65),
    ("add", "bad/id"),
    ("add", ".dot"),
    ("add", "registrar"),
    ("revoke", "x" * 5000),
    ("decommission", "x" * 5000),
]


@pytest.mark.parametrize(("command", "device_id"), REFUSED_IDS)
def test_registrar_refuses_a_device_id_the_agent_cannot_have(
    tmp_path, command, device_id
):
    directory = tmp_path / "registrar"
    assert (
        invoke(["registrar", "init", "--dir", str(directory)]).exit_code == 0
    )
    before = tree(directory)
    result = invoke(["registrar", command, device_id, "--dir", str(directory)])
    assert_refused(result, "DEVICE_ID")
    assert len(result.output) < 300
    assert tree(directory) == before
