"""Defects a new user met in the device-agent CLI, each pinned by a test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from device_cli import Device, wait_for
from sim_cli import assert_refused, invoke, tree
from test_renewal import bring_up, one_line_error, status, stop

from device_agent.agent import Agent
from device_agent.config import load
from device_agent.errors import ChainError


def agent_status(device: Device) -> dict:
    path = device.state / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


# -- renew --now against a running agent ------------------------------


def test_renew_now_reports_a_refusal_the_agent_already_met(
    tmp_path, registrar_world
):
    world = registrar_world
    world.registry.set_status(world.device_id, "revoked")
    device = bring_up(tmp_path, world, None)
    agent = device.start()
    try:
        wait_for(
            lambda: agent_status(device).get("state") == "needs_service",
            30,
            "the refusal for good",
        )
        before = agent_status(device)["failures_in_row"]
        result = device.run("renew", "--now", check=False)
        line = one_line_error(result)
        assert "revoked" in line
        assert "one attempt made although the device needs service" in line
        assert "no answer" not in line
        assert "asked the running agent" in result.out
        # It was a real attempt, not the old refusal read back.
        assert agent_status(device)["failures_in_row"] == before + 1
    finally:
        stop(agent)


def test_renew_now_without_a_session_in_needs_service_answers_at_once(
    tmp_path, registrar_world
):
    device = bring_up(tmp_path, registrar_world, None)
    agent = Agent(lambda: load(device.config))
    agent._recover()
    # The broker refused every credential: no session, none coming soon.
    agent.state = "needs_service"
    agent.next_connect = agent.now() + 3600
    agent.next_heartbeat = agent.now() + 3600
    agent._on_renew(signal.SIGUSR1, None)
    agent._tick()
    assert agent.renew_requests_answered == 1
    assert "not attempted: the device needs service" in agent.renew_answer
    written = agent_status(device)["renew_now"]
    assert written == {"answered": 1, "answer": agent.renew_answer}
    assert not agent._renew_now
    assert os.getpid() == agent_status(device)["pid"]


# -- a state directory open to others, and what status notices ---------


@pytest.fixture
def device(software_device):
    return software_device


def status_json(device: Device, *options: str) -> tuple[dict, object]:
    result = device.run(*options, "status", "--json", check=False)
    return json.loads(result.out), result


def problems(report: dict, level: str = "error") -> list[str]:
    return [p["problem"] for p in report["problems"] if p["level"] == level]


def write_agent_status(device: Device, **fields: object) -> None:
    """status.json as an agent writes it: stopped, clock trusted, unless
    ``fields`` say otherwise."""
    written = {
        "state": "stopped",
        "clock": "trusted",
        "clock_reason": "",
        "next_renewal": None,
        "last_result": "none yet",
        "failures_in_row": 0,
    }
    written.update(fields)
    (device.state / "status.json").write_text(json.dumps(written))


def test_connect_and_csr_refuse_a_state_dir_open_to_others(device):
    device.state.chmod(0o755)
    before = device.snapshot()
    for verb in (["connect"], ["csr"]):
        line = one_line_error(device.run(*verb, check=False))
        assert "open to group or others (mode 0755)" in line, verb
        assert "chmod 700" in line
    assert device.snapshot() == before


def test_status_flags_a_state_dir_open_to_others(device):
    device.state.chmod(0o755)
    result = device.run("status", check=False)
    assert "key in software" in result.out  # still shows what it can
    assert "PROBLEM:" in result.out
    assert "open to group or others" in result.out
    one_line_error(result)
    report, result = status_json(device)
    assert result.returncode != 0
    assert any("open to group" in p for p in problems(report))


def test_status_of_a_healthy_device_has_no_problems(device):
    report, result = status_json(device)
    assert result.returncode == 0, result.err
    assert report["problems"] == []
    assert "PROBLEM" not in device.run("status").out


def test_status_names_a_garbage_key(device):
    (key,) = (device.state / "idevid" / "generations").glob("*/key.*")
    key.write_bytes(b"garbage, not a key\n")
    result = device.run("status", check=False)
    assert "factory: key unreadable: not a key" in result.out
    one_line_error(result)


def test_status_names_a_broken_current_pointer(device):
    current = device.state / "idevid" / "current"
    current.unlink()
    current.symlink_to("generations/0099")
    result = device.run("status", check=False)
    assert "factory: current pointer broken" in result.out
    assert "generations/0099" in result.out
    one_line_error(result)


def test_status_ignores_an_agent_status_file_with_wrong_types(device):
    (device.state / "status.json").write_text(
        json.dumps({"state": "connected", "failures_in_row": None})
    )
    result = device.run("status")
    assert "None in a row" not in result.out
    assert "warning:" in result.out
    assert "agent status file unreadable (ignored)" in result.out
    report, _ = status_json(device)
    assert report["agent"] is None
    assert problems(report, "warning")


def test_status_notices_another_devices_store(device):
    report, result = status_json(device, "--set", "device_id=sw-01")
    assert result.returncode != 0
    (problem,) = problems(report)
    assert "certificate names another device (CN=dev-0042)" in problem
    assert "sw-01" in problem


def test_connect_never_presents_another_devices_certificate(device):
    """What status calls another device's store, connect refuses too."""
    before = device.snapshot()
    result = device.run("--set", "device_id=sw-01", "connect", check=False)
    line = one_line_error(result)
    assert "factory: certificate names another device (CN=dev-0042)" in line
    assert "not sw-01" in line
    assert device.snapshot() == before


