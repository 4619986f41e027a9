"""Renewal against a real registrar, mosquitto and swtpm."""

from __future__ import annotations

import itertools
import json
import signal
import time

import pytest
from device_cli import Device

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
    return json.loads(device.run("status", "--json").out)


def generations(device: Device, lineage: str = "ldevid") -> list[str]:
    root = device.state / lineage / "generations"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


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
    world = registrar_world
    world.start_registrar(lifetime=6)
    device = bring_up(tmp_path, world, swtpm.tcti)
    idevid_before = device.snapshot("idevid")

    agent = device.start()
    try:
        wait_for(
            lambda: len(world.registry.issuances(world.device_id)) >= 4,
            60,
            "four operational certificates",
        )
        wait_for(
            lambda: len(generations(device)) == 1,
            10,
            "old generations retired",
        )
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
    assert log.count("u'dev-1'") >= 5
