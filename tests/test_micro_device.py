"""A MicroPython device enrolls and renews over mutual-TLS MQTT.

The device is the MicroPython unix port running device_agent.micro
against a real mosquitto and the registrar. Its keys come from the
test-only host signer (tests/micro/host_signer.py), which stands in for
a secure element; the device must say its key is not hardware-protected.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_agent.core import der, flashstore
from firmware_sim.registry import REVOKED

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "micro"))

from host_signer import HostSigner, point  # noqa: E402

MICROPYTHON = Path(sys.executable).parent / "micropython"


@pytest.fixture
def host_signer():
    signer = HostSigner()
    yield signer
    signer.stop()


def provision(world, signer, state):
    """The factory line: a key in slot 0 and its IDevID on the flash."""
    key = signer.new_key(0)
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
        )
        .sign(key, hashes.SHA256())
    )
    chain = world.factory_ca.sign_csr(request)
    files = {"slot": b"0"}
    for index, certificate in enumerate(chain):
        files[f"c{index}.der"] = certificate.public_bytes(
            serialization.Encoding.DER
        )
    store = flashstore.FlashStore(str(state / "idevid"))
    store.commit(store.stage(files))
    return chain


def write_config(world, signer, state, **changes):
    roots = der.pem_blocks(world.ca_bundle.read_text())
    paths = []
    for index, root in enumerate(roots):
        path = state / f"ca{index}.der"
        path.write_bytes(root)
        paths.append(str(path))
    config = {
        "device_id": world.device_id,
        "host": "127.0.0.1",
        "port": world.port,
        "server_name": "localhost",
        "ca": paths,
        "state": str(state),
        "signer": {"kind": "host", "port": signer.port},
        "time": {"source": "provided", "unix": _now()},
        "enroll_timeout": 10,
    }
    config.update(changes)
    path = state / "config.json"
    path.write_text(json.dumps(config))
    return path


def _now():
    import time

    return int(time.time())


def run_device(config_path, renewals):
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from device_agent.micro import agent\n"
        f"sys.exit(0 if agent.main({str(config_path)!r}, {renewals}) else 1)\n"
    )
    result = subprocess.run(
        [str(MICROPYTHON), "-c", code],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    events = [
        json.loads(line[len("EVENT ") :])
        for line in result.stdout.splitlines()
        if line.startswith("EVENT ")
    ]
    return result, events


def test_device_enrolls_renews_and_reconnects(
    registrar_world, host_signer, tmp_path, mqtt_probe, make_identity
):
    state = tmp_path / "flash"
    state.mkdir()
    factory_chain = provision(registrar_world, host_signer, state)
    config = write_config(registrar_world, host_signer, state)

    monitor = mqtt_probe("monitor")
    assert monitor.connect(
        registrar_world.port,
        registrar_world.ca_bundle,
        make_identity(registrar_world.device_id),
    )
    monitor.subscribe("devices/dev-1/heartbeat")

    result, events = run_device(config, renewals=2)
    assert result.returncode == 0, result.stdout + result.stderr

    kinds = [event["event"] for event in events]
    assert kinds == ["connected", "enrolled", "renewed", "renewed"], events
    connected, enrolled, first, second = events
    assert connected["identity"] == "idevid"
    assert connected["serial"] == format(factory_chain[0].serial_number, "x")
    for event in (enrolled, first, second):
        assert event["identity"] == "ldevid"
        assert event["key"].startswith("NOT hardware-protected")
    assert [e["generation"] for e in (enrolled, first, second)] == [1, 2, 3]
    # Shown with -s: one renewal's wall time on the unix port, as measured
    # by the device from key generation to the new session's CONNACK.
    print("renewal ms:", [e["ms"] for e in (enrolled, first, second)])
    serials = {e["serial"] for e in events}
    assert len(serials) == 4, "each renewal brings a new certificate"

    # Every certificate the device now holds came from the registrar, for
    # the key in the slot it names; the flash keeps the current one and
    # one before it.
    store = flashstore.FlashStore(str(state / "ldevid"))
    assert store.current() == 3
    assert store.generations() == [2, 3]
    files = store.load()
    leaf = x509.load_der_x509_certificate(files["c0.der"])
    slot = int(files["slot"])
    assert format(leaf.serial_number, "x") == second["serial"]
    assert point(host_signer.keys[slot]) == _point(leaf.public_key())
    issuer = registrar_world.operational_ca
    assert (
        leaf.issuer
        == x509.load_pem_x509_certificate(
            issuer.intermediate_path.read_bytes()
        ).subject
    )

    # The heartbeats went out over the renewed sessions.
    monitor.wait_for_message("devices/dev-1/heartbeat")
    assert monitor.topics_received().count("devices/dev-1/heartbeat") >= 1

    # A second start picks up the operational identity and renews from it.
    result, events = run_device(config, renewals=1)
    assert result.returncode == 0, result.stdout + result.stderr
    assert [e["event"] for e in events] == ["connected", "renewed"]
    assert events[0]["identity"] == "ldevid"
    assert events[0]["generation"] == 3
    assert events[1]["generation"] == 4


def test_device_keeps_its_credential_when_refused(
    registrar_world, host_signer, tmp_path
):
    """A revoked device is refused; its working identity stays current."""
    state = tmp_path / "flash"
    state.mkdir()
    provision(registrar_world, host_signer, state)
    config = write_config(registrar_world, host_signer, state)
    result, events = run_device(config, renewals=0)
    assert result.returncode == 0, result.stdout + result.stderr

    registrar_world.registry.set_status(registrar_world.device_id, REVOKED)
    result, events = run_device(config, renewals=1)
    assert result.returncode == 1
    assert events[-1]["event"] == "failed"
    assert "refused: revoked" in events[-1]["detail"]
    store = flashstore.FlashStore(str(state / "ldevid"))
    assert store.current() == 1
    assert store.generations() == [1]


def test_device_refuses_to_start_without_a_set_clock_source(
    registrar_world, host_signer, tmp_path
):
    """A clock far behind the certificate's start is not trusted."""
    state = tmp_path / "flash"
    state.mkdir()
    provision(registrar_world, host_signer, state)
    config = write_config(
        registrar_world,
        host_signer,
        state,
        time={"source": "provided", "unix": 946684800},
    )
    result, events = run_device(config, renewals=0)
    assert result.returncode == 1
    assert events[-1]["event"] == "failed"
    assert events[-1]["detail"].startswith("clock_untrusted")
    assert "NEW" not in host_signer.requests