def test_status_judges_the_clock_again_when_the_agent_is_stopped(device):
    """A stopped agent's 'trusted' is history; the known-good time rules."""
    from device_agent.core import clock

    write_agent_status(device)
    last_good = device.state / "last-good-time"
    last_good.write_text(clock.encode_last_good(4102444800.0))  # 2100
    report, _ = status_json(device)
    assert report["agent"]["clock"] == "untrusted"
    (warning,) = problems(report, "warning")
    assert "behind the last known-good time" in warning
    assert f"delete {last_good}" in warning
    assert "clock:         untrusted" in device.run("status", check=False).out


@pytest.mark.parametrize(
    ("state", "clock_state", "level", "words"),
    [
        ("renewal_loop", "trusted", "error", "stopped renewing"),
        ("clock_untrusted", "untrusted", "warning", "clock untrusted"),
    ],
)
def test_status_of_a_running_agent_that_stopped_renewing_is_a_problem(
    device, state, clock_state, level, words
):
    from device_agent.agent import AGENT_LOCK, PID_FILE
    from device_agent.store import CredentialStore

    (device.state / PID_FILE).write_text(f"{os.getpid()}\n")

    write_agent_status(
        device,
        state=state,
        clock=clock_state,
        clock_reason="behind the last known-good time",
        last_result="stopped: renewing fresh certificates",
    )
    store = CredentialStore(device.state, "idevid")
    with store.lock(timeout=1, name=AGENT_LOCK):  # as a running agent
        report, result = status_json(device)
    assert report["agent"]["running"]
    assert result.returncode != 0 or level == "warning"
    assert any(words in p for p in problems(report, level)), report


@pytest.mark.parametrize("content", ["garbage", "", "nan", "1e400"])
def test_status_names_an_unreadable_known_good_time(device, content):
    write_agent_status(device)
    (device.state / "last-good-time").write_text(content)
    report, _ = status_json(device)
    assert any(
        "last-good-time unreadable" in p for p in problems(report, "warning")
    ), report["problems"]


def test_status_warns_of_a_renewal_hook_that_is_not_a_program(device):
    report, _ = status_json(
        device, "--set", "renewal_hook=/nonexistent/hook --flag"
    )
    (warning,) = problems(report, "warning")
    assert warning.startswith("renewal_hook: /nonexistent/hook is not")


def test_openssl_modules_that_is_no_directory_is_named(tmp_path):
    from device_agent import tls
    from device_agent.errors import TPMError

    missing = tmp_path / "no-such-modules"
    with pytest.raises(TPMError, match=f"openssl_modules {missing}: not a"):
        tls.load_tpm_provider("swtpm:host=127.0.0.1,port=1", missing)


