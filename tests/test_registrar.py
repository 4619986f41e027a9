"""The registrar answers enrollment requests over real MQTT, safely."""

import dataclasses
import datetime
import json
import os
import queue
import signal
import subprocess
import sys
import time
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from device_agent import chain, csr, tls
from device_agent.core import messages
from device_agent.errors import SessionError
from device_agent.session import Session
from firmware_sim import cli, registrar
from firmware_sim.ca import CertificateAuthority
from firmware_sim.registry import (
    ACTIVE,
    DECOMMISSIONED,
    REVOKED,
    OutOfServiceError,
    Registry,
    RegistryError,
    UnknownDeviceError,
)

WAIT = 5.0


def p256_key():
    return ec.generate_private_key(ec.SECP256R1())


def csr_pem(key=None, name="dev-1"):
    """A CSR as a device makes it: P-256, CN and URI of the device."""
    request = csr.build(key or p256_key(), name, f"urn:device-agent:{name}")
    return request.public_bytes(serialization.Encoding.PEM).decode()


def raw_csr_pem(key, names=("dev-1",)):
    """A CSR with any key and any list of CNs, checked by nobody."""
    subject = x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, n) for n in names]
    )
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM).decode()


def broken_signature_pem():
    der = bytearray(
        x509.load_pem_x509_csr(csr_pem().encode()).public_bytes(
            serialization.Encoding.DER
        )
    )
    # The last byte belongs to the signature's s value: the CSR still
    # parses, its signature no longer verifies.
    der[-1] ^= 0x01
    request = x509.load_der_x509_csr(bytes(der))
    return request.public_bytes(serialization.Encoding.PEM).decode()


def new_id():
    return uuid.uuid4().hex


class Device:
    """A device on the broker with its IDevID, asking for certificates."""

    def __init__(self, world, identity):
        self.device_id = identity.name
        self.session = Session(
            world.host,
            world.port,
            identity.name,
            lambda: tls.client_context(
                world.ca_bundle, identity.chain_path, identity.key_path
            ),
        )
        self.session.open()
        self.session.subscribe(messages.response_topic(self.device_id))
        self.others = []

    def send(self, payload, topic=None):
        topic = topic or messages.request_topic(self.device_id)
        self.session.publish(topic, payload)

    def request(self, pem, request_id=None):
        request_id = request_id or new_id()
        self.send(messages.encode_request(request_id, pem))
        return self.answer(request_id)

    def answer(self, request_id):
        """The response to ``request_id``; earlier ones go to others.

        The registrar answers in the order it received requests, so
        whatever arrives before this answer was for an earlier request.
        """
        deadline = time.monotonic() + WAIT
        while True:
            left = deadline - time.monotonic()
            try:
                message = self.session.messages.get(timeout=max(left, 0))
            except queue.Empty:
                raise AssertionError(f"no answer to {request_id}") from None
            response = messages.decode_response(message.payload)
            if response["id"] == request_id:
                return response
            self.others.append(response)


@pytest.fixture
def device(registrar_world, make_identity):
    """Connect devices with factory IDevIDs; closed after the test."""
    devices = []

    def connect(name=registrar_world.device_id):
        made = Device(registrar_world, make_identity(name))
        devices.append(made)
        return made

    yield connect

    for made in devices:
        made.session.close()


def issued_chain(response, key):
    assert response["status"] == "issued", response
    certificates = chain.read_bundle(response["chain"].encode())
    return chain.order_chain(certificates, key.public_key())


def refusal(response):
    assert response["status"] == "refused", response
    return response["reason"]


def span(certificate):
    return certificate.not_valid_after_utc - certificate.not_valid_before_utc


# Issuing


def test_issued_chain_verifies_to_the_operational_root(
    registrar_world, device
):
    key = p256_key()

    response = device().request(csr_pem(key))

    ordered = issued_chain(response, key)
    anchors = chain.load_anchors(registrar_world.operational_root)
    chain.verify(ordered, anchors, registrar_world.device_id)
    leaf = ordered[0]
    assert len(ordered) == 2
    assert span(leaf) == datetime.timedelta(seconds=30)
    usages = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(usages.value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    names = leaf.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value
    assert names.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:device-agent:dev-1"
    ]


