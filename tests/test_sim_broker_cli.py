"""firmware-sim ca server-cert, ca crl and broker: a broker set up by hand."""

import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
from conftest import PORT_ATTEMPTS, Identity
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from sim_cli import assert_refused, invoke, mark_issued, tree

from firmware_sim import registrar
from firmware_sim.ca import CertificateAuthority, chain_pem, key_pem
from tpm_simulator.ports import free_port, port_is_free

TLS12 = ssl.TLSVersion.TLSv1_2
BROKER_FILES = [
    "acl",
    "ca-bundle.pem",
    "crl.pem",
    "mosquitto.conf",
    "server.key",
    "server.pem",
]
STARTED_WITHIN = 10
REVOKED_ALERT = "SSLV3_ALERT_CERTIFICATE_REVOKED"


@pytest.fixture
def registrar_dir(tmp_path):
    """A registrar directory made by 'registrar init'."""
    directory = tmp_path / "registrar"
    result = invoke(["registrar", "init", "--dir", str(directory)])
    assert result.exit_code == 0, result.output
    return directory


@pytest.fixture
def operational_ca(registrar_dir):
    return CertificateAuthority.load(registrar.Layout(registrar_dir).ca_dir)


@pytest.fixture
def broker_dir():
    """A directory 'broker files' may make, reachable by mosquitto's user.

    As root, mosquitto reads its files as user mosquitto, which cannot
    enter pytest's tmp_path; so this lies under the system's temporary
    directory, in a parent that user may enter.
    """
    parent = Path(tempfile.mkdtemp(prefix="broker-files-"))
    parent.chmod(0o755)
    yield parent / "broker"
    shutil.rmtree(parent)


@pytest.fixture
def files_for(factory_ca, registrar_dir):
    """Run 'broker files' into a directory with the CAs of the test."""

    def files(directory, *args):
        return invoke(
            [
                "broker", "files",
                "--dir", str(directory),
                "--factory-ca", str(factory_ca.directory),
                "--registrar-dir", str(registrar_dir),
                *args,
            ]
        )  # fmt: skip

    return files


class RunningBroker:
    """'firmware-sim broker run', which becomes mosquitto, and its log."""

    def __init__(self, directory, port, log_path):
        self.directory = directory
        self.port = port
        self.log_path = log_path
        with log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable, "-m", "firmware_sim",
                    "broker", "run", "--dir", str(directory),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    def wait_ready(self):
        """Whether mosquitto listens; False if it ended, say on a port."""
        deadline = time.monotonic() + STARTED_WITHIN
        while " running" not in self.log() or port_is_free(self.port):
            if self.process.poll() is not None:
                return False
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.01)
        return True

    def log(self):
        return self.log_path.read_text(errors="replace")

    def reload(self):
        reloads = self.log().count("Reloading config.")
        self.process.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + STARTED_WITHIN
        while self.log().count("Reloading config.") <= reloads:
            assert time.monotonic() < deadline, self.log()
            time.sleep(0.01)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STARTED_WITHIN)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def served(broker_dir, files_for, tmp_path):
    """Files from 'broker files' and mosquitto running on them."""
    brokers = []
    try:
        yield _serve(broker_dir, files_for, tmp_path, brokers)
    finally:
        for broker in brokers:
            broker.stop()


def _serve(broker_dir, files_for, tmp_path, brokers):
    # A port picked free can be taken before mosquitto binds it; then
    # the files are made again for another.
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        force = ["--force"] if attempt else []
        made = files_for(broker_dir, "--port", str(port), *force)
        assert made.exit_code == 0, made.output

        broker = RunningBroker(broker_dir, port, tmp_path / f"log{attempt}")
        brokers.append(broker)
        if broker.wait_ready():
            return broker
        assert "address already in use" in broker.log().lower(), broker.log()
    pytest.fail("no free port for mosquitto")