def _private_key_pem(tmp_path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    path = tmp_path / "not-a-ca.pem"
    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return path


@pytest.mark.parametrize("field", ["trust_anchor", "ca_file"])
def test_status_names_a_ca_file_that_holds_no_certificate(
    device, tmp_path, field
):
    wrong = _private_key_pem(tmp_path)
    report, result = status_json(device, "--set", f"{field}={wrong}")
    assert result.returncode != 0
    assert any(
        p.startswith(f"{field} {wrong}: ") and "private key" in p
        for p in problems(report)
    ), report["problems"]


def test_status_names_a_trust_anchor_our_chain_does_not_build_to(
    device, tmp_path
):
    from firmware_sim.ca import CertificateAuthority

    other = CertificateAuthority.create(tmp_path / "other", name="Other")
    report, result = status_json(
        device, "--set", f"trust_anchor={other.root_path}"
    )
    assert result.returncode != 0
    (problem,) = problems(report)
    assert problem.startswith("factory: chain does not build to")
    assert str(other.root_path) in problem


def test_status_of_a_sound_device_builds_its_chain_to_the_anchor(device):
    report, result = status_json(device)
    assert result.returncode == 0, report["problems"]
    assert problems(report) == []


# -- init checks the CA file it is given --------------------------------


@pytest.mark.parametrize("content", [b"", b"garbage\n", b"\x00" * 64])
def test_init_refuses_a_ca_file_without_a_certificate(tmp_path, content):
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(content)
    device = Device(tmp_path, None)
    line = one_line_error(
        device.run(
            "init", "--device-id", "d1", "--state-dir", str(device.state),
            "--broker", "127.0.0.1:1", "--ca-file", str(ca_file),
            check=False,
        )
    )  # fmt: skip
    assert "ca_file" in line and "not a CA certificate bundle" in line
    assert not device.config.exists()
    assert not device.state.exists()


# -- the registrar: one per directory, never knocked off -----------------


def test_a_second_registrar_cannot_knock_the_first_off(registrar_world):
    from firmware_sim.registrar import Registrar

    world = registrar_world
    first = world.registrar
    second = Registrar(
        world.operational_ca, world.registry, world.host, world.port,
        world.ca_bundle, world.layout.chain_path, world.layout.key_path,
    )  # fmt: skip
    second.start()
    try:
        assert first.client_id != second.client_id
        assert first.client_id.startswith("registrar.")
        assert f".{os.getpid()}." in first.client_id
        time.sleep(1.0)  # a taken-over session is closed at once
        assert first._session.connected
        assert second._session.connected
    finally:
        second.stop()


def test_a_second_registrar_run_on_one_directory_is_refused(
    registrar_world,
):
    world = registrar_world
    argv = [
        sys.executable, "-m", "firmware_sim", "registrar", "run",
        "--dir", str(world.layout.ca_dir.parent),
        "--broker", f"127.0.0.1:{world.port}",
        "--ca-file", str(world.ca_bundle),
    ]  # fmt: skip
    serving = subprocess.Popen(
        argv, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True
    )
    try:
        assert "registrar serving" in serving.stderr.readline()
        second = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, check=False
        )
        assert second.returncode != 0
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"a registrar (pid {serving.pid}) serves" in lines[0]
        assert serving.poll() is None
    finally:
        serving.send_signal(signal.SIGTERM)
        serving.communicate(timeout=15)
    assert serving.returncode == 0


# -- device ids at the registrar -----------------------------------------


REFUSED_IDS = [
    ("add", "x" * 5000),
    ("add", "x" * 65),
    ("add", "bad/id"),
    ("add", ".dot"),
    ("add", "registrar"),
    ("revoke", "x" * 5000),
    ("decommission", "x" * 5000),
]


@pytest.mark.parametrize(("command", "device_id"), REFUSED_IDS)
def test_registrar_refuses_a_device_id_the_agent_cannot_have(
    tmp_path, command, device_id
):
    directory = tmp_path / "registrar"
    assert (
        invoke(["registrar", "init", "--dir", str(directory)]).exit_code == 0
    )
    before = tree(directory)
    result = invoke(["registrar", command, device_id, "--dir", str(directory)])
    assert_refused(result, "DEVICE_ID")
    assert len(result.output) < 300
    assert tree(directory) == before


# -- second new-user pass: inputs, fallbacks and what status says -------


@pytest.fixture(scope="module")
def _set_up_once(tmp_path_factory) -> Device:
    from firmware_sim.ca import CertificateAuthority

    where = tmp_path_factory.mktemp("template")
    made = Device(where, None)
    made.init(1, CertificateAuthority.create(where / "ca").root_path)
    made.enroll(CertificateAuthority.load(where / "ca"))
    return made


@pytest.fixture
def set_up(_set_up_once, tmp_path) -> Device:
    """A copy of one software-key device set up by hand, in tmp_path."""
    template = _set_up_once
    made = Device(tmp_path, None)
    shutil.copytree(template.dir, made.dir, symlinks=True)
    made.config.write_text(
        template.config.read_text().replace(str(template.dir), str(made.dir))
    )
    return made


def run_here(device: Device, capsys, *args: str) -> tuple[int, str, str]:
    """``device-agent`` in this process: faster than a subprocess."""
    from device_agent.cli.main import main

    capsys.readouterr()
    try:
        main(["--config", str(device.config), *args])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_connect_refuses_a_timeout_that_is_not_a_finite_number(
    tmp_path, capsys, value
):
    device = Device(tmp_path, None)
    code, _, err = run_here(
        device, capsys, "connect", "--timeout", value, "--subscribe", "a/b"
    )
    assert code != 0
    (line,) = err.strip().splitlines()
    assert "--timeout" in line and "not a finite number" in line