def test_issuance_is_recorded_in_the_registry(registrar_world, device):
    key = p256_key()

    leaf = issued_chain(device().request(csr_pem(key)), key)[0]

    (record,) = registrar_world.registry.issuances("dev-1")
    assert record.cert_serial == leaf.serial_number
    assert record.fingerprint == leaf.fingerprint(hashes.SHA256()).hex()
    assert record.not_after == leaf.not_valid_after_utc
    assert record.kind == registrar.KIND


@pytest.mark.parametrize(
    ("options", "before_now", "valid_for"),
    [
        ({"backdate": 120}, 120, 30),
        ({"max_lifetime": 10}, 0, 10),
        ({"lifetime": 3, "max_lifetime": 10}, 0, 3),
        ({"backdate": 60, "max_lifetime": 5}, 60, 5),
    ],
)
def test_backdate_and_max_lifetime_shape_the_validity(
    registrar_world, device, options, before_now, valid_for
):
    service = registrar_world.registrar
    service.policy = dataclasses.replace(service.policy, **options)
    key = p256_key()

    leaf = issued_chain(device().request(csr_pem(key)), key)[0]

    assert span(leaf) == datetime.timedelta(seconds=before_now + valid_for)
    (record,) = registrar_world.registry.issuances("dev-1")
    issued_at = record.issued_at.replace(microsecond=0)
    granted = leaf.not_valid_after_utc - issued_at
    assert abs(granted.total_seconds() - valid_for) <= 1


def test_lost_answer_is_given_again_without_a_second_certificate(
    registrar_world, device
):
    registrar_world.start_registrar(drop_responses=1)
    dev = device()
    key = p256_key()
    pem = csr_pem(key)
    request_id = new_id()

    dev.send(messages.encode_request(request_id, pem))
    again = dev.request(pem, request_id)

    assert dev.others == []
    issued_chain(again, key)
    assert len(registrar_world.registry.issuances()) == 1
    counts = registrar_world.registrar.counts()
    assert counts["suppressed"] == 1
    assert counts["repeated"] == 1


def test_same_request_id_twice_gets_the_same_certificate(
    registrar_world, device
):
    dev = device()
    key = p256_key()
    pem = csr_pem(key)

    first = dev.request(pem, "abc123")
    second = dev.request(pem, "abc123")

    assert first == second
    issued_chain(first, key)
    assert len(registrar_world.registry.issuances()) == 1


def test_request_id_reused_for_another_csr_is_refused(registrar_world, device):
    dev = device()
    dev.request(csr_pem(), "abc123")

    response = dev.request(csr_pem(), "abc123")

    assert refusal(response) == "bad-request"
    assert len(registrar_world.registry.issuances()) == 1


# Refusals


def bad_requests():
    pem = csr_pem()
    return {
        "no csr": {"v": 1, "id": "ab12"},
        "empty csr": {"v": 1, "id": "ab12", "csr": ""},
        "csr not a string": {"v": 1, "id": "ab12", "csr": 42},
        "version 2": {"v": 2, "id": "ab12", "csr": pem},
        "csr not PEM": {"v": 1, "id": "ab12", "csr": "hello"},
        "csr PEM of nothing": {
            "v": 1,
            "id": "ab12",
            "csr": "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n"
            "-----END CERTIFICATE REQUEST-----\n",
        },
        "certificate instead of csr": {
            "v": 1,
            "id": "ab12",
            "csr": pem.replace("CERTIFICATE REQUEST", "CERTIFICATE"),
        },
    }


@pytest.mark.parametrize("case", list(bad_requests()))
def test_malformed_request_with_an_id_is_refused_as_bad_request(
    registrar_world, device, case
):
    payload = json.dumps(bad_requests()[case]).encode()
    dev = device()

    dev.send(payload)

    assert refusal(dev.answer("ab12")) == "bad-request"
    assert registrar_world.registry.issuances() == []