def _point(public_key):
    numbers = public_key.public_numbers()
    return numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")


def test_board_csr_verifies_with_cryptography(host_signer):
    """The hand-built CSR is one cryptography and the registrar accept."""
    code = (
        "import sys, binascii\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from device_agent.micro import csr\n"
        "from device_agent.micro.hostsigner import HostSigner\n"
        f"signer = HostSigner({host_signer.port})\n"
        "p = signer.new_key(5)\n"
        "der = csr.build('dev-9', p, lambda d: signer.sign_digest(5, d))\n"
        "print(binascii.hexlify(der).decode())\n"
    )
    result = subprocess.run(
        [str(MICROPYTHON), "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    request = x509.load_der_x509_csr(bytes.fromhex(result.stdout.strip()))
    assert request.is_signature_valid
    assert isinstance(request.public_key(), ec.EllipticCurvePublicKey)
    assert _point(request.public_key()) == point(host_signer.keys[5])
    names = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [n.value for n in names] == ["dev-9"]
    san = request.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "urn:device-agent:dev-9"
    ]


FAKE_NTP_TIMEOUT = (
    "host = None\n"
    "def settime():\n"
    "    raise OSError(110)  # ETIMEDOUT, as on a board without a network\n"
)


@pytest.mark.parametrize(
    ("time_source", "signer", "fake_ntptime", "expected"),
    [
        # The unix port has no ntptime module at all.
        (
            {"source": "ntp"},
            {"kind": "host", "port": 1},
            None,
            "clock_untrusted: no time from NTP",
        ),
        (
            {"source": "ntp", "host": "127.0.0.1"},
            {"kind": "host", "port": 1},
            FAKE_NTP_TIMEOUT,
            "clock_untrusted: no time from NTP server 127.0.0.1: OSError",
        ),
        (
            {"source": "provided", "unix": 1800000000},
            {"kind": "software"},
            None,
            "signer: software keys are unsupported",
        ),
        (
            {"source": "provided", "unix": 1800000000},
            {"kind": "atecc608", "scl": 22, "sda": 21},
            None,
            "signer: no ATECC608 on I2C",
        ),
    ],
    ids=["no-ntptime", "ntp-timeout", "software-signer", "no-i2c"],
)
def test_setup_failures_are_one_failed_event(
    tmp_path, time_source, signer, fake_ntptime, expected
):
    """Clock and signer set-up fail as one event, never a traceback."""
    if fake_ntptime is not None:
        (tmp_path / "ntptime.py").write_text(fake_ntptime)
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "device_id": "dev-1",
                "host": "127.0.0.1",
                "port": 1,
                "server_name": "localhost",
                "ca": [],
                "state": str(tmp_path),
                "signer": signer,
                "time": time_source,
            }
        )
    )
    event = _one_failed_event(config, tmp_path)
    assert event["device_id"] == "dev-1"
    assert event["detail"].startswith(expected), event