def _operational_copy(device: Device) -> Path:
    """An operational lineage made of a copy of the factory generation."""
    factory = device.state / "idevid" / "generations" / "0001"
    lineage = device.state / "ldevid"
    (lineage / "generations").mkdir(parents=True, mode=0o700)
    lineage.chmod(0o700)
    shutil.copytree(factory, lineage / "generations" / "0001")
    (lineage / "current").symlink_to("generations/0001")
    return lineage / "generations" / "0001" / "chain.pem"


def test_a_truncated_operational_chain_falls_back_to_the_factory_one(
    set_up, caplog
):
    device = set_up
    from device_agent import credential

    chain_path = _operational_copy(device)
    settings = load(device.config, {})
    assert credential.best_credential(settings)[0] == credential.OPERATIONAL
    os.truncate(chain_path, 100)
    lineage, _ = credential.best_credential(settings)
    assert lineage == credential.FACTORY
    assert str(chain_path) in caplog.text
    factory_chain = device.state / "idevid" / "current" / "chain.pem"
    os.truncate(factory_chain, 100)
    with pytest.raises(ChainError) as refused:
        credential.best_credential(settings)
    assert str(factory_chain.resolve()) in str(refused.value)


def test_status_warns_of_what_a_stopped_agent_and_the_setting_left(
    set_up, capsys
):
    device = set_up
    (device.state / "status.json").write_text(
        json.dumps(
            {
                "state": "connected",
                "clock": "trusted",
                "clock_reason": "",
                "next_renewal": "2031-01-01T00:00:00+00:00",
                "last_result": "ok",
                "failures_in_row": 0,
                "updated": "2030-01-01T00:00:00+00:00",
            }
        )
    )
    code, out, _ = run_here(device, capsys, "--set", "key_store=tpm", "status")
    assert code == 0, out
    assert "2031-01-01" not in out  # the stopped agent's schedule
    assert "not running (last seen connected" in out
    assert 'key_store = "tpm" but the factory key is a software key' in out
    assert "TPM:             not checked" in out  # no TPM key: no probe


def test_status_fails_while_the_running_agent_needs_service(set_up, capsys):
    device = set_up
    from device_agent.agent import AGENT_LOCK, PID_FILE
    from device_agent.store import CredentialStore

    (device.state / "status.json").write_text(
        json.dumps(
            {
                "state": "needs_service",
                "clock": "trusted",
                "clock_reason": "",
                "next_renewal": None,
                "last_result": "refused: revoked",
                "failures_in_row": 3,
            }
        )
    )
    (device.state / PID_FILE).write_text(f"{os.getpid()}\n")
    store = CredentialStore(device.state, "idevid")
    with store.lock(timeout=0, name=AGENT_LOCK):
        code, out, err = run_here(device, capsys, "status")
    assert code != 0
    assert "next renewal:  not scheduled" in out
    assert "PROBLEM:" in out and "the agent needs service" in out
    assert len(err.strip().splitlines()) == 1


def test_status_fails_when_the_tpm_holding_the_key_does_not_answer(
    set_up, capsys
):
    device = set_up
    from tpm_simulator.ports import free_port

    (key,) = (device.state / "idevid" / "generations").glob("*/key.*")
    blob = key.with_name("key.tss2.pem")
    key.rename(blob)
    blob.write_text(
        "-----BEGIN TSS2 PRIVATE KEY-----\nMAA=\n"
        "-----END TSS2 PRIVATE KEY-----\n"
    )
    tcti = f"swtpm:host=127.0.0.1,port={free_port()}"
    code, out, _ = run_here(device, capsys, "--set", f"tcti={tcti}", "status")
    assert code != 0
    assert f"the TPM at {tcti} does not answer" in out


def test_status_says_run_recovers_a_generation_without_pointer(set_up, capsys):
    device = set_up
    (device.state / "idevid" / "current").unlink()
    _, out, _ = run_here(device, capsys, "status")
    assert "generation 1 is on disk but no current pointer" in out
    assert "'device-agent run' recovers it" in out


@pytest.mark.parametrize("verb", [["reset", "--yes"], ["run"], ["status"]])
def test_verbs_other_than_init_refuse_a_missing_state_dir(
    set_up, capsys, verb
):
    device = set_up
    missing = device.dir / "nowhere"
    code, _, err = run_here(
        device, capsys, "--set", f"state_dir={missing}", *verb
    )
    assert code != 0
    assert err.strip() == (
        f"error: state_dir {missing} does not exist (run init first)"
    )
    assert not missing.exists()