@pytest.mark.parametrize(
    ("make_pem", "reason"),
    [
        (broken_signature_pem, "bad-signature"),
        (
            lambda: raw_csr_pem(rsa.generate_private_key(65537, 2048)),
            "key-type",
        ),
        (
            lambda: raw_csr_pem(ec.generate_private_key(ec.SECP384R1())),
            "key-type",
        ),
        (lambda: csr_pem(name="dev-2"), "identity-mismatch"),
        (lambda: raw_csr_pem(p256_key(), ()), "identity-mismatch"),
        (
            lambda: raw_csr_pem(p256_key(), ("dev-1", "dev-1")),
            "identity-mismatch",
        ),
    ],
    ids=[
        "broken signature",
        "RSA",
        "P-384",
        "another device's CN",
        "no CN",
        "two CNs",
    ],
)
def test_csr_that_fails_a_check_is_refused(
    registrar_world, device, make_pem, reason
):
    response = device().request(make_pem())

    assert refusal(response) == reason
    assert registrar_world.registry.issuances() == []


def test_unregistered_device_is_refused(registrar_world, device):
    response = device("dev-9").request(csr_pem(name="dev-9"))

    assert refusal(response) == "unknown-device"
    assert response["reason"] in messages.PERMANENT


@pytest.mark.parametrize("status", [REVOKED, DECOMMISSIONED])
def test_device_out_of_service_is_refused(registrar_world, device, status):
    registrar_world.registry.set_status("dev-1", status)

    response = device().request(csr_pem())

    assert refusal(response) == status
    assert registrar_world.registry.issuances() == []


@pytest.fixture
def unstarted(tmp_path):
    """A registrar never started, for handle() alone: no broker."""
    layout = registrar.prepare(tmp_path / "registrar")
    with Registry(layout.registry_path) as registry:
        registry.add("dev-1")
        yield registrar.Registrar(
            CertificateAuthority.load(layout.ca_dir),
            registry,
            "127.0.0.1",
            0,
            layout.root_path,
            layout.chain_path,
            layout.key_path,
        )


def test_device_revoked_while_its_certificate_is_signed_gets_none(
    unstarted, monkeypatch
):
    """The registry's record decides: a leaf it refuses is never sent."""
    issue_leaf = unstarted.ca.issue_leaf

    def revoke_then_issue(*args, **kwargs):
        # Another connection, as the CLI's revoke in another process.
        with Registry(unstarted.registry.path) as other:
            other.set_status("dev-1", REVOKED)
        return issue_leaf(*args, **kwargs)

    monkeypatch.setattr(unstarted.ca, "issue_leaf", revoke_then_issue)
    payload = messages.encode_request(new_id(), csr_pem())

    answer = unstarted.handle("dev-1", payload)

    assert refusal(messages.decode_response(answer)) == REVOKED
    assert unstarted.registry.issuances() == []


def test_signature_is_checked_before_identity_and_registry(
    registrar_world, device
):
    """The order of checks decides the reason a device is told."""
    registrar_world.registry.set_status("dev-1", REVOKED)
    rsa_key = rsa.generate_private_key(65537, 2048)

    dev = device()

    assert refusal(dev.request(broken_signature_pem())) == "bad-signature"
    assert refusal(dev.request(raw_csr_pem(rsa_key, ["dev-2"]))) == "key-type"
    assert refusal(dev.request(csr_pem(name="dev-2"))) == "identity-mismatch"
    assert refusal(dev.request(csr_pem())) == "revoked"


def test_refuse_all_simulates_an_outage(registrar_world, device):
    service = registrar_world.registrar
    service.policy = dataclasses.replace(
        service.policy, refuse_all="busy", retry_after=7
    )
    dev = device()

    refused = dev.request(csr_pem())
    service.policy = dataclasses.replace(service.policy, refuse_all=None)
    key = p256_key()
    issued = dev.request(csr_pem(key))

    assert refusal(refused) == "busy"
    assert refused["retry_after"] == 7
    issued_chain(issued, key)


