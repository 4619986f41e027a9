"""Security checks: what must hold for no one to get in (real parts).

Elsewhere already: a broker from another CA or under another name is
refused and a revoked device is told why (test_bringup), a revoked
device is cut off and ends in needs_service (test_revocation), probe
clients meet the ACL (test_broker).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import importlib.util
import ipaddress
import os
import queue
import re
import socket
import ssl
import stat
import sys
import threading
from pathlib import Path

import click
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from device_cli import Device, wait_for
from test_bringup import one_line_error
from test_renewal import bring_up, status, stop

from device_agent import config, credential
from device_agent.cli.main import cli
from firmware_sim.ca import CertificateAuthority, chain_pem, key_pem

TOP = Path(__file__).resolve().parent.parent


def _load_credscan():
    """campaigns/ is run from the repository top, not installed."""
    if str(TOP) not in sys.path:
        sys.path.insert(0, str(TOP))  # for its own campaigns.common
    spec = importlib.util.spec_from_file_location(
        "credscan", TOP / "campaigns" / "credscan.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["credscan"] = module
    spec.loader.exec_module(module)
    return module


credscan = _load_credscan()
NOW = datetime.datetime.now(datetime.UTC)
HOUR = datetime.timedelta(hours=1)

# Words that would name a switch turning the broker's check off.
UNSAFE_NAME = re.compile(
    r"insecure|verify|check_hostname|hostname_check|no_?check|skip|"
    r"allow_(?:invalid|any|self)|cert_reqs|trust_all|unsafe",
    re.IGNORECASE,
)


@pytest.fixture(params=["tpm", "software"])
def tcti(request):
    if request.param == "tpm":
        return request.getfixturevalue("swtpm").tcti
    return None


@pytest.fixture
def private_umask():
    """Run the test, and the commands it starts, with umask 000."""
    old = os.umask(0)
    yield
    os.umask(old)


def key_files(state: Path) -> list[Path]:
    return sorted(
        p
        for p in state.rglob("*")
        if p.is_file() and p.name.endswith((".tss2.pem", ".pkcs8.pem"))
    )


def assert_private(state: Path) -> int:
    """Every key file 0600 or tighter, every directory closed to others."""
    assert stat.S_IMODE(state.stat().st_mode) & 0o077 == 0
    keys = key_files(state)
    for path in keys:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, f"{path} has mode {mode:04o}"
    for path in state.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            mode = stat.S_IMODE(path.stat().st_mode)
            assert mode & 0o022 == 0, f"{path} has mode {mode:04o}"
    return len(keys)


def test_key_files_stay_private_under_umask_000(
    tmp_path, registrar_world, tcti, private_umask
):
    """init, keygen, install-chain, then a renewal: no key file, and no
    directory holding one, opens to others, whatever the umask."""
    device = bring_up(tmp_path, registrar_world, tcti)
    assert assert_private(device.state) == 1
    device.run("keygen", "--force")  # a pending factory key
    assert assert_private(device.state) == 2

    device.run("renew", "--now")  # the operational identity: a new key
    assert assert_private(device.state) >= 2
    assert key_files(device.state / "ldevid")
    device.run("renew", "--now")
    assert_private(device.state)


def secrets_of(path: Path) -> set[str]:
    """The forms a key file's secret could leak in: text lines of the
    file, and for a software key its scalar in hex and base64."""
    data = path.read_bytes()
    found = {
        line
        for line in data.decode().splitlines()
        if len(line) >= 16 and not line.startswith("-----")
    }
    if path.name.endswith(".pkcs8.pem"):
        key = serialization.load_pem_private_key(data, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        scalar = key.private_numbers().private_value.to_bytes(32, "big")
        found |= {
            scalar.hex(),
            scalar.hex().upper(),
            base64.b64encode(scalar).decode(),
            base64.urlsafe_b64encode(scalar).decode().rstrip("="),
        }
    else:
        from tpm2_pytss.tsskey import TSSPrivKey

        blob = TSSPrivKey.from_pem(data)
        private = bytes(blob.private.marshal())
        found |= {private.hex(), private[-32:].hex()}
    return found


def leaks(texts: dict[str, str], secrets: set[str]) -> list[str]:
    found = []
    for name, text in texts.items():
        if credscan.PEM_KEY.search(text.encode()):
            found.append(f"{name}: a PEM private key")
        found += [f"{name}: {s[:12]}..." for s in secrets if s in text]
    return found


def test_no_key_material_in_logs_or_status(tmp_path, registrar_world, tcti):
    """The daemon at debug level through an enrollment and a renewal,
    status in both forms and connect at debug level: none shows a
    private key, its scalar, or its TPM blob."""
    registrar_world.start_registrar(lifetime=300)
    device = bring_up(tmp_path, registrar_world, tcti, heartbeat_interval=1.0)
    secrets: set[str] = set()
    for path in key_files(device.state):
        secrets |= secrets_of(path)

    agent = device.start("--debug")
    try:
        wait_for(
            lambda: (
                (status(device).get("agent") or {}).get("identity") == "ldevid"
            ),
            30,
            "an operational identity",
        )
        for path in key_files(device.state):
            secrets |= secrets_of(path)
        device.run("renew", "--now")
        for path in key_files(device.state):
            secrets |= secrets_of(path)
    finally:
        daemon_log = stop(agent)

    texts = {
        "daemon log": daemon_log,
        "status.json": (device.state / "status.json").read_text(),
        "status": device.run("--debug", "status").out,
        "status --json": device.run("status", "--json").out,
    }
    connected = device.run("--debug", "connect")
    texts["connect"] = connected.out + connected.err
    csr = device.run("--debug", "csr")
    texts["csr"] = csr.out + csr.err

    assert "DEBUG" in daemon_log and "renewed" in daemon_log
    assert len(secrets) >= 6
    # The search finds what it looks for: a key file itself leaks.
    planted = {"planted": key_files(device.state)[0].read_text()}
    assert leaks(planted, secrets)
    assert leaks(texts, secrets) == []


def server_credential(ca: CertificateAuthority, directory: Path, **sign):
    """A broker certificate for 127.0.0.1 and localhost, and its key."""
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        )
        .sign(key, hashes.SHA256())
    )
    names = [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("localhost"),
    ]
    chain = ca.sign_csr(
        request, eku=[ExtendedKeyUsageOID.SERVER_AUTH], san=names, **sign
    )
    directory.mkdir()
    cert_path, key_path = directory / "server.pem", directory / "server.key"
    cert_path.write_bytes(chain_pem(chain))
    key_path.write_bytes(key_pem(key))
    key_path.chmod(0o600)
    return {"server_cert_file": cert_path, "server_key_file": key_path}


@pytest.mark.parametrize(
    ("validity", "tls"),
    [
        ({"not_before": NOW - 48 * HOUR, "not_after": NOW - 24 * HOUR}, "1.2"),
        ({"not_before": NOW - 48 * HOUR, "not_after": NOW - 24 * HOUR}, "1.3"),
        ({"not_before": NOW + 24 * HOUR, "not_after": NOW + 48 * HOUR}, "1.3"),
    ],
    ids=["expired-tls1.2", "expired-tls1.3", "not-yet-valid"],
)
def test_a_broker_certificate_out_of_its_validity_is_refused(
    tmp_path, factory_ca, broker_factory, validity, tls
):
    files = server_credential(factory_ca, tmp_path / "server", **validity)
    broker = broker_factory(**files)
    device = Device(tmp_path, None)
    device.init(broker.port, factory_ca.root_path)
    device.enroll(factory_ca)

    result = device.run("connect", "--tls-max-version", tls, check=False)
    line = one_line_error(result)
    assert "expired" in line or "not yet valid" in line, line
    assert f"u'{device.id}'" not in broker.log_text()


def all_options(command: click.Command) -> list[str]:
    names = [n for p in command.params for n in p.opts + p.secondary_opts]
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            names += all_options(sub)
    return names


def test_no_setting_or_flag_can_turn_the_broker_check_off():
    fields = [f.name for f in config.dataclasses.fields(config.Settings)]
    flags = all_options(cli)
    assert "server_name" in fields and "--tls-max-version" in flags
    assert [n for n in fields + flags if UNSAFE_NAME.search(n)] == []


@pytest.mark.parametrize(
    "override",
    [
        "tls_insecure=true",
        "insecure=1",
        "verify=false",
        "check_hostname=false",
        "tls_min_version=1.1",
        "tls_min_version=1.0",
        "ca_file=",
    ],
)
def test_overrides_that_would_weaken_tls_are_refused(
    tmp_path, factory_ca, override
):
    device = Device(tmp_path, None)
    device.init(8883, factory_ca.root_path)
    line = one_line_error(device.run("--set", override, "status", check=False))
    assert "config" in line


def test_environment_cannot_turn_the_broker_check_off(
    tmp_path, factory_ca, broker_factory
):
    """Variables that loosen TLS in other programs change nothing here,
    nor does a default CA file that would trust the broker."""
    other = CertificateAuthority.create(tmp_path / "other", name="Other")
    broker = broker_factory()
    device = Device(tmp_path, None)
    device.init(
        broker.port, other.root_path,
        "--trust-anchor", str(factory_ca.root_path),
    )  # fmt: skip
    device.enroll(factory_ca)
    for name in (
        "DEVICE_AGENT_TLS_INSECURE",
        "DEVICE_AGENT_INSECURE",
        "DEVICE_AGENT_VERIFY",
    ):
        result = device.run("connect", env={name: "0"}, check=False)
        assert f"{name}: unknown setting" in one_line_error(result)
    loosening = {
        "PYTHONHTTPSVERIFY": "0",
        "SSL_CERT_FILE": str(factory_ca.root_path),
        "SSL_CERT_DIR": str(factory_ca.root_path.parent),
        "CURL_CA_BUNDLE": str(factory_ca.root_path),
        "REQUESTS_CA_BUNDLE": str(factory_ca.root_path),
    }
    result = device.run("connect", env=loosening, check=False)
    assert "broker certificate refused" in one_line_error(result)

    # With the right CA the same device gets in: the refusal was the CA's.
    device.run("--set", f"ca_file={factory_ca.root_path}", "connect")


class OldTlsServer:
    """A TLS server that speaks only TLS 1.0 and 1.1, on loopback."""

    def __init__(self, ca: CertificateAuthority, directory: Path) -> None:
        files = server_credential(ca, directory)
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with _quiet_deprecation():
            self.context.minimum_version = ssl.TLSVersion.TLSv1
            self.context.maximum_version = ssl.TLSVersion.TLSv1_1
        # OpenSSL 3 allows TLS below 1.2 only at security level 0.
        self.context.set_ciphers("DEFAULT:@SECLEVEL=0")
        self.context.load_cert_chain(
            files["server_cert_file"], files["server_key_file"]
        )
        self.sock = socket.create_server(("127.0.0.1", 0))
        # A blocked accept() does not end when another thread closes the
        # socket, so the loop looks at a flag between short waits.
        self.sock.settimeout(0.1)
        self._stopped = False
        self.port = self.sock.getsockname()[1]
        self.handshakes: list[str] = []
        self.refusals: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(5)
            try:
                with self.context.wrap_socket(conn, server_side=True) as tls:
                    self.handshakes.append(str(tls.version()))
            except (ssl.SSLError, OSError) as exc:
                self.refusals.append(str(exc))
                conn.close()

    def close(self) -> None:
        self._stopped = True
        self._thread.join(5)
        self.sock.close()


@contextlib.contextmanager
def _quiet_deprecation():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        yield


def test_a_broker_below_tls_1_2_is_refused(tmp_path, factory_ca):
    server = OldTlsServer(factory_ca, tmp_path / "old-tls")
    try:
        # The server does speak TLS 1.1 to a client that allows it.
        client = ssl.create_default_context(cafile=str(factory_ca.root_path))
        with _quiet_deprecation():
            client.minimum_version = ssl.TLSVersion.TLSv1
        client.set_ciphers("DEFAULT:@SECLEVEL=0")
        with (
            socket.create_connection(("127.0.0.1", server.port)) as raw,
            client.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            assert tls.version() == "TLSv1.1"
        wait_for(lambda: server.handshakes, 5, "the probe's handshake")

        device = Device(tmp_path, None)
        device.init(server.port, factory_ca.root_path)
        device.enroll(factory_ca)
        line = one_line_error(device.run("connect", check=False))
        wait_for(lambda: server.refusals, 5, "the agent's handshake")
    finally:
        server.close()
    assert "tls" in line.lower() or "protocol" in line.lower(), line
    assert server.handshakes == ["TLSv1.1"]


@pytest.mark.parametrize(
    ("topic", "publisher"),
    [
        ("devices/dev-other/cmd", "dev-other"),
        ("devices/dev-00421/cmd", "dev-00421"),  # our id as a prefix
        ("#", "dev-other"),
        ("devices/+/cmd", "dev-other"),
        ("devices/#", "dev-00421"),
    ],
)
def test_a_device_receives_nothing_outside_its_topics(
    tmp_path,
    factory_ca,
    broker_factory,
    make_identity,
    mqtt_probe,
    topic,
    publisher,
):
    """mosquitto grants any subscription and filters on delivery: what
    another device publishes never reaches this one, whatever filter
    it asks for, while its own topic still does."""
    broker = broker_factory()
    device = Device(tmp_path, None)
    device.init(broker.port, factory_ca.root_path)
    device.enroll(factory_ca)
    own = f"devices/{device.id}/cmd"
    session = credential.open_session(config.load(device.config))
    session.open()
    try:
        session.subscribe(own)
        session.subscribe(topic)
        other = mqtt_probe(publisher)
        assert other.connect(
            broker.port, factory_ca.root_path, make_identity(publisher)
        )
        theirs = f"devices/{publisher}/cmd"
        other.publish(theirs, b"not for you")
        other.subscribe(theirs)
        other.publish(theirs, b"for its owner")
        other.wait_for_message(theirs)  # the broker did take it
        session.publish(own, b"mine")
        received = [session.messages.get(timeout=5).topic]
        with contextlib.suppress(queue.Empty):
            while True:
                received.append(session.messages.get(timeout=0.5).topic)
    finally:
        session.close()
    assert set(received) == {own}


@pytest.mark.parametrize(
    "topic",
    [
        "devices/dev-other/enroll/response",
        "devices/dev-00421/heartbeat",
        "$SYS/x",
    ],
)
def test_a_device_cannot_publish_outside_its_topics(
    tmp_path, factory_ca, broker_factory, topic
):
    broker = broker_factory()
    device = Device(tmp_path, None)
    device.init(broker.port, factory_ca.root_path)
    device.enroll(factory_ca)
    result = device.run("connect", "--publish", topic, "x", check=False)
    assert "Not authorized" in one_line_error(result)


def test_repository_holds_no_default_or_shared_credential():
    findings, keys = credscan.scan_repository(TOP)
    assert findings == []
    assert keys == set()


def test_what_init_writes_holds_no_default_or_shared_credential(
    tmp_path, swtpm, factory_ca
):
    """Two devices per key store, brought up by the CLI: no secret in what
    they wrote, and no key in common."""
    trees = []
    for number, tcti in enumerate([None, None, swtpm.tcti, swtpm.tcti]):
        device = Device(tmp_path / f"d{number}", tcti, f"dev-{number}")
        device.init(8883, factory_ca.root_path)
        device.run("keygen")
        trees.append(device.dir)
    findings, keys = credscan.scan_trees(trees)
    assert findings == []
    assert keys == 4


def test_the_scanner_flags_what_it_looks_for(tmp_path, factory_ca):
    """A planted key, password, token, anonymous broker and shared key."""
    _, key = factory_ca.issue_client_cert("planted")
    planted = tmp_path / "planted"
    planted.mkdir()
    (planted / "key.pem").write_bytes(key_pem(key))
    # Pieced together here, so that this file does not trip the scan of
    # the repository itself.
    secrets = {
        "pw": "rasp" + "berry",
        "other": "hunter" + "2",
        "token": "s3cr3t-" + "t0ken-value",
        "aws": "AKIA" + "ABCDEFGHIJKLMNOP",
    }
    (planted / "settings.py").write_text(
        (
            'MQTT_PASSWORD = "{pw}"\n'
            'api_token = "{token}"\n'
            "url = 'mqtts://pi:{other}@broker.example:8883'\n"
            "AWS = '{aws}'\n"
            'password = os.environ["PASSWORD"]\n'
        ).format(**secrets)
    )
    (planted / "agent.toml").write_text("password = changeme\n")
    (planted / "mosquitto.conf").write_text("allow_anonymous true\n")
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "key.pem").write_bytes(key_pem(key))

    findings, keys = credscan.scan_trees([planted, twin])
    kinds = sorted(f.kind for f in findings)
    assert keys == 2
    assert "well-known default password 'raspberry'" in kinds
    assert "well-known default password 'changeme'" in kinds
    assert "secret written as a literal value" in kinds
    assert "password in a URL" in kinds
    assert "AWS access key" in kinds
    assert "broker lets clients in without a certificate" in kinds
    assert f"the same key as in {planted}" in kinds
    assert len(findings) == 7  # the os.environ read is no finding

    pem = key_pem(key).decode()
    assert len(list(credscan.private_keys(pem.encode()))) == 1
    result = credscan.scan_text(b"x = 1\n", "clean.py")
    assert result == []


def test_the_scanner_runs_as_one_command():
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "campaigns.credscan", "--devices", "2"],
        cwd=TOP, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "findings: 0" in result.stdout
    assert "(2 private keys)" in result.stdout


def test_a_chain_naming_another_device_in_its_uri_is_refused(
    tmp_path, factory_ca
):
    """The CN is ours but the device URI is another's: the certificate
    would name two devices, so install-chain refuses it and keeps the
    store as it was."""
    device = Device(tmp_path, None)
    device.init(8883, factory_ca.root_path)
    device.run("keygen")
    other = x509.UniformResourceIdentifier("urn:device-agent:dev-other")
    chain = factory_ca.sign_csr(device.csr(), san=[other])
    path = tmp_path / "chain.pem"
    path.write_bytes(chain_pem(chain))
    before = device.snapshot()

    line = one_line_error(device.run("install-chain", str(path), check=False))
    assert "wrong-identity" in line and "dev-other" in line
    assert device.snapshot() == before


def test_the_scanner_scans_several_devices_by_default():
    """Without options it brings up devices too: a scan of none would
    report a clean result it never looked for."""
    options = credscan.arguments([])
    assert options.devices == 3
    assert credscan.arguments(["--devices", "0"]).devices == 0