def test_csr_names_an_empty_key_file_in_one_plain_line(set_up, capsys):
    device = set_up
    (key,) = (device.state / "idevid" / "generations").glob("*/key.*")
    key.write_bytes(b"")
    code, _, err = run_here(device, capsys, "csr")
    assert code != 0
    assert err.strip() == f"error: {key}: key file is empty"
    key.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n")
    code, _, err = run_here(device, capsys, "csr")
    assert code != 0
    (line,) = err.strip().splitlines()
    assert str(key) in line and "http" not in line


# -- third new-user pass: what a command may overwrite, expiry, SIGTERM --


def _key_file(device: Device, lineage: str = "idevid") -> Path:
    (key,) = (device.state / lineage / "generations").glob("*/key.*")
    return key


@pytest.mark.parametrize("target", ["key", "config", "other"])
def test_csr_out_refuses_the_key_the_config_and_files_holding_no_csr(
    set_up, capsys, target
):
    device = set_up
    key = _key_file(device)
    other = device.dir / "notes.txt"
    other.write_text("not a CSR\n")
    path = {
        "key": device.state / "idevid" / "current" / key.name,
        "config": device.config,
        "other": other,
    }[target]
    before = device.snapshot()
    config, notes = device.config.read_bytes(), other.read_bytes()
    code, _, err = run_here(device, capsys, "csr", "--out", str(path))
    assert code != 0
    (line,) = err.strip().splitlines()
    assert str(path) in line and "refusing" in line
    assert device.snapshot() == before
    assert (key.stat().st_mode & 0o777) == 0o600
    assert device.config.read_bytes() == config
    assert other.read_bytes() == notes


def test_csr_out_replaces_an_earlier_csr_pem_or_der(set_up, capsys):
    from cryptography.hazmat.primitives.serialization import Encoding

    device = set_up
    out = device.dir / "request.csr"
    for _ in range(2):
        code, _, err = run_here(device, capsys, "csr", "--out", str(out))
        assert code == 0, err
    request = x509.load_pem_x509_csr(out.read_bytes())
    out.write_bytes(request.public_bytes(Encoding.DER))
    code, _, err = run_here(device, capsys, "csr", "--out", str(out))
    assert code == 0, err
    assert out.read_bytes().startswith(b"-----BEGIN CERTIFICATE REQUEST")
    assert not list(device.dir.glob(".*.tmp"))


def test_a_key_file_replaced_by_a_csr_is_named_as_holding_no_key(
    set_up, capsys
):
    device = set_up
    key = _key_file(device)
    code, out, _ = run_here(device, capsys, "csr")
    key.write_text(out)
    key.chmod(0o644)
    code, _, err = run_here(device, capsys, "csr")
    assert code != 0
    assert err.strip() == f"error: {key}: key file holds no private key"


def _expired_chain(device: Device, ca, seconds_ago: float = 60) -> bytes:
    """A chain for the device's key whose leaf expired a while ago."""
    import datetime

    from firmware_sim.ca import chain_pem

    now = datetime.datetime.now(datetime.UTC)
    chain = ca.sign_csr(
        device.csr(),
        not_before=now - datetime.timedelta(days=1),
        not_after=now - datetime.timedelta(seconds=seconds_ago),
    )
    return chain_pem(chain)


def test_status_and_connect_refuse_an_expired_factory_certificate(
    device, factory_ca
):
    chain_path = device.state / "idevid" / "current" / "chain.pem"
    chain_path.write_bytes(_expired_chain(device, factory_ca))
    leaf = x509.load_pem_x509_certificate(chain_path.read_bytes())
    serial = f"{leaf.serial_number:x}"

    report, result = status_json(device)
    assert result.returncode == 6
    (problem,) = problems(report)
    assert problem.startswith(f"factory: certificate {serial} expired at")
    assert leaf.not_valid_after_utc.isoformat() in problem
    assert f"PROBLEM:         factory: certificate {serial}" in (
        device.run("status", check=False).out
    )

    result = device.run("connect", check=False)
    line = one_line_error(result)
    expiry = f"{leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z"
    assert line == (
        f"error: certificate of the factory identity expired at {expiry}"
    )
    assert "connected" not in result.out


def test_connect_passes_over_an_expired_operational_credential(
    device, factory_ca, caplog
):
    from device_agent import credential

    chain_path = _operational_copy(device)
    chain_path.write_bytes(_expired_chain(device, factory_ca))
    settings = load(device.config, {})
    assert credential.best_credential(settings)[0] == credential.FACTORY
    assert "certificate of the operational identity expired" in caplog.text
    report, result = status_json(device)
    assert result.returncode == 0, result.err
    (warning,) = problems(report, "warning")
    assert warning.startswith("operational: certificate")
    assert "falls back to the factory identity" in warning