# The broker's ACL


def test_request_on_another_devices_topic_never_reaches_the_registrar(
    registrar_world, device
):
    """mosquitto denies the publish (PUBACK "Not authorized", which the
    session reports) and grants the subscription but filters reads.
    """
    registrar_world.registry.add("dev-2")
    victim = device("dev-1")
    intruder = device("dev-2")
    intruder.session.subscribe(messages.response_topic("dev-1"))

    forged = messages.encode_request("f00d", csr_pem(name="dev-1"))
    with pytest.raises(SessionError, match="Not authorized"):
        intruder.send(forged, topic=messages.request_topic("dev-1"))
    # The registrar handles requests in the order the broker delivers
    # them, and the broker acknowledged the forged one first: had it
    # passed the ACL, its answer would come before this one.
    victim_answer = victim.request(csr_pem())
    # Likewise the broker would have queued the victim's answer for the
    # intruder before the intruder's own.
    intruder_answer = intruder.request(csr_pem(name="dev-2"))

    registrar_world.broker.wait_for_log("Denied PUBLISH from dev-2")
    assert victim_answer["status"] == "issued"
    assert intruder_answer["status"] == "issued"
    assert victim.others == []
    assert intruder.others == []
    assert registrar_world.registrar.counts() == {"issued": 2}
    assert len(registrar_world.registry.issuances("dev-1")) == 1


# Garbage


def test_unparseable_request_is_dropped_and_service_goes_on(
    registrar_world, device
):
    dev = device()

    dev.send(b'{"v": 1, "id": "ab12", "csr": ')
    dev.send(b"\xff\xfe not even text")
    dev.send(b"[" * 50000)
    answer = dev.request(csr_pem())

    assert answer["status"] == "issued"
    assert dev.others == []
    assert registrar_world.registrar.counts()["dropped"] == 3


def test_oversize_request_is_dropped_and_service_goes_on(
    registrar_world, device
):
    padding = "A" * messages.MAX_MESSAGE_BYTES
    oversize = {"v": 1, "id": "ab12", "csr": csr_pem(), "pad": padding}
    dev = device()

    dev.send(json.dumps(oversize).encode())
    dev.send(os.urandom(1024 * 1024))
    answer = dev.request(csr_pem())

    assert answer["status"] == "issued"
    assert dev.others == []
    assert registrar_world.registrar.counts()["dropped"] == 2


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text(max_size=40),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
request_like = st.fixed_dictionaries(
    {
        "v": st.sampled_from([1, 1, 2, "1", None]),
        "id": st.text("0123456789abcdef-", min_size=1, max_size=70)
        | json_values,
        "csr": st.sampled_from(
            [
                "-----BEGIN CERTIFICATE REQUEST-----\n",
                "-----BEGIN CERTIFICATE REQUEST-----\nMIIB\n"
                "-----END CERTIFICATE REQUEST-----\n",
            ]
        )
        | st.text(max_size=200)
        | json_values,
    }
)
garbage = (
    st.binary(max_size=400)
    | json_values.map(lambda v: json.dumps(v).encode())
    | request_like.map(lambda v: json.dumps(v).encode())
)


def test_registrar_survives_garbage_over_mqtt(registrar_world, device):
    dev = device()

    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(garbage)
    def publish(payload):
        dev.send(payload)

    publish()
    key = p256_key()
    answer = dev.request(csr_pem(key))

    issued_chain(answer, key)
    assert all(other["status"] == "refused" for other in dev.others)
    assert registrar_world.registrar.running


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(payload=garbage, sender=st.sampled_from(["dev-1", "dev-9", "x"]))
def test_handle_answers_garbage_with_a_refusal_or_nothing(
    registrar_world, payload, sender
):
    answer = registrar_world.registrar.handle(sender, payload)

    if answer is not None:
        assert messages.decode_response(answer)["status"] == "refused"


