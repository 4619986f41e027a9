"""Bring-up and renewal against a two-node RabbitMQ cluster (MQTT 3.1.1).

One cluster serves the whole module: RabbitMQ takes well over ten
seconds to boot, so the tests share it and each uses its own device
names. Devices connect with their certificate alone (EXTERNAL), as they
do to mosquitto.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import Identity, MqttProbe
from device_cli import Device, wait_for

from firmware_sim import registrar as registrar_module
from firmware_sim.ca import CertificateAuthority, chain_pem, key_pem
from firmware_sim.rabbitmq import RabbitMQ, filter_pattern
from firmware_sim.registrar import Registrar
from firmware_sim.registry import Registry
from tpm_simulator.errors import PortInUseError
from tpm_simulator.ports import free_port

# One cluster per module is only true on one test worker: with pytest-xdist
# run the suite with --dist loadgroup so that this group stays together.
pytestmark = pytest.mark.xdist_group("rabbitmq")

MQTT = "3.1.1"
LIFETIME = 10
DEVICES = ("dev-tpm", "dev-sw", "dev-other", "dev-renew")

FAST = {
    "mqtt_version": MQTT,
    "heartbeat_interval": 0.5,
    "renew_fraction": 0.5,
    "renew_jitter": 0.0,
    "renew_floor": 0.0,
    "retry_base": 0.5,
    "retry_cap": 2.0,
    "enroll_timeout": 3.0,
    "clock_skew": 5.0,
}


@dataclasses.dataclass
class RabbitWorld:
    """A two-node cluster, both CAs and a registrar on the first node."""

    cluster: RabbitMQ
    factory_ca: CertificateAuthority
    operational_ca: CertificateAuthority
    ca_bundle: Path
    registry: Registry
    registrar: Registrar
    directory: Path

    def identity(
        self, name: str, ca: CertificateAuthority | None = None
    ) -> Identity:
        """A software key and a certificate for ``name``, as files."""
        chain, key = (ca or self.factory_ca).issue_client_cert(name)
        directory = self.directory / "identities" / name
        directory.mkdir(parents=True, exist_ok=True)
        chain_path = directory / "chain.pem"
        key_path = directory / "key.pem"
        chain_path.write_bytes(chain_pem(chain))
        key_path.write_bytes(key_pem(key))
        key_path.chmod(0o600)
        return Identity(name, chain, chain_path, key_path)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> RabbitWorld:
    base = tmp_path_factory.mktemp("rabbit")
    factory_ca = CertificateAuthority.create(base / "factory-ca")
    layout = registrar_module.prepare(base / "registrar")
    operational_ca = CertificateAuthority.load(layout.ca_dir)
    bundle = base / "client-cas.pem"
    bundle.write_bytes(
        factory_ca.root_path.read_bytes() + layout.root_path.read_bytes()
    )
    chain, key = factory_ca.issue_server_cert()
    (base / "server.pem").write_bytes(chain_pem(chain))
    (base / "server.key").write_bytes(key_pem(key))

    cluster = start_cluster(base, bundle)
    registry = Registry(layout.registry_path)
    registrar = Registrar(
        operational_ca, registry, "127.0.0.1", cluster.ports[0], bundle,
        layout.chain_path, layout.key_path,
        lifetime=LIFETIME, mqtt_version=MQTT,
    )  # fmt: skip
    try:
        for device_id in DEVICES:
            registry.add(device_id)
        registrar.start()
        yield RabbitWorld(
            cluster, factory_ca, operational_ca, bundle, registry,
            registrar, base,
        )  # fmt: skip
    finally:
        registrar.stop()
        registry.close()
        cluster.stop()


def start_cluster(base: Path, bundle: Path) -> RabbitMQ:
    for attempt in range(3):
        cluster = RabbitMQ(
            base / f"rabbitmq-{attempt}",
            [free_port(), free_port()],
            bundle,
            base / "server.pem",
            base / "server.key",
            devices=DEVICES,
            service_users={
                registrar_module.NAME: list(registrar_module.ACL_TOPICS)
            },
        )
        try:
            cluster.start()
        except PortInUseError:
            continue
        return cluster
    raise AssertionError("no free ports for RabbitMQ")


class Probe(MqttProbe):
    """The shared MQTT probe, speaking 3.1.1 as RabbitMQ 3.10 needs."""

    def __init__(self, client_id: str) -> None:
        super().__init__(client_id)
        callbacks = self.client
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        for name in ("on_connect", "on_disconnect", "on_message"):
            setattr(self.client, name, getattr(callbacks, name))
        self.client.on_subscribe = self._on_subscribe

    @property
    def gone(self) -> bool:
        return self._gone

    def try_subscribe(self, topic: str) -> bool:
        """Whether the broker granted it; RabbitMQ hangs up if not."""
        _, mid = self.client.subscribe(topic, qos=1)
        with self._changed:
            self._changed.wait_for(
                lambda: mid in self.subacks or self._gone, 5.0
            )
        granted = mid in self.subacks and self.subacks[mid][0].value < 0x80
        return granted and not self._gone


@pytest.fixture
def probe():
    made: list[Probe] = []

    def make(client_id: str) -> Probe:
        made.append(Probe(client_id))
        return made[-1]

    yield make
    for one in made:
        one.close()


def connect_probe(world, probe, client_id, identity, node=0) -> Probe:
    made = probe(client_id)
    assert made.connect(
        world.cluster.ports[node], world.factory_ca.root_path, identity
    ), made.connack
    return made


def device_for(world, tmp_path, device_id, tcti=None, node=0) -> Device:
    """A device with its factory identity, set to speak MQTT 3.1.1."""
    device = Device(tmp_path, tcti, device_id=device_id)
    device.init(
        world.cluster.ports[node],
        world.factory_ca.root_path,
        "--trust-anchor",
        str(world.ca_bundle),
    )
    device.enroll(world.factory_ca)
    device.configure(**FAST)
    return device


def test_two_nodes_form_one_cluster_on_loopback_only(world):
    nodes = world.cluster.cluster_nodes()
    assert sorted(nodes) == sorted(n.full_name for n in world.cluster.nodes)

    ports = {world.cluster.epmd_port}
    for node in world.cluster.nodes:
        ports |= {node.port, node.dist_port}
    listening = [
        line.split()
        for line in subprocess.run(
            ["ss", "-ltnpH"], capture_output=True, text=True, check=True
        ).stdout.splitlines()
    ]
    ours = [f for f in listening if int(f[3].rsplit(":", 1)[1]) in ports]
    erlang = [f for f in listening if "beam.smp" in f[-1] or "epmd" in f[-1]]
    assert {int(f[3].rsplit(":", 1)[1]) for f in ours} == ports
    for fields in ours + erlang:
        assert fields[3].startswith(("127.0.0.1:", "[::1]:")), fields


def test_only_devices_and_the_registrar_are_users(world):
    """No guest: definitions loaded at boot keep RabbitMQ from making it."""
    assert set(world.cluster.users()) == {*DEVICES, registrar_module.NAME}


@pytest.mark.parametrize("node", [0, 1])
def test_tpm_device_publishes_and_receives_on_either_node(
    world, tmp_path, swtpm, node
):
    device = device_for(world, tmp_path, "dev-tpm", swtpm.tcti, node)
    topic = "devices/dev-tpm/hello"

    result = device.run(
        "connect", "--subscribe", topic, "--publish", topic, "hi rabbit",
        "--count", "1", "--timeout", "10",
    )  # fmt: skip

    assert f"{topic} hi rabbit" in result.out
    assert swtpm.transient_handles() == []


def test_a_message_crosses_from_one_node_to_the_other(world, probe):
    identity = world.identity("dev-sw")
    listener = connect_probe(world, probe, "dev-sw.probe.1", identity, 1)
    assert listener.try_subscribe("devices/dev-sw/#")
    sender = connect_probe(world, probe, "dev-sw.probe.2", identity, 0)

    sender.publish("devices/dev-sw/x", b"across")

    assert listener.wait_for_message("devices/dev-sw/x").payload == b"across"


def test_no_client_certificate_is_refused(world, probe):
    made = probe("dev-sw.probe.3")
    assert not made.connect(world.cluster.port, world.factory_ca.root_path)


def test_certificate_from_another_ca_is_refused(world, probe, tmp_path):
    other = CertificateAuthority.create(tmp_path / "other", name="Other")
    identity = world.identity("dev-sw", ca=other)
    made = probe("dev-sw.probe.4")
    assert not made.connect(
        world.cluster.port, world.factory_ca.root_path, identity
    )


@pytest.mark.parametrize(
    ("user", "password"),
    [("guest", "guest"), (registrar_module.NAME, ""), ("dev-other", "x")],
)
def test_a_password_logs_nobody_in(world, probe, user, password):
    """A device's certificate is its only login: no password works."""
    made = probe("dev-sw.probe.5")
    made.client.username_pw_set(user, password)
    identity = world.identity("dev-sw")
    assert not made.connect(
        world.cluster.port, world.factory_ca.root_path, identity
    )
    assert made.connack is not None and made.connack.is_failure