@pytest.fixture
def signing(tmp_path, factory_ca):
    """Files that outputs must leave alone, for refusals."""
    (tmp_path / "file").write_text("x")
    (tmp_path / "old.pem").write_text("old")
    (tmp_path / "dir").mkdir()
    (tmp_path / "nothing").mkdir()
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link.pem").symlink_to(tmp_path / "old.pem")
    return tmp_path


def test_server_cert_is_a_server_chain_with_a_new_private_key(
    tmp_path, factory_ca
):
    cert_file = tmp_path / "server.pem"
    key_file = tmp_path / "server.key"

    result = _server_cert(
        factory_ca,
        "--name", "mqtt.example.net", "--name", "10.0.0.5",
        "--out-cert", str(cert_file), "--out-key", str(key_file),
        "--days", "30",
    )  # fmt: skip

    assert result.exit_code == 0, result.output
    leaf, intermediate = x509.load_pem_x509_certificates(
        cert_file.read_bytes()
    )
    assert intermediate == factory_ca.intermediate
    leaf.verify_directly_issued_by(factory_ca.intermediate)
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert list(eku.value) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == ["mqtt.example.net"]
    assert [str(a) for a in san.value.get_values_for_type(x509.IPAddress)] == [
        "10.0.0.5"
    ]
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 30 <= lifetime.days <= 31

    key = serialization.load_pem_private_key(key_file.read_bytes(), None)
    assert key.public_key() == leaf.public_key()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert f"serial {leaf.serial_number:x}" in result.output


def test_server_cert_replaces_files_only_when_forced(tmp_path, factory_ca):
    cert_file = tmp_path / "server.pem"
    key_file = tmp_path / "server.key"
    out = ["--out-cert", str(cert_file), "--out-key", str(key_file)]
    first = _server_cert(factory_ca, "--name", "a.example", *out)
    before = tree(tmp_path)

    again = _server_cert(factory_ca, "--name", "a.example", *out)
    forced = _server_cert(factory_ca, "--name", "b.example", *out, "--force")

    assert first.exit_code == 0, first.output
    assert_refused(again, "--force")
    assert forced.exit_code == 0, forced.output
    assert tree(tmp_path) != before
    leaf = x509.load_pem_x509_certificate(cert_file.read_bytes())
    assert "b.example" in leaf.subject.rfc4514_string()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".partial"]


SERVER_CERT_REFUSALS = {
    "name with a space": (["--name", "a b"], "--name"),
    "empty name": (["--name", ""], "--name"),
    "name starting with a hyphen": (["--name", "-a.example"], "--name"),
    "label too long": (["--name", "a" * 64 + ".example"], "--name"),
    "common name too long": (
        ["--name", "a" * 40 + "." + "b" * 40],
        "common name",
    ),
    "zero days": (["--days", "0"], "--days"),
    "too many days": (["--days", "99999999"], "--days"),
    "empty out-cert": (["--out-cert", ""], "--out-cert"),
    "out-cert is a dir": (["--out-cert", "{tmp}/dir"], "dir"),
    "out-cert in a missing dir": (["--out-cert", "/nonexist/x"], "/nonexist"),
    "out-cert under a file": (["--out-cert", "{tmp}/file/x"], "file"),
    "out-cert exists": (["--out-cert", "{tmp}/old.pem"], "--force"),
    "out-key is a fifo": (["--out-key", "{tmp}/fifo", "--force"], "fifo"),
    "out-key is a symlink": (
        ["--out-key", "{tmp}/link.pem", "--force"],
        "link.pem",
    ),
    "out-key is the CA's key": (
        ["--out-key", "{tmp}/factory-ca/intermediate.key", "--force"],
        "intermediate.key",
    ),
    "out-key is out-cert": (["--out-key", "{tmp}/new.pem"], "--out-key"),
    "dir without a CA": (["--dir", "{tmp}/nothing"], "ca init"),
}


