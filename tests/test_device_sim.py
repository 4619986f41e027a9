"""A simulated device boots the real agent, reports, stops and resets."""

from __future__ import annotations

from device_cli import wait_for

from firmware_sim.device import SOFTWARE, DeviceError, SimDevice
from firmware_sim.factory import FactoryLine


def operational(device) -> bool:
    status = device.status() or {}
    return status.get("state") == "connected" and (
        status.get("identity") == "ldevid"
    )


def test_device_boots_enrolls_and_is_reset(tmp_path, registrar_world):
    world = registrar_world
    device = SimDevice(tmp_path / "dev-1", "dev-1", "SN-1", SOFTWARE)
    device.configure(
        "127.0.0.1",
        world.port,
        world.factory_ca.root_path,
        world.ca_bundle,
        heartbeat_interval=1,
        retry_base=1,
        retry_cap=2,
    )
    with FactoryLine(world.factory_ca, tmp_path / "line.sqlite") as line:
        record = line.manufacture(device)
    assert device.status() is None

    device.start()
    try:
        wait_for(lambda: operational(device), 20, "dev-1 to enroll")
        status = device.status()
        assert status["pid"] == device.process.pid
        issued = world.registry.issuances("dev-1")
        assert int(status["serial"], 16) == issued[-1].cert_serial
        try:
            device.factory_reset()
        except DeviceError as exc:
            assert "stop the agent" in str(exc)
        else:
            raise AssertionError("reset while running was allowed")
    finally:
        device.stop()

    assert not device.running
    assert device.status()["state"] == "stopped"
    assert device.factory_reset() >= 1
    assert device.leaf("ldevid") is None
    assert device.leaf("idevid").serial_number == record.cert_serial

    device.start()
    try:
        wait_for(lambda: operational(device), 20, "dev-1 to enroll again")
        assert len(world.registry.issuances("dev-1")) == len(issued) + 1
    finally:
        device.kill()
    assert not device.running
    # Killed, the agent wrote no "stopped": its last word stays.
    assert device.status()["state"] == "connected"
