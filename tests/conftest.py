"""Shared fixtures: real swtpm and mosquitto on free loopback ports."""

from __future__ import annotations

import dataclasses
import logging
import shutil
import ssl
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import click
import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from paho.mqtt.reasoncodes import ReasonCode

from firmware_sim.broker import Broker
from firmware_sim.ca import CertificateAuthority, chain_pem, key_pem
from tpm_simulator.errors import PortInUseError
from tpm_simulator.ports import free_port, free_port_pair
from tpm_simulator.swtpm import Swtpm

logger = logging.getLogger(__name__)


def edge_command(run: Callable[[list[str]], Any]) -> click.Command:
    """A click command that hands its arguments to a CLI's error edge.

    CliRunner needs a click command; the edge is a plain function so
    that it can wrap any group.
    """

    @click.command(
        context_settings={
            "ignore_unknown_options": True,
            "allow_extra_args": True,
            "help_option_names": [],
        }
    )
    @click.argument("args", nargs=-1, type=click.UNPROCESSED)
    def command(args: tuple[str, ...]) -> None:
        run(list(args))

    return command


class Server(Protocol):
    def start(self, timeout: float = ...) -> None: ...


S = TypeVar("S", bound=Server)


def pytest_configure(config: pytest.Config) -> None:
    # pytest-xdist declares this mark itself, but not under -p no:xdist.
    config.addinivalue_line(
        "markers", "xdist_group(name): tests that share one worker"
    )


# Ports are picked free and bound a moment later by another process, so a
# test worker running alongside can take one in between; then we pick
# again rather than fail the test.
PORT_ATTEMPTS = 3
MQTT_TIMEOUT = 5.0


def start_on_free_port(make: Callable[[], S]) -> S:
    """Build a server with ``make`` and start it, on new ports if taken."""
    for attempt in range(1, PORT_ATTEMPTS + 1):
        server = make()
        try:
            server.start()
        except PortInUseError:
            if attempt == PORT_ATTEMPTS:
                raise
            logger.warning("port taken, picking another")
            continue
        return server
    raise AssertionError("unreachable")


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    """A fresh swtpm with its state in the test's tmp_path."""
    tpm = start_on_free_port(
        lambda: Swtpm(tmp_path / "swtpm", free_port_pair())
    )
    yield tpm
    tpm.stop()


@pytest.fixture
def factory_ca(tmp_path: Path) -> CertificateAuthority:
    """A new manufacturing CA in the test's tmp_path."""
    return CertificateAuthority.create(tmp_path / "factory-ca")


@dataclasses.dataclass(frozen=True)
class Identity:
    """A client certificate chain and its software key, as files."""

    name: str
    chain: list[x509.Certificate]
    chain_path: Path
    key_path: Path

    @property
    def serial(self) -> int:
        return self.chain[0].serial_number


@pytest.fixture
def software_device(tmp_path: Path, factory_ca: CertificateAuthority) -> Any:
    """A software-key device with its factory identity installed."""
    from device_cli import Device

    made = Device(tmp_path, None)
    made.init(1, factory_ca.root_path)
    made.enroll(factory_ca)
    return made


@pytest.fixture
def make_identity(
    tmp_path: Path, factory_ca: CertificateAuthority
) -> Callable[..., Identity]:
    """Make a P-256 software key and a certificate for a common name.

    Signed by ``factory_ca`` unless ``ca`` is given; other keywords go to
    :meth:`CertificateAuthority.sign_csr`.
    """

    def make(
        name: str, ca: CertificateAuthority | None = None, **sign: Any
    ) -> Identity:
        chain, key = (ca or factory_ca).issue_client_cert(name, **sign)

        directory = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=tmp_path))
        chain_path = directory / "chain.pem"
        key_path = directory / "key.pem"
        chain_path.write_bytes(chain_pem(chain))
        key_path.write_bytes(key_pem(key))
        key_path.chmod(0o600)
        return Identity(name, chain, chain_path, key_path)

    return make