@pytest.mark.parametrize(
    ("args", "named"),
    SERVER_CERT_REFUSALS.values(),
    ids=SERVER_CERT_REFUSALS.keys(),
)
def test_server_cert_refuses_bad_input_in_one_line(signing, args, named):
    options = {
        "--dir": "{tmp}/factory-ca",
        "--name": "mqtt.example",
        "--out-cert": "{tmp}/new.pem",
        "--out-key": "{tmp}/new.key",
    }
    flags = [arg for arg in args if arg == "--force"]
    pairs = [arg for arg in args if arg != "--force"]
    options.update(zip(pairs[::2], pairs[1::2], strict=True))
    argv = ["ca", "server-cert", *flags]
    for option, value in options.items():
        argv += [option, value.format(tmp=signing)]
    before = tree(signing)

    result = invoke(argv)

    assert_refused(result, named)
    assert tree(signing) == before


def test_crl_revokes_and_later_crls_keep_the_revocations(tmp_path, factory_ca):
    out = tmp_path / "crl.pem"

    mark_issued(factory_ca, 0x1A2B, 0xFF)
    first = _crl(factory_ca, out, "--revoke", "1A:2b", "--revoke", "0xff")
    second = _crl(factory_ca, out, "--revoke", "ff", "--days", "7")

    assert first.exit_code == 0, first.output
    assert second.exit_code == 0, second.output
    assert "2 revoked" in second.output
    crl = x509.load_pem_x509_crl(out.read_bytes())
    assert crl.is_signature_valid(factory_ca.intermediate.public_key())
    assert crl.issuer == factory_ca.intermediate.subject
    assert sorted(r.serial_number for r in crl) == [0xFF, 0x1A2B]
    lifetime = crl.next_update_utc - crl.last_update_utc
    assert lifetime.days == 7
    assert sorted(factory_ca.revocations()) == [0xFF, 0x1A2B]


def test_crl_names_a_bad_line_of_the_revocation_record(tmp_path, factory_ca):
    factory_ca.revoked_path.write_text(
        "# edited by hand\nab 2026-01-01T00:00:00Z\nab yesterday\n"
    )

    result = _crl(factory_ca, tmp_path / "crl.pem")

    assert_refused(result, "revoked.txt, line 3")
    assert not (tmp_path / "crl.pem").exists()


def test_a_revocation_being_written_is_left_out_until_whole(factory_ca):
    factory_ca.revoked_path.write_text("ab 2026-01-01T00:00:00Z\ncd 2026")

    assert list(factory_ca.revocations()) == [0xAB]


