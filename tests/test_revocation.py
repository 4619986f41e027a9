"""Revoking one device cuts it off everywhere; the others stay on."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from device_cli import Device
from sim_cli import assert_refused, invoke, mark_issued, tree
from test_renewal import FAST, status, stop, wait_for

from device_agent.core import messages
from firmware_sim.registry import DECOMMISSIONED, REVOKED
from firmware_sim.revocation import (
    RevocationError,
    combined_crl,
    revoke_device,
    write_crl,
)

OTHER = "dev-2"


def bring_up(tmp_path, world, device_id: str) -> Device:
    """A software-key device holding an operational identity."""
    device = Device(tmp_path / device_id, None, device_id=device_id)
    device.init(
        world.port,
        world.factory_ca.root_path,
        "--trust-anchor",
        str(world.ca_bundle),
    )
    device.enroll(world.factory_ca)
    device.configure(**FAST)
    device.run("renew", "--now")
    return device


def refusal_rounds(last_result: str) -> int:
    """How many rounds of refusals the agent reports having seen."""
    found = re.search(r"(\d+) times in a row", last_result)
    assert found, last_result
    return int(found.group(1))


def idevid_serial(device: Device) -> int:
    chain = (device.state / "idevid" / "current" / "chain.pem").read_bytes()
    return x509.load_pem_x509_certificate(chain).serial_number


def publish_crl(world) -> None:
    """What an operator does after a revocation: new CRL, then SIGHUP."""
    write_crl(
        world.crl_path, combined_crl(world.factory_ca, world.operational_ca)
    )
    world.broker.reload()


def agent(device: Device) -> dict:
    """What the running agent reports; empty before its first report."""
    return status(device).get("agent") or {}


def connected_with_ldevid(device: Device) -> bool:
    report = agent(device)
    return (
        report.get("state") == "connected"
        and report.get("identity") == "ldevid"
    )


def refusal_line(result) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    return lines[0]


def heartbeats(probe, device_id: str) -> list[dict]:
    topic = f"devices/{device_id}/heartbeat"
    return [json.loads(m.payload) for m in probe.messages if m.topic == topic]


@pytest.fixture
def fleet(tmp_path, registrar_world):
    """dev-1 and dev-2, each running ``device-agent run`` with an LDevID."""
    world = registrar_world
    world.start_registrar(lifetime=120)
    world.registry.add(OTHER)
    devices = {
        name: bring_up(tmp_path, world, name)
        for name in (world.device_id, OTHER)
    }
    agents = {name: device.start() for name, device in devices.items()}
    try:
        for name, device in devices.items():
            wait_for(
                lambda d=device: connected_with_ldevid(d),
                20,
                f"{name} connected with its LDevID",
            )
        yield devices, agents
    finally:
        for agent in agents.values():
            if agent.poll() is None:
                stop(agent)


def listen(world, make_identity, mqtt_probe, device_id: str):
    """A probe with the device's own rights that records its heartbeats."""
    probe = mqtt_probe(f"{device_id}-listener-{time.monotonic_ns()}")
    identity = make_identity(device_id)
    assert probe.connect(world.port, world.factory_ca.root_path, identity)
    topic = f"devices/{device_id}/heartbeat"
    assert probe.subscribe(topic)[0].value < 0x80
    return probe


def renewal_request(device_id: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .sign(key, hashes.SHA256())
    )
    pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    return messages.encode_request("a1", pem)


