"""CRA evidence names the devices that fail each requirement."""

from __future__ import annotations

import json
import shutil

import pytest
from sim_cli import assert_refused, invoke

from firmware_sim import evidence


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """Three TPM devices from the factory line; each test gets a copy."""
    directory = tmp_path_factory.mktemp("line")
    result = invoke([
        "factory", "--dir", str(directory), "--count", "3", "--no-ek",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    return directory


@pytest.fixture
def fresh(line, tmp_path):
    copy = tmp_path / "line"
    shutil.copytree(line, copy, symlinks=True)
    return copy


def key_file(directory, name):
    generation = directory / "devices" / name / "state/idevid/current"
    return next(generation.resolve().glob("key.*"))


def by_name(requirements):
    return {r.name: r for r in requirements}


def test_clean_tpm_line_meets_every_requirement_it_can_check(fresh):
    found = by_name(evidence.assess(fresh))

    for name in (
        "unique identity per device",
        "no default or shared credential",
        "private key never exported",
        "secure reset",
    ):
        assert found[name].met, found[name].failures
        assert found[name].checked == 3
    assert found["rotation"].check.startswith("not run")


def test_key_readable_by_others_is_flagged(fresh):
    key_file(fresh, "sim-0002").chmod(0o644)

    found = by_name(evidence.assess(fresh))

    failures = found["private key never exported"].failures
    assert list(failures) == ["sim-0002"]
    assert "readable by others" in failures["sim-0002"]
    assert found["no default or shared credential"].met


def test_shared_key_is_flagged_on_both_devices(fresh):
    original = key_file(fresh, "sim-0001")
    copy = key_file(fresh, "sim-0003")
    copy.write_bytes(original.read_bytes())

    requirements = evidence.assess(fresh)
    found = by_name(requirements)

    failures = found["no default or shared credential"].failures
    assert set(failures) == {"sim-0001", "sim-0003"}
    assert "sim-0003" in failures["sim-0001"]
    assert evidence.failing_devices(requirements) == {
        "sim-0001": ["no default or shared credential"],
        "sim-0003": ["no default or shared credential"],
    }


def test_cli_writes_evidence_and_fails_naming_the_device(fresh):
    key_file(fresh, "sim-0003").chmod(0o640)

    result = invoke(["evidence", str(fresh)])

    assert result.exit_code == 1
    assert "NOT MET: private key never exported" in result.output
    assert "not run: rotation" in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: 1 device(s) fail") and "sim-0003" in last
    data = json.loads((fresh / "evidence.json").read_text())
    assert data["failing_devices"] == {
        "sim-0003": ["private key never exported"]
    }
    assert "sim-0003" in (fresh / "evidence.md").read_text()


def test_cli_refuses_a_directory_that_is_neither_run_nor_line(tmp_path):
    assert_refused(invoke(["evidence", str(tmp_path)]), str(tmp_path))


def test_config_serial_that_disagrees_with_the_idevid_is_flagged(fresh):
    config = fresh / "devices" / "sim-0002" / "agent.toml"
    config.write_text(config.read_text().replace('"SN-0002"', '"BETA-0002"'))

    found = by_name(evidence.assess(fresh))

    failures = found["unique identity per device"].failures
    assert list(failures) == ["sim-0002"]
    assert "config BETA-0002" in failures["sim-0002"]


def test_tpm_set_up_again_is_flagged(tmp_path):
    line = tmp_path / "line"
    made = invoke(["factory", "--dir", str(line), "--count", "1"])
    assert made.exit_code == 0, made.output
    assert by_name(evidence.assess(line))["unique identity per device"].met
    ek = sorted((line / "devices" / "sim-0001" / "ek").glob("*.crt"))[0]
    ek.write_bytes(ek.read_bytes() + b"\0")

    found = by_name(evidence.assess(line))

    failures = found["unique identity per device"].failures
    assert "EK certificate changed" in failures["sim-0001"]


def test_line_revocation_is_not_run_and_nothing_checked_is_not_met(fresh):
    found = by_name(evidence.assess(fresh))

    assert found["revocation"].verdict == "not run"
    nothing = evidence.Requirement("x", "how", "check")
    assert nothing.verdict == "not demonstrated in this run"
    nothing.checked = 1
    assert nothing.verdict == "met"


@pytest.mark.parametrize("content", [b"", b"not sqlite"])
def test_evidence_fails_on_records_it_cannot_read_and_keeps_them(
    fresh, content
):
    """Unreadable records judge nothing: an error naming the file."""
    database = fresh / "factory.sqlite"
    for extra in fresh.glob("factory.sqlite-*"):
        extra.unlink()
    database.write_bytes(content)

    result = invoke(["evidence", str(fresh)])

    assert_refused(result, str(database))
    assert database.read_bytes() == content
    assert not (fresh / "evidence.json").exists()


@pytest.fixture
def run_with_registry(line, tmp_path):
    """A fleet run's layout around a copy of the line, with a registry."""
    from firmware_sim import registrar
    from firmware_sim.registry import Registry

    run = tmp_path / "run"
    shutil.copytree(line / "devices", run / "devices", symlinks=True)
    shutil.copytree(line / "factory-ca", run / "world" / "factory-ca")
    shutil.copy(line / "factory.sqlite", run / "world" / "factory.sqlite")
    layout = registrar.prepare(run / "world" / "registrar")
    with Registry(layout.registry_path) as registry:
        for number in (1, 2, 3):
            registry.add(f"sim-000{number}")
    return run, layout


def test_a_registered_device_missing_on_disk_fails(run_with_registry):
    from firmware_sim.registry import Registry

    run, layout = run_with_registry
    with Registry(layout.registry_path) as registry:
        registry.add("sim-0009")

    result = invoke(["evidence", str(run)])

    assert result.exit_code == 1, result.output
    assert "NOT MET: every recorded device present" in result.output
    assert "sim-0009: on the registrar records, but absent" in result.output


def test_evidence_fails_on_a_registry_it_cannot_read(run_with_registry):
    run, layout = run_with_registry
    for extra in layout.directory.glob("registry.sqlite-*"):
        extra.unlink()
    layout.registry_path.write_bytes(b"not sqlite")

    result = invoke(["evidence", str(run)])

    assert_refused(result, str(layout.registry_path))
    assert layout.registry_path.read_bytes() == b"not sqlite"


@pytest.mark.parametrize("removed", ["device", "state"])
def test_a_device_on_the_factory_records_missing_on_disk_fails(fresh, removed):
    device = fresh / "devices" / "sim-0002"
    shutil.rmtree(device if removed == "device" else device / "state")

    result = invoke(["evidence", str(fresh)])

    assert result.exit_code == 1, result.output
    why = "its state directory is gone" if removed == "state" else "absent"
    assert (
        f"NOT MET: every recorded device present (3 devices checked, 1 "
        f"fail; first sim-0002: on the factory records, but {why}"
    ) in result.output
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("error: 1 device(s) fail") and "sim-0002" in last


def test_a_software_key_is_flagged_saying_why(tmp_path):
    """A reader learns why from the line itself: the key can be copied."""
    line = tmp_path / "line"
    made = invoke([
        "factory", "--dir", str(line), "--count", "1", "--software-keys",
    ])  # fmt: skip
    assert made.exit_code == 0, made.output

    result = invoke(["evidence", str(line)])

    assert result.exit_code == 1
    assert (
        "NOT MET: private key never exported (1 devices checked, 1 fail; "
        "first sim-0001: key.pkcs8.pem of idevid is in a software key "
        "store: not hardware-protected, the key can be copied)"
    ) in result.output


def test_secure_reset_on_a_line_is_not_demonstrated(fresh):
    reset = by_name(evidence.assess(fresh))["secure reset"]

    assert reset.met and reset.checked == 3
    assert reset.verdict == "not demonstrated in this run"


def test_cli_says_what_a_run_could_not_show_and_what_it_checked(fresh):
    result = invoke(["evidence", str(fresh)])

    assert result.exit_code == 0, result.output
    assert (
        "not demonstrated in this run: secure reset (no device held an "
        "operational identity to reset; the rest of its check held on 3 "
        "devices)\n"
    ) in result.output
    assert "met: private key never exported (3 devices checked)\n" in (
        result.output
    )
    nothing = evidence.Requirement("x", "how", "check", lacking="no y")
    assert nothing.summary == "not demonstrated in this run: x (no y)"