def test_revocations_at_once_are_each_recorded_once(factory_ca):
    start = threading.Barrier(16)

    def revoke(serial):
        start.wait()
        factory_ca.revoke([0x5EED, serial])

    mark_issued(factory_ca, 0x5EED, *range(1, 17))
    threads = [
        threading.Thread(target=revoke, args=(serial,))
        for serial in range(1, 17)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    lines = factory_ca.revoked_path.read_text().splitlines()
    assert sorted(int(line.split()[0], 16) for line in lines) == [
        *range(1, 17),
        0x5EED,
    ]


CRL_REFUSALS = {
    "serial not hex": (["--revoke", "zz"], "--revoke"),
    "serial zero": (["--revoke", "0"], "--revoke"),
    "serial empty": (["--revoke", ""], "--revoke"),
    "serial negative": (["--revoke", "-1"], "--revoke"),
    "serial too long": (["--revoke", "f" * 41], "--revoke"),
    "zero days": (["--days", "0"], "--days"),
    "out is a fifo": (["--out", "{tmp}/fifo"], "fifo"),
    "out is a symlink": (["--out", "{tmp}/link.pem"], "link.pem"),
    "out is the CA's key": (["--out", "{tmp}/factory-ca/root.key"], "root"),
    "out is the CA's revocations": (
        ["--out", "{tmp}/factory-ca/revoked.txt"],
        "revoked.txt",
    ),
    "dir without a CA": (["--dir", "{tmp}/nothing"], "ca init"),
}


@pytest.mark.parametrize(
    ("args", "named"), CRL_REFUSALS.values(), ids=CRL_REFUSALS.keys()
)
def test_crl_refuses_bad_input_in_one_line(signing, factory_ca, args, named):
    mark_issued(factory_ca, 0x10, 0xABC)
    factory_ca.revoke([0x10])
    options = {"--dir": "{tmp}/factory-ca", "--out": "{tmp}/crl.pem"}
    options["--revoke"] = "abc"
    options.update(zip(args[::2], args[1::2], strict=True))
    argv = ["ca", "crl"]
    for option, value in options.items():
        argv += [option, value.format(tmp=signing)]
    before = tree(signing)

    result = invoke(argv)

    assert_refused(result, named)
    assert tree(signing) == before


def _outputs_to_keep(ca):
    """Files an output of 'ca sign' or 'ca crl' must not replace."""
    chain, key = ca.issue_client_cert("dev-1")
    return {
        "config": b'device_id = "dev-1"\nserial = "SN-1"\n',
        "key": key_pem(key),
        "key and chain": key_pem(key) + chain_pem(chain),
        "CA certificate": chain_pem([ca.root]),
        "chain": chain_pem(chain),
        "CRL": ca.crl(),
        "crlfile of two CAs": ca.crl() + ca.crl(),
        "empty": b"",
    }


KEPT_BY = {
    "sign": [
        "config",
        "key",
        "key and chain",
        "CA certificate",
        "CRL",
        "crlfile of two CAs",
        "empty",
    ],
    "crl": [
        "config",
        "key",
        "key and chain",
        "CA certificate",
        "chain",
        "crlfile of two CAs",
        "empty",
    ],
}


@pytest.mark.parametrize(
    ("command", "kind"),
    [(command, kind) for command, kinds in KEPT_BY.items() for kind in kinds],
)
def test_sign_and_crl_replace_only_what_they_write(
    tmp_path, factory_ca, command, kind
):
    """A mistyped --out costs no config or key; the refusal names it."""
    out = tmp_path / "agent.toml"
    out.write_bytes(_outputs_to_keep(factory_ca)[kind])
    csr_file = tmp_path / "device.csr"
    csr_file.write_bytes(_csr_pem("dev-2"))
    before = tree(tmp_path)

    if command == "sign":
        result = _sign(factory_ca, csr_file, out)
    else:
        result = _crl(factory_ca, out, "--revoke", "abc")

    assert_refused(result, str(out))
    assert "left alone" in result.output
    assert tree(tmp_path) == before


@pytest.mark.parametrize("encoding", ["PEM", "DER"])
def test_sign_and_crl_replace_what_they_wrote_before(
    tmp_path, factory_ca, encoding
):
    chain, _ = factory_ca.issue_client_cert("dev-1")
    crl = x509.load_pem_x509_crl(factory_ca.crl())
    as_der = serialization.Encoding.DER
    chain_out, crl_out = tmp_path / "chain", tmp_path / "crl"
    if encoding == "DER":
        chain_out.write_bytes(chain[0].public_bytes(as_der))
        crl_out.write_bytes(crl.public_bytes(as_der))
    else:
        chain_out.write_bytes(chain_pem(chain))
        crl_out.write_bytes(factory_ca.crl())
    csr_file = tmp_path / "device.csr"
    csr_file.write_bytes(_csr_pem("dev-2"))

    mark_issued(factory_ca, 0xABC)
    signed = _sign(factory_ca, csr_file, chain_out)
    listed = _crl(factory_ca, crl_out, "--revoke", "abc")

    assert signed.exit_code == 0, signed.output
    assert listed.exit_code == 0, listed.output
    leaf = x509.load_pem_x509_certificates(chain_out.read_bytes())[0]
    assert leaf.subject.rfc4514_string() == "CN=dev-2"
    assert [r.serial_number for r in x509.load_pem_x509_crl(
        crl_out.read_bytes())] == [0xABC]  # fmt: skip


def test_sign_and_crl_help_say_what_they_replace():
    for command, what in (("sign", "leaf certificate"), ("crl", "single CRL")):
        text = " ".join(invoke(["ca", command, "--help"]).output.split())
        assert f"replaced only if it holds a {what}" in text


def test_broker_files_hold_both_roots_both_crls_and_the_acl(
    broker_dir, files_for, factory_ca, operational_ca
):
    result = files_for(broker_dir, "--port", "18883", "--name", "mq.example")

    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in broker_dir.iterdir()) == BROKER_FILES
    roots = x509.load_pem_x509_certificates(
        (broker_dir / "ca-bundle.pem").read_bytes()
    )
    assert roots == [factory_ca.root, operational_ca.root]
    issuers = [
        crl.issuer for crl in _crls((broker_dir / "crl.pem").read_bytes())
    ]
    assert issuers == [
        factory_ca.intermediate.subject,
        operational_ca.intermediate.subject,
    ]
    leaf = x509.load_pem_x509_certificate(
        (broker_dir / "server.pem").read_bytes()
    )
    leaf.verify_directly_issued_by(factory_ca.intermediate)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.DNSName) == [
        "mq.example",
        "localhost",
    ]

    acl = (broker_dir / "acl").read_text().splitlines()
    assert "pattern readwrite devices/%u/#" in acl
    user = acl.index(f"user {registrar.NAME}")
    assert acl[user + 1 : user + 3] == [
        "topic readwrite devices/+/enroll/request",
        "topic readwrite devices/+/enroll/response",
    ]
    conf = (broker_dir / "mosquitto.conf").read_text().splitlines()
    for line in [
        "listener 18883 127.0.0.1",
        "require_certificate true",
        "use_identity_as_username true",
        "allow_anonymous false",
        "tls_version tlsv1.2",
        f"cafile {broker_dir / 'ca-bundle.pem'}",
        f"crlfile {broker_dir / 'crl.pem'}",
        f"acl_file {broker_dir / 'acl'}",
    ]:
        assert line in conf
    assert f"mosquitto -c {broker_dir / 'mosquitto.conf'}" in result.output