@pytest.fixture
def broker_factory(
    tmp_path: Path, factory_ca: CertificateAuthority
) -> Iterator[Callable[..., Broker]]:
    """Start brokers; each is stopped and its work directory removed after.

    Without arguments a broker trusts ``factory_ca`` for clients and serves
    a certificate from it for localhost and 127.0.0.1; keywords go to
    :class:`Broker`.
    """
    brokers: list[Broker] = []
    workdirs: list[Path] = []

    def start(**options: Any) -> Broker:
        if "server_cert_file" not in options:
            options.update(_server_files(factory_ca, tmp_path))
        options.setdefault("ca_file", factory_ca.root_path)

        # As root, mosquitto works as user mosquitto, which cannot enter
        # pytest's tmp_path (its base is 0700), so it gets its own
        # directory under the system's temporary directory.
        workdir = Path(tempfile.mkdtemp(prefix="broker-"))
        workdirs.append(workdir)
        broker = start_on_free_port(
            lambda: Broker(workdir=workdir, port=free_port(), **options)
        )
        brokers.append(broker)
        return broker

    yield start

    for broker in brokers:
        broker.stop()
    for workdir in workdirs:
        shutil.rmtree(workdir, ignore_errors=True)


def _server_files(ca: CertificateAuthority, tmp_path: Path) -> dict[str, Path]:
    chain, key = ca.issue_server_cert()
    directory = Path(tempfile.mkdtemp(prefix="server-", dir=tmp_path))
    cert_path = directory / "server.pem"
    key_path = directory / "server.key"
    cert_path.write_bytes(chain_pem(chain))
    key_path.write_bytes(key_pem(key))
    key_path.chmod(0o600)
    return {"server_cert_file": cert_path, "server_key_file": key_path}


class MqttProbe:
    """A paho MQTT 5 client that records what the broker answers."""

    def __init__(self, client_id: str) -> None:
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            # A probe reports what happened and never reconnects, which
            # would also keep close() waiting out paho's reconnect delay.
            reconnect_on_failure=False,
        )
        self.connack: ReasonCode | None = None
        self.tls_alert: str | None = None
        self.messages: list[mqtt.MQTTMessage] = []
        self.subacks: dict[int, list[ReasonCode]] = {}
        self._changed = threading.Condition()
        self._gone = False
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe

    def connect(
        self,
        port: int,
        ca_file: Path,
        identity: Identity | None = None,
        max_tls: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
    ) -> bool:
        """Whether the broker accepted us: authenticated means CONNACK."""
        context = ssl.create_default_context(cafile=str(ca_file))
        context.maximum_version = max_tls
        if identity is not None:
            context.load_cert_chain(identity.chain_path, identity.key_path)
        self.client.tls_set_context(context)

        try:
            self.client.connect("127.0.0.1", port)
        except ssl.SSLError as exc:
            # With TLS 1.2 a refused certificate fails the handshake, and
            # the broker's alert says why, e.g. CERTIFICATE_REVOKED.
            self.tls_alert = exc.reason
            return False

        self.client.loop_start()
        with self._changed:
            self._changed.wait_for(
                lambda: self.connack is not None or self._gone, MQTT_TIMEOUT
            )
        return self.connack is not None and not self.connack.is_failure

    def subscribe(self, topic: str) -> list[ReasonCode]:
        _, mid = self.client.subscribe(topic, qos=1)
        with self._changed:
            self._changed.wait_for(lambda: mid in self.subacks, MQTT_TIMEOUT)
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes) -> None:
        info = self.client.publish(topic, payload, qos=1)
        info.wait_for_publish(MQTT_TIMEOUT)

    def wait_for_message(self, topic: str) -> mqtt.MQTTMessage:
        with self._changed:
            self._changed.wait_for(
                lambda: any(m.topic == topic for m in self.messages),
                MQTT_TIMEOUT,
            )
        return next(m for m in self.messages if m.topic == topic)

    def topics_received(self) -> list[str]:
        with self._changed:
            return [m.topic for m in self.messages]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client: Any, userdata: Any, *args: Any) -> None:
        with self._changed:
            self.connack = args[1]
            self._changed.notify_all()

    def _on_disconnect(self, client: Any, userdata: Any, *args: Any) -> None:
        with self._changed:
            self._gone = True
            self._changed.notify_all()

    def _on_message(
        self, client: Any, userdata: Any, message: mqtt.MQTTMessage
    ) -> None:
        with self._changed:
            self.messages.append(message)
            self._changed.notify_all()

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, codes: Any, props: Any
    ) -> None:
        with self._changed:
            self.subacks[mid] = list(codes)
            self._changed.notify_all()