def test_keeps_up_with_a_burst_of_requests(registrar_world, device):
    dev = device()
    pem = csr_pem()
    ids = [new_id() for _ in range(100)]

    started = time.monotonic()
    for request_id in ids:
        dev.send(messages.encode_request(request_id, pem))
    last = dev.answer(ids[-1])
    elapsed = time.monotonic() - started

    assert last["status"] == "issued"
    assert [r["id"] for r in dev.others] == ids[:-1]
    assert len(registrar_world.registry.issuances()) == 100
    assert elapsed < 10


# The registry


@pytest.fixture
def registry(tmp_path):
    with Registry(tmp_path / "registry.sqlite") as opened:
        yield opened


def test_registry_keeps_devices_and_their_status(registry):
    added = registry.add("dev-1", serial="SN-1")
    registry.set_status("dev-1", REVOKED)

    device = registry.get("dev-1")
    assert added.status == ACTIVE
    assert device.status == REVOKED
    assert device.serial == "SN-1"
    assert device.changed_at >= device.added_at
    assert registry.get("dev-2") is None


@pytest.mark.parametrize(
    "device_id",
    [
        "",
        "a/b",
        "a+",
        "dev#1",
        "-dev",
        ".dev",
        "dév",
        "a b",
        "x" * 65,
        "registrar",
    ],
)
def test_registry_refuses_ids_unfit_for_topics_and_acls(registry, device_id):
    with pytest.raises(RegistryError):
        registry.add(device_id)
    assert registry.devices() == []


def test_registry_takes_the_longest_valid_id(registry):
    registry.add("A" + "b._-9" * 12 + "xyz")

    assert len(registry.devices()[0].device_id) == 64


def test_registry_refuses_a_device_twice(registry):
    registry.add("dev-1")

    with pytest.raises(RegistryError, match="already"):
        registry.add("dev-1")


def test_registry_refuses_changes_to_unknown_devices(registry):
    with pytest.raises(UnknownDeviceError):
        registry.set_status("dev-1", REVOKED)
    with pytest.raises(UnknownDeviceError):
        registry.record_issuance(
            "dev-1",
            1,
            "ff",
            datetime.datetime.now(datetime.UTC),
            datetime.datetime.now(datetime.UTC),
            "ldevid",
        )
    registry.add("dev-1")
    with pytest.raises(RegistryError, match="status"):
        registry.set_status("dev-1", "lost")


def test_registry_keeps_large_serials_and_order(registry):
    registry.add("dev-1")
    registry.add("dev-2")
    now = datetime.datetime.now(datetime.UTC)
    serial = x509.random_serial_number()

    registry.record_issuance("dev-1", serial, "aa", now, now, "ldevid")
    registry.record_issuance("dev-2", 2, "bb", now, now, "idevid")
    registry.record_issuance("dev-1", 3, "cc", now, now, "ldevid")

    assert [i.cert_serial for i in registry.issuances("dev-1")] == [serial, 3]
    assert [i.device_id for i in registry.issuances()] == [
        "dev-1",
        "dev-2",
        "dev-1",
    ]
    assert registry.issuances()[0].not_before == now


@pytest.mark.parametrize("status", [REVOKED, DECOMMISSIONED])
def test_registry_records_nothing_issued_to_a_device_out_of_service(
    registry, status
):
    registry.add("dev-1")
    registry.set_status("dev-1", status)
    now = datetime.datetime.now(datetime.UTC)

    with pytest.raises(OutOfServiceError) as raised:
        registry.record_issuance("dev-1", 1, "aa", now, now, "ldevid")

    assert raised.value.status == status
    assert registry.issuances() == []


def test_registry_returns_an_issuance_as_it_reads_it_back(registry):
    registry.add("dev-1")
    now = datetime.datetime.now(datetime.timezone(datetime.timedelta(hours=2)))

    recorded = registry.record_issuance(
        "dev-1", 7, "aa", now, now + datetime.timedelta(days=1), "ldevid"
    )

    assert registry.issuances() == [recorded]
    assert recorded.number == 1
    assert recorded.not_before.utcoffset() == datetime.timedelta(0)