def test_broker_files_are_for_mosquittos_group_alone_when_root(
    broker_dir, files_for
):
    if os.geteuid() != 0:
        pytest.skip("only root hands files to mosquitto's group")
    import grp

    result = files_for(broker_dir)

    assert result.exit_code == 0, result.output
    mosquitto = grp.getgrnam("mosquitto").gr_gid
    key = (broker_dir / "server.key").stat()
    assert stat.S_IMODE(key.st_mode) == 0o640
    assert (key.st_uid, key.st_gid) == (0, mosquitto)
    directory = broker_dir.stat()
    assert stat.S_IMODE(directory.st_mode) == 0o750
    assert directory.st_gid == mosquitto


def test_broker_files_replace_files_only_when_forced(broker_dir, files_for):
    first = files_for(broker_dir)
    before = tree(broker_dir)

    again = files_for(broker_dir)
    unchanged = tree(broker_dir)
    forced = files_for(broker_dir, "--force")

    assert first.exit_code == 0, first.output
    assert_refused(again, "--force")
    assert unchanged == before
    assert forced.exit_code == 0, forced.output
    assert tree(broker_dir) != before


BROKER_FILES_REFUSALS = {
    "port 0": (["--port", "0"], "--port"),
    "port too large": (["--port", "65536"], "--port"),
    "host with a space": (["--host", "a b"], "--host"),
    "wildcard host": (["--host", "*.example"], "--host"),
    "no such IPv4 address": (["--host", "999.1.1.1"], "--host"),
    "bad name": (["--name", "a..b"], "--name"),
    "zero days": (["--days", "0"], "--days"),
    "zero crl days": (["--crl-days", "0"], "--crl-days"),
    "empty dir": (["--dir", ""], "--dir"),
    "dir under a file": (["--dir", "{tmp}/file/x"], "file"),
    "no factory CA": (["--factory-ca", "{tmp}/none"], "ca init"),
    "no registrar": (["--registrar-dir", "{tmp}/none"], "registrar init"),
    "factory CA is the registrar's": (
        ["--factory-ca", "{tmp}/registrar/ca"],
        "registrar's CA",
    ),
}


