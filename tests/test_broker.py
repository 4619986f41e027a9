"""The mosquitto broker: mutual TLS, CN as identity, device ACL, CRL."""

import datetime
import os
import ssl
import stat

import pytest
from cryptography.x509.oid import ExtendedKeyUsageOID

from firmware_sim.broker import Broker
from firmware_sim.ca import CertificateAuthority
from firmware_sim.errors import BrokerError

NOW = datetime.datetime.now(datetime.UTC)
TLS12 = ssl.TLSVersion.TLSv1_2
TLS13 = ssl.TLSVersion.TLSv1_3

# With TLS 1.2 a refused client certificate fails the handshake inside
# connect() and the broker's alert names the reason; with TLS 1.3 the
# refusal arrives after connect(), as a connection lost before CONNACK.
both_tls = pytest.mark.parametrize(
    "max_tls", [TLS12, TLS13], ids=["tls1.2", "tls1.3"]
)


@pytest.fixture
def crl_file(tmp_path, factory_ca):
    path = tmp_path / "crl.pem"
    path.write_bytes(factory_ca.crl())
    return path


@pytest.fixture
def other_ca(tmp_path):
    return CertificateAuthority.create(tmp_path / "other-ca", name="Other")


@pytest.fixture
def connect(mqtt_probe, factory_ca):
    """Connect a new probe as ``identity``; return it, connected or not."""

    def connect(broker, identity, client_id=None, max_tls=TLS13):
        probe = mqtt_probe(client_id or getattr(identity, "name", "anon"))
        probe.connect(broker.port, factory_ca.root_path, identity, max_tls)
        return probe

    return connect


def accepted(probe):
    return probe.connack is not None and not probe.connack.is_failure


def test_device_connects_and_is_logged_by_cn(
    broker_factory, make_identity, connect
):
    broker = broker_factory()

    probe = connect(broker, make_identity("dev-a"), client_id="client-a")

    assert accepted(probe)
    broker.wait_for_log("as client-a")
    assert "u'dev-a'" in broker.log_text()


def test_device_talks_on_its_own_topics(
    broker_factory, make_identity, connect
):
    broker = broker_factory()
    probe = connect(broker, make_identity("dev-a"))

    (granted,) = probe.subscribe("devices/dev-a/#")
    probe.publish("devices/dev-a/hello", b"hi")

    assert not granted.is_failure
    assert probe.wait_for_message("devices/dev-a/hello").payload == b"hi"


def test_device_receives_nothing_from_another_devices_topics(
    broker_factory, make_identity, connect
):
    """mosquitto 2.0.11 grants any SUBSCRIBE and checks read per message."""
    broker = broker_factory()
    snoop = connect(broker, make_identity("dev-a"))
    other = connect(broker, make_identity("dev-b"))
    snoop.subscribe("devices/dev-b/#")
    snoop.subscribe("devices/#")

    other.publish("devices/dev-b/status", b"secret")
    # The broker has routed dev-b's message once it acknowledged it, and
    # delivers to one client in order: had the message passed the ACL, it
    # would arrive before dev-a's own.
    snoop.publish("devices/dev-a/marker", b"own")
    snoop.wait_for_message("devices/dev-a/marker")

    assert snoop.topics_received() == ["devices/dev-a/marker"]


def test_publish_to_another_devices_topic_is_dropped(
    broker_factory, make_identity, connect
):
    broker = broker_factory()
    intruder = connect(broker, make_identity("dev-a"))
    victim = connect(broker, make_identity("dev-b"))
    victim.subscribe("devices/dev-b/#")

    intruder.publish("devices/dev-b/command", b"forged")
    # Same ordering argument: the victim's own message comes after.
    victim.publish("devices/dev-b/marker", b"own")
    victim.wait_for_message("devices/dev-b/marker")

    assert victim.topics_received() == ["devices/dev-b/marker"]