def test_registry_is_shared_by_two_connections(tmp_path):
    path = tmp_path / "registry.sqlite"
    with Registry(path) as one, Registry(path) as two:
        one.add("dev-1")
        two.set_status("dev-1", DECOMMISSIONED)

        assert one.get("dev-1").status == DECOMMISSIONED


@pytest.mark.parametrize(
    "options",
    [
        {"lifetime": 0},
        {"backdate": -1},
        {"max_lifetime": 0},
        {"refuse_all": "because"},
        {"retry_after": -1},
    ],
)
def test_policy_refuses_settings_no_ca_would_have(options):
    with pytest.raises(registrar.RegistrarError):
        registrar.Policy(**options)


def test_registrar_serves_again_after_a_restart(registrar_world, device):
    service = registrar_world.registrar
    dev = device()

    service.stop()
    service.start()
    key = p256_key()

    issued_chain(dev.request(csr_pem(key)), key)


# Set-up


def test_prepare_is_idempotent(tmp_path):
    first = registrar.prepare(tmp_path / "r")
    files = {
        path: path.read_bytes()
        for path in (first.root_path, first.chain_path, first.key_path)
    }

    second = registrar.prepare(tmp_path / "r")

    assert second == first
    assert {p: p.read_bytes() for p in files} == files
    assert first.key_path.stat().st_mode & 0o777 == 0o600
    leaf = x509.load_pem_x509_certificate(files[first.chain_path])
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [n.value for n in names] == [registrar.NAME]


def test_prepare_replaces_a_credential_without_its_key(tmp_path):
    layout = registrar.prepare(tmp_path / "r")
    old_chain = layout.chain_path.read_bytes()
    root = layout.root_path.read_bytes()
    layout.key_path.unlink()

    registrar.prepare(tmp_path / "r")

    assert layout.key_path.exists()
    assert layout.chain_path.read_bytes() != old_chain
    assert layout.root_path.read_bytes() == root


# The command line


def run_cli(capsys, *argv):
    try:
        cli.run(list(argv))
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_manages_devices(capsys, tmp_path):
    where = ["--dir", str(tmp_path / "r")]

    assert run_cli(capsys, "registrar", "init", *where)[0] == 0
    assert run_cli(capsys, "registrar", "add", "dev-1", *where)[0] == 0
    run_cli(capsys, "registrar", "add", "dev-2", "--serial", "S2", *where)
    run_cli(capsys, "registrar", "add", "dev-3", *where)
    run_cli(capsys, "registrar", "revoke", "dev-2", *where)
    run_cli(capsys, "registrar", "decommission", "dev-3", *where)
    code, out, _ = run_cli(capsys, "registrar", "list", *where)

    assert code == 0
    lines = [line.split("\t")[:3] for line in out.splitlines()]
    assert lines == [
        ["dev-1", "active", "serial=-"],
        ["dev-2", "revoked", "serial=S2"],
        ["dev-3", "decommissioned", "serial=-"],
    ]


@pytest.mark.parametrize(
    ("argv", "set_up"),
    [
        (["add", "dev-1"], False),
        (["list"], False),
        (["add", "bad/id"], True),
        (["revoke", "nobody"], True),
        (["run", "--broker", "no-port", "--ca-file", "/etc/hostname"], True),
        (
            ["run", "--broker", "127.0.0.1:1", "--ca-file", "/etc/hostname"],
            True,
        ),
        (
            ["run", "--broker", "h:1", "--ca-file", "x", "--lifetime", "0"],
            True,
        ),
    ],
)
def test_cli_errors_are_one_line(capsys, tmp_path, argv, set_up):
    directory = tmp_path / "r"
    if set_up:
        registrar.prepare(directory)

    code, _, err = run_cli(capsys, "registrar", *argv, "--dir", str(directory))

    assert code not in (0, None)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("error: ")