@pytest.mark.parametrize(
    ("args", "named"),
    BROKER_FILES_REFUSALS.values(),
    ids=BROKER_FILES_REFUSALS.keys(),
)
def test_broker_files_refuse_bad_input_in_one_line(
    tmp_path, broker_dir, files_for, args, named
):
    (tmp_path / "file").write_text("x")
    before = tree(tmp_path)

    result = files_for(broker_dir, *[a.format(tmp=tmp_path) for a in args])

    assert_refused(result, named)
    assert not broker_dir.exists()
    assert tree(tmp_path) == before


def test_broker_files_leave_a_directory_in_a_file_place_alone(
    broker_dir, files_for
):
    (broker_dir / "server.key").mkdir(parents=True)

    result = files_for(broker_dir, "--force")

    assert_refused(result, "server.key")
    assert [p.name for p in broker_dir.iterdir()] == ["server.key"]


def test_broker_files_explain_a_directory_mosquitto_cannot_enter(
    tmp_path, files_for
):
    """As root, mosquitto's user cannot enter pytest's private tmp_path."""
    if os.geteuid() != 0:
        pytest.skip("only root hands files to the mosquitto user")

    result = files_for(tmp_path / "broker")

    assert_refused(result, "cannot enter")
    assert not (tmp_path / "broker").exists()


def test_devices_of_both_cas_and_the_registrar_use_the_broker(
    served, broker_dir, make_identity, mqtt_probe, factory_ca, operational_ca
):
    bundle = broker_dir / "ca-bundle.pem"
    factory_device = make_identity("dev-f", ca=factory_ca)
    device = make_identity("dev-o", ca=operational_ca)

    first = mqtt_probe("factory-device")
    second = mqtt_probe("operational-device")
    assert first.connect(served.port, bundle, factory_device)
    assert second.connect(served.port, bundle, device)

    second.subscribe("devices/dev-o/#")
    first.publish("devices/dev-f/hello", b"from the factory key")
    second.publish("devices/dev-o/hello", b"from the operational key")
    received = second.wait_for_message("devices/dev-o/hello")
    assert received.payload == b"from the operational key"


def test_the_registrar_reaches_the_enrollment_topics(
    served, broker_dir, registrar_dir, make_identity, mqtt_probe, factory_ca
):
    bundle = broker_dir / "ca-bundle.pem"
    layout = registrar.Layout(registrar_dir)
    service = Identity(
        registrar.NAME,
        x509.load_pem_x509_certificates(layout.chain_path.read_bytes()),
        layout.chain_path,
        layout.key_path,
    )
    device = mqtt_probe("device")
    assert device.connect(
        served.port, bundle, make_identity("x", ca=factory_ca)
    )
    service_probe = mqtt_probe("registrar")
    assert service_probe.connect(served.port, bundle, service)

    service_probe.subscribe("devices/+/enroll/request")
    device.subscribe("devices/x/enroll/response")
    device.publish("devices/x/enroll/request", b"csr")
    request = service_probe.wait_for_message("devices/x/enroll/request")
    service_probe.publish("devices/x/enroll/response", b"chain")
    response = device.wait_for_message("devices/x/enroll/response")

    assert request.payload == b"csr"
    assert response.payload == b"chain"


def test_a_revoked_device_is_refused_after_broker_crl_and_sighup(
    served,
    broker_dir,
    registrar_dir,
    make_identity,
    mqtt_probe,
    factory_ca,
    operational_ca,
    tmp_path,
):
    bundle = broker_dir / "ca-bundle.pem"
    revoked = make_identity("dev-r", ca=factory_ca)
    kept = make_identity("dev-k", ca=factory_ca)
    later = make_identity("dev-l", ca=operational_ca)
    assert mqtt_probe("before").connect(served.port, bundle, revoked, TLS12)

    revoke = _crl(
        factory_ca, tmp_path / "f.crl", "--revoke", f"{revoked.serial:x}"
    )
    renew = invoke(
        [
            "broker", "crl",
            "--dir", str(broker_dir),
            "--factory-ca", str(factory_ca.directory),
            "--registrar-dir", str(registrar_dir),
        ]
    )  # fmt: skip
    served.reload()

    assert revoke.exit_code == 0, revoke.output
    assert renew.exit_code == 0, renew.output
    refused = mqtt_probe("after")
    assert not refused.connect(served.port, bundle, revoked, TLS12)
    assert refused.tls_alert == REVOKED_ALERT
    assert mqtt_probe("kept").connect(served.port, bundle, kept, TLS12)
    assert mqtt_probe("later").connect(served.port, bundle, later, TLS12)