def test_revoked_device_is_cut_off_while_the_other_keeps_going(
    fleet, registrar_world, make_identity, mqtt_probe
):
    world = registrar_world
    devices, agents = fleet
    dev1 = devices[world.device_id]
    issued = {i.cert_serial for i in world.registry.issuances("dev-1")}

    revoked = revoke_device(
        world.registry, world.operational_ca, "dev-1", world.factory_ca
    )
    publish_crl(world)

    assert set(revoked) == issued
    assert set(world.operational_ca.revocations()) == issued
    assert world.factory_ca.revocations() == {}
    line = refusal_line(dev1.run("connect", check=False))
    assert "certificate" in line.lower(), line

    # mosquitto keeps open sessions across a reload; a restart makes
    # every device connect again, against the new CRL.
    world.broker.stop()
    world.broker.start()
    wait_for(
        lambda: agent(dev1).get("state") == "needs_service",
        30,
        "dev-1 to need service",
    )
    report = agent(dev1)
    assert report["identity"] == "idevid"
    assert "revoked" in report["last_result"]

    listener = listen(world, make_identity, mqtt_probe, OTHER)
    before = world.registrar.requests_from("dev-1")
    time.sleep(10)
    assert world.registrar.requests_from("dev-1") - before <= 1

    beats = heartbeats(listener, OTHER)
    assert len(beats) >= 5, beats
    assert {b["identity"] for b in beats} == {"ldevid"}
    assert connected_with_ldevid(devices[OTHER])
    assert agents[OTHER].poll() is None
    assert agent(dev1).get("state") == "needs_service"

    answer = world.registrar.handle("dev-1", renewal_request("dev-1"))
    assert answer is not None
    assert messages.decode_response(answer)["reason"] == REVOKED


def test_decommissioned_device_loses_its_idevid_too(
    fleet, registrar_world, make_identity, mqtt_probe
):
    world = registrar_world
    devices, _ = fleet
    dev1 = devices[world.device_id]
    factory_serial = idevid_serial(dev1)

    revoked = revoke_device(
        world.registry,
        world.operational_ca,
        "dev-1",
        world.factory_ca,
        DECOMMISSIONED,
        idevid_serials=[factory_serial],
    )
    publish_crl(world)
    world.broker.stop()
    world.broker.start()

    assert factory_serial in revoked
    assert world.registry.get("dev-1").status == DECOMMISSIONED
    wait_for(
        lambda: agent(dev1).get("state") == "needs_service",
        30,
        "dev-1 to give up on both revoked credentials",
    )
    report = agent(dev1)
    assert report.get("identity") is None
    assert "revoked" in report["last_result"]
    # From now on it tries only at the slowest pace (retry_cap = 2 s
    # here, waits of 1-2 s), never in a tight loop.
    first = refusal_rounds(report["last_result"])
    time.sleep(4)
    later = agent(dev1)
    assert later["state"] == "needs_service"
    assert first <= refusal_rounds(later["last_result"]) <= first + 4
    line = refusal_line(dev1.run("connect", check=False))
    assert "certificate" in line.lower(), line

    listener = listen(world, make_identity, mqtt_probe, OTHER)
    wait_for(lambda: len(heartbeats(listener, OTHER)) >= 3, 10, "dev-2")


def test_revoke_refuses_an_idevid_it_would_ignore(registrar_world):
    world = registrar_world
    with pytest.raises(RevocationError, match="decommission"):
        revoke_device(
            world.registry,
            world.operational_ca,
            "dev-1",
            world.factory_ca,
            idevid_serials=[5],
        )
    with pytest.raises(RevocationError, match="status"):
        revoke_device(
            world.registry, world.operational_ca, "dev-1", status="active"
        )
    assert world.registry.get("dev-1").status == "active"


def test_cli_decommission_writes_the_crl_and_reloads_the_broker(
    registrar_world, tmp_path
):
    world = registrar_world
    crl_out = tmp_path / "out-crl.pem"
    mark_issued(world.factory_ca, 0xABC123)

    result = invoke([
        "registrar", "decommission", "dev-1",
        "--dir", str(world.layout.directory),
        "--factory-ca", str(world.factory_ca.directory),
        "--idevid-serial", "abc123",
        "--crl-out", str(crl_out),
        "--broker-pid", str(world.broker.pid),
    ])  # fmt: skip

    assert result.exit_code == 0, result.output
    assert "dev-1 decommissioned" in result.output
    crls = crl_out.read_bytes().split(b"-----END X509 CRL-----")[:-1]
    assert len(crls) == 2
    factory_crl = x509.load_pem_x509_crl(crls[0] + b"-----END X509 CRL-----")
    assert factory_crl.get_revoked_certificate_by_serial_number(0xABC123)
    world.broker.wait_for_log("Reloading config.", 5)