def wait_for_line(stream, text):
    for line in stream:
        if text in line:
            return
    raise AssertionError(f"the registrar ended without saying {text!r}")


def test_cli_run_serves_until_sigterm(registrar_world, device):
    registrar_world.registrar.stop()
    command = [
        sys.executable,
        "-m",
        "firmware_sim",
        "registrar",
        "run",
        "--dir",
        str(registrar_world.layout.directory),
        "--broker",
        f"127.0.0.1:{registrar_world.port}",
        "--ca-file",
        str(registrar_world.ca_bundle),
        "--lifetime",
        "20",
    ]
    process = subprocess.Popen(
        command, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        wait_for_line(process.stderr, "serving on")
        key = p256_key()
        leaf = issued_chain(device().request(csr_pem(key)), key)[0]
    finally:
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=WAIT)

    assert process.returncode == 0
    assert span(leaf) == datetime.timedelta(seconds=20)
    assert "dev-1" in err and "issued serial" in err
    assert len(registrar_world.registry.issuances()) == 1


def test_cli_list_says_an_empty_file_holds_no_registry(tmp_path):
    from sim_cli import assert_refused, invoke

    layout = registrar.prepare(tmp_path / "registrar")
    for extra in layout.registry_path.parent.glob("registry.sqlite-*"):
        extra.unlink()
    layout.registry_path.write_bytes(b"")

    assert_refused(
        invoke(["registrar", "list", "--dir", str(layout.directory)]),
        "holds no registry",
    )
    assert layout.registry_path.read_bytes() == b""
    with pytest.raises(RegistryError, match="holds no registry"):
        Registry(layout.registry_path, read_only=True)


def test_cli_run_names_an_empty_credential_file(tmp_path):
    from sim_cli import assert_refused, invoke

    layout = registrar.prepare(tmp_path / "registrar")
    good = layout.chain_path.read_bytes()
    where = ["registrar", "run", "--dir", str(layout.directory),
             "--ca-file", str(layout.root_path)]  # fmt: skip
    assert_refused(invoke([*where, "--broker", "999.1.1.1:8883"]), "--broker")
    for path in (layout.chain_path, layout.key_path):
        kept = path.read_bytes()
        path.write_bytes(b"")
        result = invoke([*where, "--broker", "127.0.0.1:1"])
        assert_refused(result, f"{path} holds no PEM")
        path.write_bytes(kept)
    assert layout.chain_path.read_bytes() == good


@pytest.mark.parametrize(
    "serial", ["a b", "", " ", "tab\there", "é", "x" * 65]
)
def test_cli_add_refuses_a_serial_the_agent_would_refuse(
    capsys, tmp_path, serial
):
    """The agent's own rule: 1 to 64 printable ASCII, no space."""
    where = ["--dir", str(tmp_path / "r")]
    assert run_cli(capsys, "registrar", "init", *where)[0] == 0

    code, _, err = run_cli(
        capsys, "registrar", "add", "x2", "--serial", serial, *where
    )

    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "--serial" in err and "without spaces" in err
    assert run_cli(capsys, "registrar", "list", *where)[1] == ""


def test_registry_refuses_a_serial_the_agent_would_refuse(registry):
    with pytest.raises(RegistryError, match="without spaces"):
        registry.add("x2", serial="a b")

    assert registry.devices() == []
    assert registry.add("x2", serial="SN-1~!").serial == "SN-1~!"


@pytest.mark.parametrize("name", ["registrar", "Registrar", "MONITOR"])
def test_service_names_in_any_case_are_no_device_ids(
    capsys, tmp_path, registry, name
):
    where = ["--dir", str(tmp_path / "r")]
    assert run_cli(capsys, "registrar", "init", *where)[0] == 0

    code, _, err = run_cli(capsys, "registrar", "add", name, *where)

    assert code == 2
    assert "reserved for a broker service" in err
    with pytest.raises(RegistryError, match="reserved"):
        registry.add(name)