def test_a_certificate_logs_in_only_while_its_user_exists(world, probe):
    """Deleting the user also closes the sessions it has open."""
    identity = world.identity("dev-late")
    first = probe("dev-late.probe.1")
    assert not first.connect(
        world.cluster.port, world.factory_ca.root_path, identity
    )

    world.cluster.add_device("dev-late")
    second = connect_probe(world, probe, "dev-late.probe.2", identity, 1)
    assert second.try_subscribe("devices/dev-late/#")

    world.cluster.remove_device("dev-late")
    wait_for(lambda: second.gone, 5, "the open session to be closed")
    third = probe("dev-late.probe.3")
    assert not third.connect(
        world.cluster.ports[1], world.factory_ca.root_path, identity
    )


@pytest.mark.parametrize(
    "topic",
    [
        "devices/dev-other/#",
        "devices/+/heartbeat",
        "#",
        "devices/dev-sw-2/#",
    ],
)
def test_subscribing_beyond_own_topics_is_refused(world, probe, topic):
    made = connect_probe(
        world, probe, "dev-sw.probe.6", world.identity("dev-sw")
    )
    assert not made.try_subscribe(topic)
    assert made.gone


def test_publishing_to_another_device_is_refused(world, probe):
    victim = connect_probe(
        world, probe, "dev-other.probe.1", world.identity("dev-other"), 1
    )
    assert victim.try_subscribe("devices/dev-other/#")
    made = connect_probe(
        world, probe, "dev-sw.probe.7", world.identity("dev-sw")
    )

    made.client.publish("devices/dev-other/cmd", b"forged", qos=1)

    wait_for(lambda: made.gone, 5, "the broker to hang up on the forger")
    time.sleep(0.3)
    assert "devices/dev-other/cmd" not in victim.topics_received()