def test_cli_refuses_crl_out_without_the_factory_ca(registrar_world, tmp_path):
    result = invoke([
        "registrar", "revoke", "dev-1",
        "--dir", str(registrar_world.layout.directory),
        "--crl-out", str(tmp_path / "crl.pem"),
    ])  # fmt: skip

    assert result.exit_code != 0
    assert "--factory-ca" in result.output
    assert registrar_world.registry.get("dev-1").status == "active"


def test_registrar_revoke_checks_its_outputs_before_any_change(
    registrar_world, tmp_path
):
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        for extra in (
            ["--crl-out", str(tmp_path / "missing" / "crl.pem")],
            ["--crl-out", str(tmp_path / "crl.pem"),
             "--broker-pid", str(sleeper.pid)],
        ):  # fmt: skip
            result = invoke([
                "registrar", "revoke", "dev-1",
                "--dir", str(registrar_world.layout.directory),
                "--factory-ca", str(registrar_world.factory_ca.directory),
                *extra,
            ])  # fmt: skip
            assert result.exit_code != 0, result.output
            assert "--crl-out" in result.output or "mosquitto" in (
                result.output
            ), result.output
            assert registrar_world.registry.get("dev-1").status == "active"
        assert sleeper.poll() is None
        assert not (tmp_path / "crl.pem").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.fixture
def line_and_registrar(tmp_path):
    """A one-device factory line and a registry that knows the device."""
    from firmware_sim import registrar
    from firmware_sim.registry import Registry

    line = tmp_path / "line"
    made = invoke([
        "factory", "--dir", str(line), "--count", "1", "--prefix", "dev",
        "--software-keys",
    ])  # fmt: skip
    assert made.exit_code == 0, made.output
    layout = registrar.prepare(tmp_path / "registrar")
    with Registry(layout.registry_path) as registry:
        registry.add("dev-0001")
    return line, layout


def revoke_args(line, layout, *more):
    return [
        "revoke", "dev-0001", "--factory-dir", str(line),
        "--registrar-dir", str(layout.directory), *more,
    ]  # fmt: skip


def test_cli_revoke_refuses_to_signal_a_process_that_is_not_mosquitto(
    line_and_registrar, tmp_path
):
    from sim_cli import assert_refused

    from firmware_sim.registry import Registry

    line, layout = line_and_registrar
    crl_out = tmp_path / "crl.pem"
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        result = invoke(revoke_args(
            line, layout, "--crl-out", str(crl_out),
            "--broker-pid", str(bystander.pid),
        ))  # fmt: skip
        time.sleep(0.2)
        assert bystander.poll() is None, "the bystander was signalled"
    finally:
        bystander.kill()
        bystander.wait()

    assert_refused(result, "not mosquitto")
    gone = invoke(revoke_args(
        line, layout, "--crl-out", str(crl_out),
        "--broker-pid", str(bystander.pid),
    ))  # fmt: skip
    assert_refused(gone, f"no process {bystander.pid}")
    nowhere = invoke(revoke_args(
        line, layout, "--crl-out", str(tmp_path / "missing" / "crl.pem"),
    ))  # fmt: skip
    assert_refused(nowhere, "missing")
    assert not crl_out.exists()
    with Registry(layout.registry_path) as registry:
        assert registry.get("dev-0001").status == "active"


def test_cli_crl_check_refuses_a_warning_time_that_is_not_a_number(
    tmp_path,
):
    from sim_cli import assert_refused

    crl = tmp_path / "crl.pem"
    crl.write_text("not used\n")
    for value in ("nan", "inf"):
        result = invoke(["crl-check", str(crl), "--warn-seconds", value])
        assert_refused(result, value)


def test_the_cli_loads_no_plotting_until_a_fleet_runs():
    code = (
        "import sys; from firmware_sim import cli; "
        "print('matplotlib' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
    )
    assert result.stdout.strip() == "False"


