"""Bring-up through the CLI against a real swtpm and a real mosquitto."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
import textwrap

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from device_cli import Device

from firmware_sim.ca import CertificateAuthority, chain_pem

NOW = datetime.datetime.now(datetime.UTC)


@pytest.fixture(params=["tpm", "software"])
def device(request, tmp_path):
    if request.param == "tpm":
        tpm = request.getfixturevalue("swtpm")
        made = Device(tmp_path, tpm.tcti)
        made.swtpm = tpm
        return made
    return Device(tmp_path, None)


@pytest.fixture
def tpm_device(tmp_path, swtpm):
    made = Device(tmp_path, swtpm.tcti)
    made.swtpm = swtpm
    return made


def one_line_error(result) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: ")
    return lines[0]


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_publish_and_receive_over_mutual_tls(
    device, factory_ca, broker_factory, tls
):
    broker = broker_factory()
    device.init(broker.port, factory_ca.root_path)
    device.enroll(factory_ca)
    topic = f"devices/{device.id}/hello"

    result = device.run(
        "connect", "--tls-max-version", tls,
        "--subscribe", topic, "--publish", topic, "hi there",
        "--count", "1", "--timeout", "10",
    )  # fmt: skip

    assert f"over TLSv{tls}" in result.out
    assert f"{topic} hi there" in result.out
    assert f"u'{device.id}'" in broker.log_text()
    if device.tcti:
        assert device.swtpm.transient_handles() == []


def test_status_reports_key_and_certificate(device, factory_ca):
    device.init(8883, factory_ca.root_path)
    device.enroll(factory_ca, days=30)
    result = device.run("status", "--json")
    import json

    report = json.loads(result.out)
    assert report["device_id"] == device.id
    factory = report["identities"]["idevid"]
    assert factory["key"]["hardware_protected"] is bool(device.tcti)
    assert factory["certificate"]["state"] == "valid"
    assert 29 < factory["certificate"]["days_left"] <= 30
    assert report["identities"]["ldevid"]["key"] is None
    text = device.run("status").out
    if not device.tcti:
        assert "NOT hardware-protected" in text


def test_tpm_key_matches_csr_and_blob_holds_no_scalar(tpm_device, factory_ca):
    tpm_device.init(8883, factory_ca.root_path)
    tpm_device.run("keygen")
    request = tpm_device.csr()
    key_file = next(tpm_device.state.glob("idevid/generations/*/key.*"))
    blob = key_file.read_bytes()

    from tpm2_pytss.constants import TPMA_OBJECT
    from tpm2_pytss.tsskey import TSSPrivKey

    parsed = TSSPrivKey.from_pem(blob)
    attributes = parsed.public.publicArea.objectAttributes
    for flag in (
        TPMA_OBJECT.FIXEDTPM,
        TPMA_OBJECT.FIXEDPARENT,
        TPMA_OBJECT.SENSITIVEDATAORIGIN,
    ):
        assert attributes & flag
    assert blob.startswith(b"-----BEGIN TSS2 PRIVATE KEY-----")
    assert request.is_signature_valid
    public = request.public_key()

    from device_agent.keys.tpm import TPMKeyStore

    assert TPMKeyStore(tpm_device.tcti).public_key(key_file) == public
    # No 32-byte window of the blob, in either byte order, is the scalar.
    raw = parsed.to_der()
    target = public.public_numbers()
    order = int(
        "FFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551", 16
    )
    for start in range(len(raw) - 31):
        for window in (raw[start : start + 32], raw[start : start + 32][::-1]):
            value = int.from_bytes(window, "big")
            if 0 < value < order:
                guess = ec.derive_private_key(value, ec.SECP256R1())
                assert guess.public_key().public_numbers() != target
    assert tpm_device.swtpm.transient_handles() == []


_HANDSHAKE = textwrap.dedent(
    """
    import socket, sys
    from pathlib import Path
    from device_agent import tls
    tcti, ca, chain, key, port = sys.argv[1:]
    tls.load_tpm_provider(tcti)
    # With TLS 1.2 the handshake only completes once the broker has
    # checked our signature, so a bad or missing one fails right here.
    context = tls.client_context(
        Path(ca), Path(chain), Path(key), max_version="1.2"
    )
    def handshake():
        raw = socket.create_connection(("127.0.0.1", int(port)), timeout=5)
        # The client signs its CertificateVerify inside the handshake.
        with context.wrap_socket(raw, server_hostname="127.0.0.1"):
            pass
    handshake()
    print("first handshake ok", flush=True)
    sys.stdin.readline()
    try:
        handshake()
    except Exception as exc:
        print("second handshake failed:", type(exc).__name__, flush=True)
    else:
        print("second handshake ok", flush=True)
    """
)


def test_the_tls_signature_is_made_in_the_tpm(
    tpm_device, factory_ca, broker_factory
):
    """With swtpm stopped, a context that holds the key cannot handshake."""
    broker = broker_factory()
    tpm_device.init(broker.port, factory_ca.root_path)
    chain = tpm_device.enroll(factory_ca)
    key_file = next(tpm_device.state.glob("idevid/current/key.*"))

    process = subprocess.Popen(
        [sys.executable, "-c", _HANDSHAKE, tpm_device.tcti,
         str(factory_ca.root_path), str(chain), str(key_file),
         str(broker.port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert process.stdout.readline().strip() == "first handshake ok"
        tpm_device.swtpm.stop()
        process.stdin.write("go\n")
        process.stdin.flush()
        assert process.stdout.readline().startswith("second handshake failed")
    finally:
        process.kill()
        process.wait()


def test_broker_from_another_ca_is_refused(
    device, factory_ca, broker_factory, tmp_path
):
    other = CertificateAuthority.create(tmp_path / "other", name="Other")
    broker = broker_factory()
    device.init(
        broker.port, other.root_path,
        "--trust-anchor", str(factory_ca.root_path),
    )  # fmt: skip
    device.enroll(factory_ca)
    line = one_line_error(device.run("connect", check=False))
    assert "broker certificate refused" in line


def test_broker_name_mismatch_is_refused(device, factory_ca, broker_factory):
    broker = broker_factory()
    device.init(
        broker.port, factory_ca.root_path, "--server-name", "mqtt.example"
    )
    device.enroll(factory_ca)
    line = one_line_error(device.run("connect", check=False))
    assert "mismatch" in line or "mqtt.example" in line


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_device_certificate_from_another_ca_is_refused(
    device, factory_ca, broker_factory, tmp_path, tls
):
    other = CertificateAuthority.create(tmp_path / "other", name="Other")
    broker = broker_factory()
    device.init(
        broker.port, factory_ca.root_path,
        "--trust-anchor", str(other.root_path),
    )  # fmt: skip
    device.enroll(other)
    result = device.run("connect", "--tls-max-version", tls, check=False)
    line = one_line_error(result)
    assert "alert" in line or "refused" in line


def test_no_client_certificate_is_refused(factory_ca, broker_factory):
    import ssl

    from device_agent.errors import SessionError
    from device_agent.session import Session

    broker = broker_factory()

    def context():
        made = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        made.load_verify_locations(factory_ca.root_path)
        return made

    session = Session("127.0.0.1", broker.port, "nobody", context)
    with pytest.raises(SessionError) as info:
        session.open()
    assert "\n" not in str(info.value)
    assert info.value.reason in ("refused", "tls")


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        ("other-ca", "unknown-ca"),
        ("expired", "expired"),
        ("not-yet-valid", "not-yet-valid"),
        ("server-only", "not-client"),
        ("other-key", "not-our-key"),
        ("garbage", "unreadable"),
        ("leaf-only", "unknown-ca"),
    ],
)
def test_bad_chains_are_refused_and_change_nothing(
    device, factory_ca, tmp_path, make, reason
):
    device.init(8883, factory_ca.root_path)
    device.enroll(factory_ca)
    device.run("keygen", "--force")  # a pending key must survive too
    request = device.csr()
    before = device.snapshot()

    if make == "other-ca":
        other = CertificateAuthority.create(tmp_path / "o", name="Other")
        data = chain_pem(other.sign_csr(request))
    elif make == "expired":
        data = chain_pem(
            factory_ca.sign_csr(
                request,
                not_before=NOW - datetime.timedelta(days=20),
                not_after=NOW - datetime.timedelta(days=1),
            )
        )
    elif make == "not-yet-valid":
        data = chain_pem(
            factory_ca.sign_csr(
                request,
                not_before=NOW + datetime.timedelta(days=2),
                not_after=NOW + datetime.timedelta(days=20),
            )
        )
    elif make == "server-only":
        data = chain_pem(
            factory_ca.sign_csr(request, eku=[ExtendedKeyUsageOID.SERVER_AUTH])
        )
    elif make == "other-key":
        from device_agent import csr

        stranger = ec.generate_private_key(ec.SECP256R1())
        data = chain_pem(
            factory_ca.sign_csr(csr.build(stranger, device.id, "urn:x"))
        )
    elif make == "garbage":
        data = b"-----BEGIN CERTIFICATE-----\nnot base64\n"
    else:
        data = chain_pem(factory_ca.sign_csr(request)[:1])

    path = tmp_path / "bad.pem"
    path.write_bytes(data)
    line = one_line_error(device.run("install-chain", str(path), check=False))
    assert f"({reason})" in line
    assert device.snapshot() == before


def test_keygen_refuses_to_replace_without_force(device, factory_ca):
    device.init(8883, factory_ca.root_path)
    device.run("keygen")
    before = device.snapshot()
    line = one_line_error(device.run("keygen", check=False))
    assert "--force" in line
    assert device.snapshot() == before


def test_software_key_readable_by_others_is_refused(tmp_path, factory_ca):
    device = Device(tmp_path, None)
    device.init(8883, factory_ca.root_path)
    device.enroll(factory_ca)
    key_file = next(device.state.glob("idevid/current/key.*"))
    key_file.chmod(0o644)
    line = one_line_error(device.run("csr", check=False))
    assert "readable by group or others" in line
    line = one_line_error(device.run("connect", check=False))
    assert "readable by group or others" in line


def test_tpm_store_never_falls_back_to_software(tmp_path, factory_ca):
    device = Device(tmp_path, "swtpm:host=127.0.0.1,port=1")
    device.init(8883, factory_ca.root_path)
    line = one_line_error(device.run("keygen", check=False))
    assert "TPM" in line
    assert not list(device.state.glob("idevid/generations/*"))


def test_auto_uses_software_and_says_so(tmp_path, factory_ca):
    device = Device(tmp_path, None)
    device.run(
        "init", "--device-id", "d1", "--key-store", "auto",
        "--tcti", "swtpm:host=127.0.0.1,port=1",
        "--state-dir", str(device.state),
        "--broker", "127.0.0.1:8883", "--ca-file", str(factory_ca.root_path),
    )  # fmt: skip
    result = device.run("keygen")
    assert "NOT hardware-protected" in result.out
    assert "software store" in result.err


def test_auto_keeps_using_the_tpm_once_a_key_is_there(tpm_device, factory_ca):
    device = tpm_device
    device.init(8883, factory_ca.root_path, "--key-store", "auto")
    device.run("keygen")
    line = one_line_error(
        device.run(
            "--set", "tcti=swtpm:host=127.0.0.1,port=1",
            "keygen", "--force", check=False,
        )
    )  # fmt: skip
    assert "TPM" in line
    assert len(list(device.state.glob("idevid/generations/*"))) == 1


def test_connect_without_the_tpm_names_the_tpm(
    tpm_device, factory_ca, broker_factory
):
    broker = broker_factory()
    tpm_device.init(broker.port, factory_ca.root_path)
    tpm_device.enroll(factory_ca)
    tpm_device.swtpm.stop()
    line = one_line_error(tpm_device.run("connect", check=False))
    assert "TPM" in line
    assert "provider" not in line


def test_a_refused_publish_is_reported(device, factory_ca, broker_factory):
    broker = broker_factory()
    device.init(broker.port, factory_ca.root_path)
    device.enroll(factory_ca)
    result = device.run(
        "connect", "--publish", "devices/someone-else/cmd", "x", check=False
    )
    assert "Not authorized" in one_line_error(result)


@pytest.mark.parametrize("tls", ["1.2", "1.3"])
def test_a_revoked_device_is_told_why(
    device, factory_ca, broker_factory, tmp_path, tls
):
    crl = tmp_path / "crl.pem"
    crl.write_bytes(factory_ca.crl())
    broker = broker_factory(crl_file=crl)
    device.init(broker.port, factory_ca.root_path)
    device.enroll(factory_ca)
    assert device.run("connect").returncode == 0

    report = json.loads(device.run("status", "--json").out)
    serial = int(report["identities"]["idevid"]["certificate"]["serial"], 16)
    crl.write_bytes(factory_ca.crl([serial]))
    broker.reload()
    line = one_line_error(
        device.run("connect", "--tls-max-version", tls, check=False)
    )
    assert "revoked" in line


def test_an_install_interrupted_after_writing_the_chain_can_be_finished(
    device, factory_ca
):
    """A crash between writing chain.pem and moving "current" is mended
    by installing the same chain again."""
    from device_agent.store import CredentialStore

    device.init(8883, factory_ca.root_path)
    device.run("keygen")
    chain_pem_bytes = chain_pem(factory_ca.sign_csr(device.csr()))
    store = CredentialStore(device.state)
    store.stage(store.pending(), chain_pem_bytes)  # then the power went

    path = device.dir / "chain.pem"
    path.write_bytes(chain_pem_bytes)
    device.run("install-chain", str(path))
    report = device.run("status", "--json").out
    assert '"pending_generation": null' in report
    assert '"state": "valid"' in report


def test_mqtt_3_1_1_by_option(tmp_path, factory_ca, broker_factory):
    broker = broker_factory()
    device = Device(tmp_path, None)
    device.init(broker.port, factory_ca.root_path)
    device.enroll(factory_ca)
    device.configure(mqtt_version="3.1.1")
    topic = f"devices/{device.id}/old"
    result = device.run(
        "connect", "--subscribe", topic, "--publish", topic, "v4",
        "--count", "1", "--timeout", "10",
    )  # fmt: skip
    assert f"{topic} v4" in result.out
    assert "(p2, " in broker.log_text()  # MQTT 3.1.1 in mosquitto's log


def test_status_names_a_tpm_key_that_no_longer_loads(
    tpm_device, factory_ca, tmp_path
):
    """Another TPM (or the same one cleared) cannot load the device's key."""
    from conftest import start_on_free_port

    from tpm_simulator.ports import free_port_pair
    from tpm_simulator.swtpm import Swtpm

    tpm_device.init(1, factory_ca.root_path)
    tpm_device.enroll(factory_ca)
    report = json.loads(tpm_device.run("status", "--json").out)
    assert report["problems"] == []

    other = start_on_free_port(
        lambda: Swtpm(tmp_path / "other-tpm", free_port_pair())
    )
    try:
        result = tpm_device.run(
            "--set", f"tcti={other.tcti}", "status", "--json", check=False
        )
    finally:
        other.stop()
    assert result.returncode != 0
    problems = [p["problem"] for p in json.loads(result.out)["problems"]]
    assert any(
        p.startswith("factory: the key does not load in the TPM")
        and "cleared" in p
        for p in problems
    ), problems