def test_another_devices_client_id_gets_no_subscription(world, probe):
    """Queues are named by client id: a device may only use its own."""
    made = connect_probe(
        world, probe, "dev-other.probe.9", world.identity("dev-sw")
    )
    assert not made.try_subscribe("devices/dev-sw/#")


def test_filter_patterns_match_what_rabbitmq_checks():
    pattern = re.compile(filter_pattern("devices/+/enroll/request"))
    assert pattern.match("devices.*.enroll.request")
    assert pattern.match("devices.dev/1.enroll.request")
    assert not pattern.match("devices.a.b.enroll.request")
    assert not pattern.match("devices.a.enroll.response")
    assert re.match(filter_pattern("a/#"), "a")
    assert re.match(filter_pattern("a/#"), "a.b.c")
    assert not re.match(filter_pattern("a/#"), "ab")


def test_enrollment_and_renewals_through_the_registrar(
    world, tmp_path, swtpm, probe
):
    """The daemon enrolls, renews twice with new TPM keys, and switches.

    A second client of the same device on the other node receives its
    heartbeats, which name the certificate each was sent with.
    """
    device_id = "dev-renew"
    listener = connect_probe(
        world, probe, f"{device_id}.probe.1", world.identity(device_id), 1
    )
    assert listener.try_subscribe(f"devices/{device_id}/heartbeat")
    device = device_for(world, tmp_path, device_id, swtpm.tcti)

    agent = device.start()
    try:
        wait_for(
            lambda: len(world.registry.issuances(device_id)) >= 3,
            60,
            "an enrollment and two renewals",
        )
        wait_for(
            lambda: (
                len(generations(device)) == 1
                and len(ldevid_beats(listener)) >= 1
                and ldevid_beats(listener)[-1]["serial"]
                == latest(world, device_id)
            ),
            15,
            "heartbeats with the newest certificate, old ones retired",
        )
    finally:
        out = stop(agent)

    issued = {
        f"{i.cert_serial:x}" for i in world.registry.issuances(device_id)
    }
    beats = ldevid_beats(listener)
    seen = {beat["serial"] for beat in beats}
    assert len(seen) >= 3, out
    assert seen <= issued
    stamps = [
        m.timestamp
        for m in listener.messages
        if m.topic.endswith("/heartbeat")
    ]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert max(gaps) < 0.5 + 1.5, gaps
    keys = {
        p.read_bytes() for p in device.state.glob("ldevid/generations/*/key.*")
    }
    assert len(keys) == 1
    assert swtpm.transient_handles() == []


def generations(device: Device) -> list[str]:
    root = device.state / "ldevid" / "generations"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def ldevid_beats(listener: Probe) -> list[dict]:
    return [
        beat
        for beat in (
            json.loads(m.payload)
            for m in list(listener.messages)
            if m.topic.endswith("/heartbeat")
        )
        if beat["identity"] == "ldevid"
    ]


def latest(world: RabbitWorld, device_id: str) -> str:
    issued = world.registry.issuances(device_id)
    return f"{issued[-1].cert_serial:x}"


def stop(process) -> str:
    process.send_signal(signal.SIGTERM)
    try:
        out, _ = process.communicate(timeout=15)
    except Exception:
        process.kill()
        raise
    assert process.returncode == 0, out
    return out