def test_cli_revoke_refuses_pseudo_files_and_keeps_a_decommission(
    line_and_registrar, tmp_path
):
    import os

    from sim_cli import assert_refused

    from firmware_sim.registry import Registry

    line, layout = line_and_registrar
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for bad in ("/proc/version", "/sys/kernel/notes", str(fifo)):
        result = invoke(revoke_args(line, layout, "--crl-out", bad))
        assert_refused(result, "--crl-out")
    with Registry(layout.registry_path) as registry:
        assert registry.get("dev-0001").status == "active"

    crl_out = tmp_path / "crl.pem"
    retired = invoke([
        "decommission", *revoke_args(line, layout)[1:], "--crl-out",
        str(crl_out),
    ])  # fmt: skip
    assert retired.exit_code == 0, retired.output
    for command in (
        revoke_args(line, layout, "--crl-out", str(crl_out)),
        ["registrar", "revoke", "dev-0001",
         "--dir", str(layout.directory)],
    ):  # fmt: skip
        assert_refused(invoke(command), "already decommissioned")
    with Registry(layout.registry_path) as registry:
        assert registry.get("dev-0001").status == DECOMMISSIONED


@pytest.mark.parametrize("command", ["revoke", "decommission"])
def test_cli_revoking_twice_says_since_when_and_publishes_again(
    line_and_registrar, tmp_path, command
):
    """The status and its time stay; the CRL is written again, said so."""
    from firmware_sim.registry import Registry

    line, layout = line_and_registrar
    crl_out = tmp_path / "crl.pem"
    args = [command, *revoke_args(line, layout)[1:], "--crl-out", str(crl_out)]
    first = invoke(args)
    assert first.exit_code == 0, first.output
    with Registry(layout.registry_path) as registry:
        changed = registry.get("dev-0001").changed_at

    again = invoke(args)

    assert again.exit_code == 0, again.output
    status = REVOKED if command == "revoke" else DECOMMISSIONED
    since = f"{changed:%Y-%m-%dT%H:%M:%SZ}"
    assert f"dev-0001 is already {status} (since {since})" in again.output
    assert f"wrote {crl_out} again" in again.output
    assert "revoked serial" not in again.output
    with Registry(layout.registry_path) as registry:
        device = registry.get("dev-0001")
    assert (device.status, device.changed_at) == (status, changed)


def test_registrar_revoke_twice_says_already(line_and_registrar):
    _, layout = line_and_registrar
    args = ["registrar", "revoke", "dev-0001", "--dir", str(layout.directory)]
    assert invoke(args).exit_code == 0

    again = invoke(args)

    assert again.exit_code == 0, again.output
    assert "dev-0001 is already revoked (since " in again.output


def test_cli_crl_check_reads_a_der_crl(factory_ca, tmp_path):
    import datetime

    der = tmp_path / "crl.der"
    pem = factory_ca.recorded_crl(datetime.timedelta(days=1))
    crl = x509.load_pem_x509_crl(pem)
    der.write_bytes(crl.public_bytes(serialization.Encoding.DER))

    result = invoke(["crl-check", str(der)])

    assert result.exit_code == 0, result.output
    assert f"{der}: every CRL is current" in result.output


@pytest.mark.parametrize(
    "content", [b"", b"not a CRL\n", b"\x30\x03\x02\x01\x01"]
)
def test_cli_crl_check_says_a_file_of_neither_form_holds_no_crl(
    tmp_path, content
):

    path = tmp_path / "crl"
    path.write_bytes(content)

    result = invoke(["crl-check", str(path)])

    assert result.exit_code == 4, result.output
    assert result.output == f"error: {path}: holds no CRL\n"
    assert path.read_bytes() == content


@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_cli_crl_check_of_a_file_it_cannot_read_is_status_4(tmp_path, kind):
    path = tmp_path / "crl.pem"
    if kind == "directory":
        path.mkdir()

    result = invoke(["crl-check", str(path)])

    assert result.exit_code == 4, result.output
    assert result.output.startswith(f"error: {path}: cannot be read (")
    assert len(result.output.splitlines()) == 1


def test_cli_crl_check_names_the_unreadable_block_of_a_crlfile(
    factory_ca, tmp_path
):
    """One good CRL and one damaged: the damaged one is named, exit 4."""
    import datetime

    good = factory_ca.recorded_crl(datetime.timedelta(days=1))
    damaged = (
        b"-----BEGIN X509 CRL-----\nMIIBAAAAAAAAAAAA\n-----END X509 CRL-----\n"
    )
    path = tmp_path / "crl.pem"
    path.write_bytes(good + damaged)

    result = invoke(["crl-check", str(path)])

    assert result.exit_code == 4, result.output
    assert result.output == (
        f"error: {path}: CRL 2 of 2 is not readable (its PEM block is "
        "damaged or holds no CRL)\n"
    )