def test_stock_firmware_refuses_a_secure_element_key_in_one_line(
    factory_ca, tmp_path
):
    """What a board with an ATECC608 and today's firmware reports.

    The signer stands in for the chip: its key cannot leave it, so there
    is no DER key for the TLS stack, and the agent must say so in one
    readable line before it opens any socket.
    """
    state = tmp_path / "flash"
    state.mkdir()
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
        )
        .sign(key, hashes.SHA256())
    )
    files = {"slot": b"0"}
    for index, certificate in enumerate(factory_ca.sign_csr(request)):
        files[f"c{index}.der"] = certificate.public_bytes(
            serialization.Encoding.DER
        )
    store = flashstore.FlashStore(str(state / "idevid"))
    store.commit(store.stage(files))
    root = x509.load_pem_x509_certificate(factory_ca.root_path.read_bytes())
    (state / "ca0.der").write_bytes(
        root.public_bytes(serialization.Encoding.DER)
    )
    config = state / "config.json"
    config.write_text(
        json.dumps(
            {
                "device_id": "dev-1",
                "host": "127.0.0.1",
                "port": 1,
                "server_name": "localhost",
                "ca": [str(state / "ca0.der")],
                "state": str(state),
                "signer": {"kind": "chip"},
                "time": {"source": "provided", "unix": _now()},
            }
        )
    )
    chip = (
        "from device_agent.micro.signer import Signer\n"
        "class Chip(Signer):\n"
        "    kind = 'ATECC608'\n"
        "    hardware_protected = True\n"
        "    def tls_key(self, slot):\n"
        "        return None\n"
        "agent.make_signer = lambda config: Chip()\n"
    )
    event = _one_failed_event(config, tmp_path, chip)
    assert event["key"] == "hardware-protected (ATECC608)"
    assert event["detail"] == (
        "error: TransportError: this firmware's TLS stack cannot sign "
        "with a secure element"
    )


def _one_failed_event(config_path, tmp_path, prelude=""):
    """The one ``failed`` event of a board agent run on ``config_path``;
    ``tmp_path`` may hold a stand-in module (ntptime), ``prelude`` runs
    before the agent does."""
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "from device_agent.micro import agent\n"
        f"{prelude}"
        f"sys.exit(0 if agent.main({str(config_path)!r}) else 1)\n"
    )
    result = subprocess.run(
        [str(MICROPYTHON), "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr == ""
    (line,) = result.stdout.splitlines()
    assert line.startswith("EVENT "), line
    event = json.loads(line.removeprefix("EVENT "))
    assert event["event"] == "failed"
    return event


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[1]", "not a JSON object"),
        ("null", "not a JSON object"),
        ('"hello"', "not a JSON object"),
        ("{", "not JSON"),
        ('{"device_id": "d"}', "missing host, port, server_name, ca,"),
        (
            '{"device_id": "d", "host": "h", "port": 1, "server_name": "h",'
            ' "ca": "x.der", "state": "/s", "signer": {}, "time": {}}',
            "ca is not a list of file paths",
        ),
        (
            '{"device_id": "d", "host": "h", "port": 1, "server_name": "h",'
            ' "ca": [], "state": "/s", "signer": [], "time": {}}',
            "signer is not an object",
        ),
    ],
)
def test_a_config_the_board_cannot_use_is_named(tmp_path, text, expected):
    path = tmp_path / "config.json"
    path.write_text(text)
    detail = _one_failed_event(path, tmp_path)["detail"]
    assert detail.startswith(f"error: config {path}: "), detail
    assert expected in detail, detail

    missing = tmp_path / "no-config.json"
    detail = _one_failed_event(missing, tmp_path)["detail"]
    assert detail == (
        f"error: config {missing}: no such file or directory (2)"
    ), detail


def test_missing_files_and_an_absent_broker_are_named(
    registrar_world, host_signer, tmp_path
):
    from tpm_simulator.ports import free_port

    state = tmp_path / "flash"
    state.mkdir()
    provision(registrar_world, host_signer, state)
    config = write_config(
        registrar_world, host_signer, state, port=free_port()
    )
    detail = _one_failed_event(config, tmp_path)["detail"]
    assert "connection refused (111)" in detail, detail

    (state / "idevid" / "current").write_bytes(b"00000009\n")
    detail = _one_failed_event(config, tmp_path)["detail"]
    assert detail.endswith("current names no generation on flash"), detail

    lost = state / "ca0.der"
    lost.unlink()
    detail = _one_failed_event(config, tmp_path)["detail"]
    assert detail == (
        f"error: CA file {lost}: no such file or directory (2)"
    ), detail