def test_broker_run_ends_on_sigterm_and_leaves_nothing_running(served):
    pid = served.process.pid

    returncode = served.stop()

    assert returncode == 0
    assert "terminating" in served.log()
    assert not Path(f"/proc/{pid}").exists()
    assert port_is_free(served.port)


def test_broker_run_on_a_taken_port_ends_with_one_line_of_ours(
    broker_dir, files_for
):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        made = files_for(broker_dir, "--port", str(port))
        assert made.exit_code == 0, made.output

        # In a process of its own: 'broker run' becomes mosquitto.
        result = subprocess.run(
            [
                sys.executable, "-m", "firmware_sim",
                "broker", "run", "--dir", str(broker_dir),
            ],
            capture_output=True,
            text=True,
            timeout=STARTED_WITHIN,
            check=False,
        )  # fmt: skip

    assert result.returncode == 1, result.stderr
    assert result.stderr == (
        f"error: mosquitto cannot listen on 127.0.0.1:{port}: address "
        "already in use\n"
    )
    assert result.stdout == ""


def test_broker_run_without_files_says_what_to_run(broker_dir):
    result = invoke(["broker", "run", "--dir", str(broker_dir)])

    assert_refused(result, "broker files")


def test_broker_crl_without_files_says_what_to_run(
    broker_dir, factory_ca, registrar_dir
):
    result = invoke(
        [
            "broker", "crl",
            "--dir", str(broker_dir),
            "--factory-ca", str(factory_ca.directory),
            "--registrar-dir", str(registrar_dir),
        ]
    )  # fmt: skip

    assert_refused(result, "broker files")
    assert not broker_dir.exists()


def _server_cert(ca, *args):
    return invoke(["ca", "server-cert", "--dir", str(ca.directory), *args])


def _sign(ca, csr_file, out):
    return invoke([
        "ca", "sign", str(csr_file), "--out", str(out),
        "--dir", str(ca.directory),
    ])  # fmt: skip


def _csr_pem(name):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def _crl(ca, out, *args):
    return invoke(
        ["ca", "crl", "--dir", str(ca.directory), "--out", str(out), *args]
    )


def _crls(pem):
    """Each CRL of a PEM file that holds several."""
    end = b"-----END X509 CRL-----\n"
    return [
        x509.load_pem_x509_crl(block + end)
        for block in pem.split(end)
        if block.strip()
    ]


@pytest.mark.parametrize("name", ["registrar", "Registrar", "monitor"])
def test_sign_refuses_a_csr_named_for_a_broker_service(
    tmp_path, factory_ca, name
):
    """The broker's ACL gives that name rights over every device."""
    csr_file = tmp_path / "device.csr"
    csr_file.write_bytes(_csr_pem(name))
    before = tree(tmp_path)

    result = _sign(factory_ca, csr_file, tmp_path / "chain.pem")

    assert_refused(result, f"CN {name!r} is reserved for a broker service")
    assert tree(tmp_path) == before


def test_only_a_service_certificate_may_carry_a_service_name(factory_ca):
    from firmware_sim.errors import CAError

    for name in ("registrar", "REGISTRAR", "monitor"):
        with pytest.raises(CAError, match="reserved for a broker service"):
            factory_ca.issue_client_cert(name)

    chain, _ = factory_ca.issue_client_cert("registrar", service=True)

    names = chain[0].subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [n.value for n in names] == ["registrar"]