def test_service_user_reaches_the_topics_it_was_given(
    broker_factory, make_identity, connect
):
    broker = broker_factory(
        service_users={"registrar": ["devices/+/enroll/request"]}
    )
    registrar = connect(broker, make_identity("registrar", service=True))
    device = connect(broker, make_identity("dev-a"))
    registrar.subscribe("devices/+/enroll/request")
    registrar.subscribe("devices/+/telemetry")

    device.publish("devices/dev-a/telemetry", b"not for the registrar")
    device.publish("devices/dev-a/enroll/request", b"csr")
    registrar.wait_for_message("devices/dev-a/enroll/request")

    assert registrar.topics_received() == ["devices/dev-a/enroll/request"]


@both_tls
def test_client_without_certificate_is_refused(
    broker_factory, connect, max_tls
):
    broker = broker_factory()

    probe = connect(broker, None, max_tls=max_tls)

    assert not accepted(probe)
    if max_tls == TLS12:
        assert probe.tls_alert == "SSLV3_ALERT_HANDSHAKE_FAILURE"


@both_tls
def test_certificate_from_another_ca_is_refused(
    broker_factory, make_identity, connect, other_ca, max_tls
):
    broker = broker_factory()

    probe = connect(broker, make_identity("dev-x", ca=other_ca), None, max_tls)

    assert not accepted(probe)
    if max_tls == TLS12:
        assert probe.tls_alert == "TLSV1_ALERT_UNKNOWN_CA"
    broker.wait_for_log("certificate verify failed")


@both_tls
def test_revoked_certificate_is_refused_after_reload(
    broker_factory, make_identity, connect, factory_ca, crl_file, max_tls
):
    broker = broker_factory(crl_file=crl_file)
    doomed = make_identity("dev-doomed")
    kept = make_identity("dev-kept")
    assert accepted(connect(broker, doomed, "before", max_tls))

    crl_file.write_bytes(factory_ca.crl([doomed.serial]))
    broker.reload()

    refused = connect(broker, doomed, "after", max_tls)
    assert not accepted(refused)
    if max_tls == TLS12:
        assert refused.tls_alert == "SSLV3_ALERT_CERTIFICATE_REVOKED"
    assert accepted(connect(broker, kept, "kept", max_tls))


def test_open_session_survives_revocation(
    broker_factory, make_identity, connect, factory_ca, crl_file
):
    """The CRL is checked at the handshake only; reload keeps sessions."""
    broker = broker_factory(crl_file=crl_file)
    device = make_identity("dev-a")
    probe = connect(broker, device)

    crl_file.write_bytes(factory_ca.crl([device.serial]))
    broker.reload()
    probe.subscribe("devices/dev-a/#")
    probe.publish("devices/dev-a/still", b"here")

    assert probe.wait_for_message("devices/dev-a/still").payload == b"here"


def test_crl_of_the_intermediate_alone_is_enough(
    broker_factory, make_identity, connect, crl_file
):
    """mosquitto checks the CRL of the leaf's issuer only, not the root's."""
    broker = broker_factory(crl_file=crl_file)

    assert accepted(connect(broker, make_identity("dev-a")))


def test_every_client_ca_needs_a_crl_once_crlfile_is_set(
    broker_factory, make_identity, connect, factory_ca, other_ca, tmp_path
):
    """A trusted CA whose CRL is missing from the crlfile is refused."""
    bundle = tmp_path / "clients.pem"
    bundle.write_bytes(
        factory_ca.root_path.read_bytes() + other_ca.root_path.read_bytes()
    )
    crl_file = tmp_path / "crl.pem"
    crl_file.write_bytes(factory_ca.crl())
    broker = broker_factory(ca_file=bundle, crl_file=crl_file)
    device = make_identity("dev-o", ca=other_ca)

    # OpenSSL reports the missing CRL to the client as an unknown CA.
    refused = connect(broker, device, "without-crl", TLS12)
    assert refused.tls_alert == "TLSV1_ALERT_UNKNOWN_CA"

    crl_file.write_bytes(factory_ca.crl() + other_ca.crl())
    broker.reload()

    assert accepted(connect(broker, device, "with-crl"))


