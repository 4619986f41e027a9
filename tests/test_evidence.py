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


def test_evidence_reads_records_without_changing_them(fresh):
    database = fresh / "factory.sqlite"
    for extra in fresh.glob("factory.sqlite-*"):
        extra.unlink()
    database.write_bytes(b"")

    found = by_name(evidence.assess(fresh))

    assert database.read_bytes() == b""
    identity = found["unique identity per device"]
    assert identity.verdict == "not run", identity.check
    assert "holds no factory records" in identity.check


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