def test_cli_crl_check_refuses_a_crl_not_yet_valid(factory_ca, tmp_path):
    """A thisUpdate beyond the clock skew fails like an expired CRL."""
    import datetime

    now = datetime.datetime.now(datetime.UTC)
    path = tmp_path / "crl.pem"
    path.write_bytes(
        factory_ca.crl(
            next_update=datetime.timedelta(days=1),
            last_update=now + datetime.timedelta(hours=1),
        )
    )
    later = invoke(["crl-check", str(path)])
    path.write_bytes(
        factory_ca.crl(
            next_update=datetime.timedelta(days=1),
            last_update=now + datetime.timedelta(minutes=2),
        )
    )
    within_skew = invoke(["crl-check", str(path)])

    assert later.exit_code == 1, later.output
    assert later.output.count("\n") == 1
    assert "is not yet valid: its thisUpdate is " in later.output
    assert within_skew.exit_code == 0, within_skew.output


def _kept_files(line, layout):
    """Files a mistyped --crl-out must not replace, by what they are."""
    config = next((line / "devices").iterdir()) / "agent.toml"
    return {
        "the factory CA's key": line / "factory-ca" / "root.key",
        "the operational CA's certificate": layout.ca_dir / "root.pem",
        "a device's config": config,
        "the registrar's chain": layout.chain_path,
        "the revocation record": line / "factory-ca" / "revoked.txt",
    }


def _out_of_service_argv(command, line, layout, crl_out):
    if command.startswith("registrar"):
        verb = command.split()[1]
        return [
            "registrar", verb, "dev-0001", "--dir", str(layout.directory),
            "--factory-ca", str(line / "factory-ca"), "--crl-out",
            str(crl_out),
        ]  # fmt: skip
    argv = revoke_args(line, layout, "--crl-out", str(crl_out))
    return [command, *argv[1:]]


@pytest.mark.parametrize(
    "command",
    ["revoke", "decommission", "registrar revoke", "registrar decommission"],
)
def test_crl_out_refuses_a_file_that_holds_anything_but_crls(
    line_and_registrar, tmp_path, command
):
    """A mistyped --crl-out costs no key, certificate or config."""
    from firmware_sim.registry import Registry

    line, layout = line_and_registrar
    (line / "factory-ca" / "revoked.txt").write_text("")
    for what, path in _kept_files(line, layout).items():
        before = tree(tmp_path)
        argv = _out_of_service_argv(command, line, layout, path)

        result = invoke(argv)

        assert_refused(result, f"--crl-out {path}")
        assert "left alone" in result.output, what
        assert tree(tmp_path) == before, what
        with Registry(layout.registry_path, read_only=True) as registry:
            assert registry.get("dev-0001").status == "active", what


@pytest.mark.parametrize("encoding", ["PEM", "DER"])
def test_crl_out_replaces_a_crlfile_of_one_or_several_crls(
    line_and_registrar, tmp_path, encoding
):
    from firmware_sim.ca import CertificateAuthority

    line, layout = line_and_registrar
    factory = CertificateAuthority.load(line / "factory-ca")
    crl_out = tmp_path / "crl.pem"
    if encoding == "DER":
        crl = x509.load_pem_x509_crl(factory.crl())
        crl_out.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    else:
        crl_out.write_bytes(factory.crl() + factory.crl())

    result = invoke(revoke_args(line, layout, "--crl-out", str(crl_out)))

    assert result.exit_code == 0, result.output
    assert crl_out.read_bytes().count(b"-----BEGIN X509 CRL-----") == 2


def test_broker_crl_replaces_only_a_crlfile(tmp_path, factory_ca):
    from firmware_sim import registrar

    layout = registrar.prepare(tmp_path / "registrar")
    broker_dir = tmp_path / "broker"
    broker_dir.mkdir()
    crl = broker_dir / "crl.pem"
    crl.write_bytes((factory_ca.directory / "root.key").read_bytes())
    argv = [
        "broker", "crl", "--dir", str(broker_dir),
        "--factory-ca", str(factory_ca.directory),
        "--registrar-dir", str(layout.directory),
    ]  # fmt: skip
    before = tree(tmp_path)

    result = invoke(argv)

    assert_refused(result, str(crl))
    assert "left alone" in result.output
    assert tree(tmp_path) == before
    crl.write_bytes(factory_ca.crl() + factory_ca.crl())
    assert invoke(argv).exit_code == 0