def test_crl_past_its_next_update_refuses_every_leaf(
    broker_factory, make_identity, connect, factory_ca, tmp_path
):
    """Clients are told their certificate expired, though the CRL did."""
    crl_file = tmp_path / "crl.pem"
    crl_file.write_bytes(
        factory_ca.crl(
            last_update=NOW - datetime.timedelta(hours=2),
            next_update=datetime.timedelta(hours=1),
        )
    )
    broker = broker_factory(crl_file=crl_file)

    probe = connect(broker, make_identity("dev-a"), max_tls=TLS12)

    assert probe.tls_alert == "SSLV3_ALERT_CERTIFICATE_EXPIRED"


@pytest.mark.parametrize(
    ("sign", "alert"),
    [
        (
            {
                "not_before": NOW - datetime.timedelta(days=2),
                "not_after": NOW - datetime.timedelta(days=1),
            },
            "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        ),
        (
            {"not_before": NOW + datetime.timedelta(days=1)},
            "SSLV3_ALERT_BAD_CERTIFICATE",
        ),
        (
            {"eku": [ExtendedKeyUsageOID.SERVER_AUTH]},
            "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        ),
    ],
    ids=["expired", "not-yet-valid", "server-only"],
)
def test_unfit_client_certificate_is_refused(
    broker_factory, make_identity, connect, sign, alert
):
    broker = broker_factory()

    probe = connect(broker, make_identity("dev-a", **sign), max_tls=TLS12)

    assert not accepted(probe)
    assert probe.tls_alert == alert


def test_certificate_without_eku_is_accepted(
    broker_factory, make_identity, connect
):
    """OpenSSL reads a missing extendedKeyUsage as any purpose."""
    broker = broker_factory()

    assert accepted(connect(broker, make_identity("dev-a", eku=[])))


def test_tls13_minimum_refuses_a_tls12_client(
    broker_factory, make_identity, connect
):
    broker = broker_factory(tls_version="tlsv1.3")
    device = make_identity("dev-a")

    assert not accepted(connect(broker, device, "old", TLS12))
    assert accepted(connect(broker, device, "new", TLS13))


def test_workdir_holds_private_copies_for_mosquitto(broker_factory):
    broker = broker_factory(acl=False)

    key = broker.workdir / "server.key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(broker.workdir.stat().st_mode) == 0o700
    assert "acl_file" not in broker.conf_path.read_text()
    assert broker.pid_path.read_text().strip() == str(broker.pid)


def test_without_acl_a_device_reaches_any_topic(
    broker_factory, make_identity, connect
):
    broker = broker_factory(acl=False)
    probe = connect(broker, make_identity("dev-a"))

    probe.subscribe("elsewhere/#")
    probe.publish("elsewhere/x", b"open")

    assert probe.wait_for_message("elsewhere/x").payload == b"open"


def test_stop_ends_mosquitto(broker_factory):
    broker = broker_factory()
    process = broker.pid

    broker.stop()

    assert process is not None
    assert not broker.running
    assert "terminating" in broker.log_text()


def test_reload_of_a_stopped_broker_is_refused(broker_factory):
    broker = broker_factory()
    broker.stop()

    with pytest.raises(BrokerError, match="not running"):
        broker.reload()


def test_unreachable_workdir_is_explained(tmp_path, factory_ca):
    """As root, mosquitto's user cannot enter pytest's private tmp_path."""
    if os.geteuid() != 0:
        pytest.skip("only root hands files to the mosquitto user")
    root = factory_ca.root_path
    broker = Broker(tmp_path / "broker", 1, root, root, root)

    with pytest.raises(BrokerError, match="cannot enter"):
        broker.start()


def test_unknown_tls_version_is_refused(tmp_path):
    with pytest.raises(BrokerError, match="tls_version"):
        Broker(tmp_path, 1, tmp_path, tmp_path, tmp_path, tls_version="ssl3")
