"""Sessions survive a broker restart and a TPM restart (real parts)."""

from __future__ import annotations

import subprocess
import sys
import time

from device_cli import Device, wait_for

from device_agent import config, credential


def device_session(tmp_path, tcti, factory_ca, broker):
    device = Device(tmp_path, tcti)
    device.init(broker.port, factory_ca.root_path)
    device.enroll(factory_ca)
    settings = config.load(device.config)
    session = credential.open_session(settings)
    session.reconnect_base = 0.2
    session.reconnect_cap = 1.0
    return device, session


def test_reconnects_after_a_broker_restart_and_resubscribes(
    tmp_path, factory_ca, broker_factory
):
    broker = broker_factory()
    device, session = device_session(tmp_path, None, factory_ca, broker)
    topic = f"devices/{device.id}/echo"
    session.open()
    try:
        session.subscribe(topic)
        broker.stop()
        wait_for(lambda: not session.connected, 10, "the drop")
        broker.start()
        wait_for(lambda: session.connected, 15, "the reconnect")
        time.sleep(0.3)  # let the restored subscription reach the broker
        session.publish(topic, b"after")
        assert session.messages.get(timeout=5).payload == b"after"
    finally:
        session.close()


# What both session scripts begin with: a session for the device whose
# config is argv[1], reconnecting fast.
_OPEN_SESSION = """
import sys, time
from pathlib import Path
from device_agent import config, credential
settings = config.load(Path(sys.argv[1]))
session = credential.open_session(settings)
session.reconnect_base = 0.2
session.reconnect_cap = 1.0
session.open()
"""

_HOLD_SESSION = (
    _OPEN_SESSION
    + """
print("up", flush=True)
sys.stdin.readline()
deadline = time.monotonic() + 20
while time.monotonic() < deadline:
    time.sleep(0.2)
    try:
        session.publish(sys.argv[2], b"1")
    except Exception:
        continue
    print("published", flush=True)
    break
session.close()
"""
)


def test_reconnects_after_a_tpm_restart(
    tmp_path, swtpm, factory_ca, broker_factory
):
    """The key the old TLS context loaded died with the TPM; the session
    builds a new context and signs with the reloaded key."""
    broker = broker_factory()
    device = Device(tmp_path, swtpm.tcti)
    device.init(broker.port, factory_ca.root_path)
    device.enroll(factory_ca)
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLD_SESSION, str(device.config),
         f"devices/{device.id}/x"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "up"
        swtpm.stop()
        swtpm.start()
        broker.stop()  # drops the session: the reconnect must sign anew
        broker.start()
        process.stdin.write("go\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "published"
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()


_TAKEN_OVER = (
    _OPEN_SESSION
    + """
print(session.client_id, flush=True)
sys.stdin.readline()
print("connected" if session.connected else "down", flush=True)
session.close()
"""
)


def test_takeovers_leak_no_tpm_object(
    tmp_path, swtpm, factory_ca, broker_factory, make_identity, mqtt_probe
):
    """Another client taking the session's id over and over: the session
    comes back each time and loads its key only once."""
    broker = broker_factory()
    device = Device(tmp_path, swtpm.tcti)
    device.init(broker.port, factory_ca.root_path)
    device.enroll(factory_ca)
    process = subprocess.Popen(
        [sys.executable, "-c", _TAKEN_OVER, str(device.config)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        client_id = process.stdout.readline().strip()
        twin = make_identity(device.id)
        for _ in range(5):
            probe = mqtt_probe(client_id)
            assert probe.connect(broker.port, factory_ca.root_path, twin)
            probe.close()
            time.sleep(0.3)
        assert len(swtpm.transient_handles()) <= 1
        reconnects = broker.log_text().count(f"as {client_id} ")
        assert reconnects >= 2
        time.sleep(2.5)
        process.stdin.write("go\n")
        process.stdin.flush()
        assert process.stdout.readline().strip() == "connected"
        assert process.wait(timeout=10) == 0
    finally:
        process.kill()
        process.wait()
    assert swtpm.transient_handles() == []