def test_registrar_decommission_refuses_an_idevid_never_issued(
    line_and_registrar, tmp_path
):
    """A mistyped serial is refused before the device changes."""
    from firmware_sim.registry import Registry

    line, layout = line_and_registrar
    argv = [
        "registrar", "decommission", "dev-0001", "--dir",
        str(layout.directory), "--factory-ca", str(line / "factory-ca"),
        "--idevid-serial", "12",
    ]  # fmt: skip
    before = tree(tmp_path)

    result = invoke(argv)

    assert_refused(result, "serial 12 was never issued by this CA")
    assert tree(tmp_path) == before
    with Registry(layout.registry_path, read_only=True) as registry:
        assert registry.get("dev-0001").status == "active"


@pytest.fixture
def world_by_hand(tmp_path):
    """A factory CA made with 'ca init' and a registrar; no factory line."""
    from firmware_sim import registrar
    from firmware_sim.registry import Registry

    made = invoke(["ca", "init", "--dir", str(tmp_path / "ca")])
    assert made.exit_code == 0, made.output
    layout = registrar.prepare(tmp_path / "registrar")
    with Registry(layout.registry_path) as registry:
        registry.add("dev-0001")
    return tmp_path / "ca", layout


def test_cli_revoke_works_in_a_world_made_by_hand(world_by_hand, tmp_path):
    from firmware_sim.registry import Registry

    ca, layout = world_by_hand
    crl_out = tmp_path / "crl.pem"

    result = invoke([
        "revoke", "dev-0001", "--factory-dir", str(ca),
        "--registrar-dir", str(layout.directory), "--crl-out", str(crl_out),
    ])  # fmt: skip

    assert result.exit_code == 0, result.output
    assert "dev-0001 revoked" in result.output
    assert crl_out.read_bytes().count(b"-----BEGIN X509 CRL-----") == 2
    with Registry(layout.registry_path, read_only=True) as registry:
        assert registry.get("dev-0001").status == REVOKED


def test_cli_decommission_without_records_says_how_to_name_the_idevid(
    world_by_hand, tmp_path
):
    ca, layout = world_by_hand
    before = tree(tmp_path)

    result = invoke([
        "decommission", "dev-0001", "--factory-dir", str(ca),
        "--registrar-dir", str(layout.directory),
        "--crl-out", str(tmp_path / "crl.pem"),
    ])  # fmt: skip

    assert_refused(result, "no factory records")
    assert "registrar decommission dev-0001" in result.output
    assert "--idevid-serial" in result.output
    assert tree(tmp_path) == before


def test_cli_crl_check_exits_3_on_a_warning_and_1_when_expired(
    factory_ca, tmp_path
):
    import datetime

    path = tmp_path / "crl.pem"
    path.write_bytes(factory_ca.recorded_crl(datetime.timedelta(hours=1)))

    current = invoke(["crl-check", str(path), "--warn-seconds", "60"])
    soon = invoke(["crl-check", str(path), "--warn-seconds", "7200"])
    path.write_bytes(
        factory_ca.crl(
            next_update=datetime.timedelta(seconds=1),
            last_update=datetime.datetime.now(datetime.UTC)
            - datetime.timedelta(hours=1),
        )
    )
    expired = invoke(["crl-check", str(path)])
    helped = invoke(["crl-check", "--help"])

    assert current.exit_code == 0, current.output
    assert soon.exit_code == 3, soon.output
    assert "warning: CRL of" in soon.output
    assert "every CRL is current" not in soon.output
    assert expired.exit_code == 1, expired.output
    assert "expired at" in expired.output
    assert "3  a CRL expires within --warn-seconds" in helped.output
    assert "1  a CRL has expired, or is not yet valid" in helped.output
    assert "4  the file cannot be read, holds no CRL" in helped.output