def _tpm_device(tmp_path, swtpm, broker_factory, factory_ca) -> Device:
    broker = broker_factory()
    made = Device(tmp_path, swtpm.tcti)
    made.init(broker.port, factory_ca.root_path)
    made.enroll(factory_ca)
    return made


def test_sigterm_ends_connect_with_its_tpm_key_flushed(
    tmp_path, swtpm, broker_factory, factory_ca
):
    device = _tpm_device(tmp_path, swtpm, broker_factory, factory_ca)
    for _ in range(3):  # two leftovers used to fill swtpm's slots
        connect = subprocess.Popen(
            [sys.executable, "-m", "device_agent", "--config",
             str(device.config), "connect", "--subscribe", "t/x",
             "--timeout", "60"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        try:
            assert connect.stdout.readline().startswith("connected")
            assert connect.stdout.readline().startswith("subscribed")
            connect.send_signal(signal.SIGTERM)
            _, err = connect.communicate(timeout=30)
        finally:
            connect.kill()
        assert connect.returncode == 143
        assert err.strip() == "error: terminated"
        assert swtpm.transient_handles() == []
    info = json.loads(device.run("tpm", "info", "--json").out)
    assert info["transient_handles"] == 0


def test_a_full_tpm_names_the_leftover_objects_and_the_flush(tmp_path, swtpm):
    from tpm2_pytss import ESAPI
    from tpm2_pytss.tsskey import TSSPrivKey

    from device_agent.errors import TPMError
    from device_agent.keys.tpm import TPMKeyStore

    private = tmp_path / "keys"
    private.mkdir(mode=0o700)
    store = TPMKeyStore(swtpm.tcti)
    store.generate(private / "key.tss2.pem")
    blob = TSSPrivKey.from_pem((private / "key.tss2.pem").read_bytes())
    ectx = ESAPI(swtpm.tcti)
    for _ in range(2):
        blob.load(ectx)  # left loaded, as by a killed process
    ectx.close()
    with (
        pytest.raises(TPMError) as refused,
        store.signer(private / "key.tss2.pem"),
    ):
        pass
    assert refused.value.rc is not None
    assert refused.value.rc & 0xFFF == 0x902
    assert "objects are left loaded in the TPM" in str(refused.value)
    assert "tpm-simulator flush --state-dir" in str(refused.value)


def test_keygen_operational_is_refused_while_the_agent_runs(set_up, capsys):
    device = set_up
    from device_agent.agent import AGENT_LOCK, PID_FILE
    from device_agent.store import CredentialStore

    _operational_copy(device)
    (device.state / PID_FILE).write_text(f"{os.getpid()}\n")
    before = device.snapshot()
    store = CredentialStore(device.state, "idevid")
    with store.lock(timeout=0, name=AGENT_LOCK):
        code, _, err = run_here(
            device, capsys, "keygen", "--force", "--identity", "operational"
        )
    assert code != 0
    (line,) = err.strip().splitlines()
    assert f"stop the running agent (pid {os.getpid()}) first" in line
    assert device.snapshot() == before


def test_keygen_help_says_a_renewal_replaces_an_uninstalled_key(
    set_up, capsys
):
    code, out, _ = run_here(set_up, capsys, "keygen", "--help")
    assert code == 0
    assert "replaced by the agent's next renewal" in " ".join(out.split())


def _as_nobody(device: Device, *args: str):
    return subprocess.run(
        ["runuser", "-u", "nobody", "--", sys.executable, "-m",
         "device_agent", "--config", str(device.config), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd="/",
    )  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for runuser")
def test_a_user_who_cannot_read_state_dir_is_told_so(_set_up_once):
    import tempfile

    where = Path(tempfile.mkdtemp(prefix="nobody-"))
    try:
        where.chmod(0o755)
        device = Device(where, None)
        shutil.copytree(_set_up_once.dir, device.dir, symlinks=True)
        device.dir.chmod(0o755)
        ca_file = device.dir / "root.pem"
        shutil.copy(_set_up_once.dir.parent / "ca" / "root.pem", ca_file)
        ca_file.chmod(0o644)
        lines = [
            f'ca_file = "{ca_file}"' if line.startswith("ca_file") else line
            for line in _set_up_once.config.read_text().splitlines()
        ]
        device.config.write_text(
            "\n".join(lines).replace(str(_set_up_once.dir), str(device.dir))
            + "\n"
        )
        device.config.chmod(0o644)
        chain = device.dir / "chain.pem"
        chain.chmod(0o644)
        before = device.snapshot()
        expected = (
            f"error: cannot read state_dir {device.state} as user nobody "
            "(Permission denied)"
        )
        for verb in (
            ["status"],
            ["status", "--json"],
            ["csr"],
            ["connect"],
            ["keygen", "--force"],
            ["install-chain", str(chain)],
            ["reset", "--yes"],
        ):
            result = _as_nobody(device, *verb)
            assert result.returncode != 0, verb
            assert result.stderr.strip() == expected, verb
            assert "factory" not in result.stdout, verb
        assert device.snapshot() == before

        # A state_dir behind a directory this user may not enter.
        locked = where / "locked"
        locked.mkdir(mode=0o700)
        hidden = locked / "state"
        device.state.rename(hidden)
        text = device.config.read_text()
        assert str(device.state) in text
        device.config.write_text(text.replace(str(device.state), str(hidden)))
        result = _as_nobody(device, "status")
        assert result.returncode != 0
        assert result.stderr.strip() == (
            f"error: cannot reach state_dir {hidden} (Permission denied)"
        )
    finally:
        shutil.rmtree(where)


@pytest.fixture
def two_generations(device, factory_ca) -> Device:
    """A device whose factory key was replaced once: generations 1, 2."""
    device.run("keygen", "--force")
    path = device.dir / "chain2.pem"
    from firmware_sim.ca import chain_pem

    path.write_bytes(chain_pem(factory_ca.sign_csr(device.csr())))
    device.run("install-chain", str(path))
    assert os.readlink(device.state / "idevid" / "current").endswith("2")
    return device


def test_a_deleted_current_generation_is_named_and_left_alone(
    two_generations,
):
    device = two_generations
    shutil.rmtree(device.state / "idevid" / "generations" / "0002")
    before = device.snapshot()
    diagnosis = (
        "factory: current pointer broken: it leads to generations/0002, "
        "which is gone"
    )
    assert f"PROBLEM:         {diagnosis}" in (
        device.run("status", check=False).out
    )
    for verb in (["connect"], ["keygen"], ["keygen", "--force"], ["csr"]):
        line = one_line_error(device.run(*verb, check=False))
        assert line == f"error: {diagnosis}", verb
        assert device.snapshot() == before, verb


def test_status_counts_one_problem_in_the_singular(set_up, capsys):
    key = _key_file(set_up)
    key.write_bytes(b"garbage, not a key\n")
    code, _, err = run_here(set_up, capsys, "status")
    assert code == 6
    assert err.strip() == (
        "error: 1 problem stands in the credential's way (see above)"
    )


@pytest.mark.parametrize("verb", ["csr", "install-chain"])
def test_operational_verbs_without_a_key_name_the_identity_to_keygen(
    set_up, capsys, verb
):
    device = set_up
    args = [verb, "--identity", "operational"]
    if verb == "install-chain":
        args.insert(1, str(device.dir / "chain.pem"))
    code, _, err = run_here(device, capsys, *args)
    assert code != 0
    assert err.strip() == (
        "error: no key yet: run 'device-agent keygen --identity "
        "operational' first"
    )


def test_connect_refuses_a_tls_range_with_no_version_in_it(set_up, capsys):
    code, out, err = run_here(
        set_up, capsys, "--set", "tls_min_version=1.3",
        "connect", "--tls-max-version", "1.2",
    )  # fmt: skip
    assert code == 2
    (line,) = err.strip().splitlines()
    assert "tls_min_version" in line and "1.3" in line
    assert "--tls-max-version 1.2" in line
    assert "connected" not in out


@pytest.mark.parametrize(
    ("version", "said"),
    [("5", "published to"), ("3.1.1", "sent to")],
)
def test_connect_publish_says_what_the_protocol_confirms(
    device, broker_factory, version, said
):
    broker = broker_factory()
    topic = f"devices/{device.id}/x"
    result = device.run(
        "--set", f"broker_port={broker.port}",
        "--set", f"mqtt_version={version}",
        "connect", "--publish", topic, "hello",
    )  # fmt: skip
    assert f"{said} {topic}" in result.out
    assert ("do not report a refused publish" in result.out) == (
        version == "3.1.1"
    )


def test_keygen_force_after_a_cut_short_commit_keeps_the_current_key(
    set_up, capsys
):
    device = set_up
    lineage = device.state / "idevid"
    (lineage / "pending").symlink_to("generations/0001")
    code, out, err = run_here(device, capsys, "keygen", "--force")
    assert code == 0, err
    assert "key 2 made" in out
    assert os.readlink(lineage / "current") == "generations/0001"
    assert os.readlink(lineage / "pending") == "generations/0002"
    assert (lineage / "generations" / "0001" / "chain.pem").is_file()


@pytest.mark.parametrize("damage", ["emptied", "swapped"])
def test_a_key_that_cannot_present_its_certificate_is_passed_over(
    set_up, tmp_path, caplog, damage
):
    """connect and status agree: the operational identity is skipped,
    the factory one is an error; OpenSSL's words never reach the user."""
    from device_agent import credential
    from device_agent.errors import StoreError

    device = set_up
    _operational_copy(device)
    other = _private_key_pem(tmp_path).read_bytes()

    def damage_key(lineage: str) -> Path:
        (key,) = (device.state / lineage / "current").glob("key.*")
        before = key.read_bytes()
        key.write_bytes(b"" if damage == "emptied" else other)
        assert key.read_bytes() != before
        return key

    why = "key unreadable" if damage == "emptied" else "is not the key of"
    settings = load(device.config, {})
    damage_key("ldevid")
    assert credential.best_credential(settings)[0] == credential.FACTORY
    assert why in caplog.text
    report, result = status_json(device)
    assert result.returncode == 0, result.err
    assert any(
        p.startswith("operational: ") and why in p
        for p in problems(report, "warning")
    ), report["problems"]

    damage_key("idevid")
    with pytest.raises(StoreError, match=why):
        credential.best_credential(settings)
    result = device.run("connect", check=False)
    assert result.returncode != 0 and "Traceback" not in result.err
    line = result.err.strip().splitlines()[-1]  # after the warning
    assert line.startswith("error: factory: ") and why in line, line
    assert "pem lib" not in line and "mismatch" not in line
    report, result = status_json(device)
    assert result.returncode != 0
    assert any(
        p.startswith("factory: ") and why in p for p in problems(report)
    ), report["problems"]


def test_a_broker_we_do_not_trust_is_no_refusal_of_our_credential(
    tmp_path, registrar_world
):
    """A wrong ca_file (or a broker in the middle) is our trust failing:
    the agent keeps trying at its usual pace and never asks for service
    as if revoked."""
    from firmware_sim.ca import CertificateAuthority

    world = registrar_world
    world.start_registrar(lifetime=300)
    device = bring_up(tmp_path, world, None)
    other = CertificateAuthority.create(tmp_path / "other-ca", name="Other")
    agent = device.start("--set", f"ca_file={other.root_path}")
    try:
        wait_for(
            lambda: (
                "broker certificate refused"
                in ((status(device)["agent"] or {}).get("last_result") or "")
            ),
            20,
            "the refused broker",
        )
        time.sleep(6)  # several rounds of every credential at 1-2 s
        state = status(device)["agent"]
    finally:
        out = stop(agent)
    assert state["state"] != "needs_service", state
    assert "needs service" not in out
    assert "broker untrusted: broker certificate refused" in out


def test_key_store_tpm_moves_a_software_device_into_the_tpm(device, swtpm):
    """Told to use the TPM, the next key is made there; never the reverse."""
    tpm = ["--set", "key_store=tpm", "--set", f"tcti={swtpm.tcti}"]
    report, _ = status_json(device, *tpm)
    assert any(
        "the next key is made in the TPM" in p
        for p in problems(report, "warning")
    ), report["problems"]
    made = device.run(*tpm, "keygen", "--force")
    assert "made in the TPM" in made.out, made.out + made.err
    (key,) = (device.state / "idevid" / "pending").glob("key.*")
    assert key.name.endswith(".tss2.pem")

    # Once a key is in the TPM, no setting brings new ones out of it.
    for store in ("software", "auto"):
        made = device.run(
            "--set", f"key_store={store}", "--set", f"tcti={swtpm.tcti}",
            "keygen", "--force",
        )  # fmt: skip
        assert "made in the TPM" in made.out, made.out + made.err


def test_control_characters_in_a_path_never_reach_the_terminal(device):
    """Error lines, log lines and status escape them, as Python does."""
    hostile = "/tmp/\x1b]0;pwned\x07\x01"
    result = device.run("install-chain", f"{hostile}.pem", check=False)
    line = one_line_error(result)
    assert "\\x1b]0;pwned\\x07\\x01" in line, line
    result = device.run(
        "--set", f"state_dir={hostile}", "status", check=False
    )  # fmt: skip
    assert "\x1b" not in result.out + result.err
    assert "\x07" not in result.out + result.err
    assert "\\x1b]0;pwned" in result.out + result.err


def test_log_lines_escape_control_characters_one_record_a_line():
    """The formatter all three CLIs log through."""
    import logging

    from device_agent.cli.edge import PrintableFormatter

    record = logging.LogRecord(
        "x", logging.WARNING, __file__, 1, "file %s", ("a\x1b[2Jb\nc",), None
    )
    line = PrintableFormatter("%(levelname)s %(message)s").format(record)
    assert line == "WARNING file a\\x1b[2Jb\\nc"