@pytest.fixture
def mqtt_probe() -> Iterator[Callable[[str], MqttProbe]]:
    """Make MQTT 5 probe clients; all are disconnected after the test."""
    probes: list[MqttProbe] = []

    def make(client_id: str) -> MqttProbe:
        probe = MqttProbe(client_id)
        probes.append(probe)
        return probe

    yield make

    for probe in probes:
        probe.close()


@dataclasses.dataclass
class RegistrarWorld:
    """A factory CA, an operational CA, a broker and a running registrar.

    ``ca_bundle`` holds both roots: the broker trusts it for client
    certificates (IDevIDs from the factory, LDevIDs and the registrar's
    from the operational CA), and clients verify the broker with it.
    ``crl_path`` holds one CRL per issuing intermediate, as mosquitto
    needs once a crlfile is set. ``device_id`` is registered and active.
    ``layout`` is a ``firmware_sim.registrar.Layout``, ``registry`` a
    ``Registry`` and ``registrar`` the running ``Registrar``.
    """

    broker: Broker
    ca_bundle: Path
    crl_path: Path
    factory_ca: CertificateAuthority
    operational_ca: CertificateAuthority
    layout: Any
    registry: Any
    registrar: Any
    device_id: str = "dev-1"
    host: str = "127.0.0.1"

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def operational_root(self) -> Path:
        return self.operational_ca.root_path

    def start_registrar(self, **options: Any) -> Any:
        """Replace the running registrar with one made with ``options``."""
        from firmware_sim.registrar import Registrar

        if self.registrar is not None:
            self.registrar.stop()
        options.setdefault("lifetime", REGISTRAR_LIFETIME)
        self.registrar = Registrar(
            self.operational_ca,
            self.registry,
            self.host,
            self.port,
            self.ca_bundle,
            self.layout.chain_path,
            self.layout.key_path,
            **options,
        )
        self.registrar.start()
        return self.registrar


REGISTRAR_LIFETIME = 30


@pytest.fixture
def registrar_world(
    tmp_path: Path,
    factory_ca: CertificateAuthority,
    broker_factory: Callable[..., Broker],
) -> Iterator[RegistrarWorld]:
    """Everything a device needs to enroll: see :class:`RegistrarWorld`.

    The registrar issues certificates valid for 30 seconds.
    """
    from firmware_sim import registrar
    from firmware_sim.registry import Registry

    layout = registrar.prepare(tmp_path / "registrar")
    operational_ca = CertificateAuthority.load(layout.ca_dir)
    bundle = tmp_path / "client-cas.pem"
    bundle.write_bytes(
        factory_ca.root_path.read_bytes() + layout.root_path.read_bytes()
    )
    crl_path = tmp_path / "crls.pem"
    crl_path.write_bytes(factory_ca.crl() + operational_ca.crl())

    broker = broker_factory(
        ca_file=bundle,
        crl_file=crl_path,
        service_users={registrar.NAME: list(registrar.ACL_TOPICS)},
    )
    registry = Registry(layout.registry_path)
    world = RegistrarWorld(
        broker=broker,
        ca_bundle=bundle,
        crl_path=crl_path,
        factory_ca=factory_ca,
        operational_ca=operational_ca,
        layout=layout,
        registry=registry,
        registrar=None,
    )
    registry.add(world.device_id)
    world.start_registrar()

    yield world

    world.registrar.stop()
    registry.close()