def test_crl_refuses_a_serial_the_ca_never_issued(tmp_path, factory_ca):
    out = tmp_path / "crl.pem"
    before = tree(tmp_path)

    result = _crl(factory_ca, out, "--revoke", "0x12")

    assert_refused(result, "serial 12 was never issued by this CA")
    assert tree(tmp_path) == before
    assert factory_ca.revocations() == {}


def test_crl_revokes_a_serial_that_ca_sign_issued(tmp_path, factory_ca):
    csr_file = tmp_path / "device.csr"
    csr_file.write_bytes(_csr_pem("dev-2"))
    signed = _sign(factory_ca, csr_file, tmp_path / "chain.pem")
    assert signed.exit_code == 0, signed.output
    serial = signed.output.split()[1]

    result = _crl(factory_ca, tmp_path / "crl.pem", "--revoke", serial)

    assert result.exit_code == 0, result.output
    assert list(factory_ca.revocations()) == [int(serial, 16)]
    issued = factory_ca.issued_path.read_text().split()
    assert serial in issued


def test_a_ca_made_before_the_issued_record_revokes_as_before(
    tmp_path, factory_ca
):
    factory_ca.issued_path.unlink()

    result = _crl(factory_ca, tmp_path / "crl.pem", "--revoke", "0x12")

    assert result.exit_code == 0, result.output
    assert list(factory_ca.revocations()) == [0x12]
    factory_ca.issue_client_cert("dev-1")
    assert not factory_ca.issued_path.exists()


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_DIR = "/etc/mosquitto/device-agent"


def _rules(text):
    """The lines of an ACL that say something, comments left out."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_the_example_config_runs_mosquitto_on_the_files_broker_files_wrote(
    broker_dir, files_for, make_identity, mqtt_probe, factory_ca, tmp_path
):
    """examples/mosquitto.conf as shipped, only its directory and port set."""
    example = (EXAMPLES / "mosquitto.conf").read_text()
    port = free_port()
    made = files_for(broker_dir, "--port", str(port))
    assert made.exit_code == 0, made.output
    named = {
        line.split()[1].removeprefix(EXAMPLE_DIR + "/")
        for line in _rules(example)
        if line.split()[0] in ("cafile", "certfile", "keyfile", "crlfile")
        or line.startswith("acl_file ")
    }
    assert named == set(BROKER_FILES) - {"mosquitto.conf"}

    assert example.count("listener 8883\n") == 1
    config = broker_dir.parent / "example.conf"
    config.write_text(
        example.replace(EXAMPLE_DIR, str(broker_dir)).replace(
            "listener 8883\n", f"listener {port} 127.0.0.1\n"
        )
    )
    config.chmod(0o644)
    log_path = tmp_path / "mosquitto.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            ["mosquitto", "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + STARTED_WITHIN
        while port_is_free(port):
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.02)

        device = make_identity("dev-example", ca=factory_ca)
        probe = mqtt_probe("example-device")
        assert probe.connect(port, broker_dir / "ca-bundle.pem", device)
        probe.subscribe("devices/dev-example/#")
        probe.publish("devices/dev-example/hello", b"hello")
        got = probe.wait_for_message("devices/dev-example/hello")
        assert got.payload == b"hello"
    finally:
        process.terminate()
        process.wait(STARTED_WITHIN)


def test_the_example_acl_and_rabbitmq_users_match_broker_files(
    broker_dir, files_for
):
    """One set of rights everywhere: devices, and the registrar alone."""
    made = files_for(broker_dir)
    assert made.exit_code == 0, made.output
    written = _rules((broker_dir / "acl").read_text())
    definitions = json.loads(
        (EXAMPLES / "rabbitmq-definitions.json").read_text()
    )
    services = {
        user["name"]
        for user in definitions["users"]
        if user["metadata"]["description"] == "device-agent service"
    }

    assert _rules((EXAMPLES / "acl").read_text()) == written
    assert {
        line.split()[1] for line in written if line.startswith("user ")
    } == (services)
    assert services == {registrar.NAME}
