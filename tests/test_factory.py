"""The factory line certifies each device once, and never a copy."""

from __future__ import annotations

import shutil

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from device_agent import chain
from firmware_sim.device import SOFTWARE, TPM, SimDevice
from firmware_sim.factory import CloneError, FactoryLine, ek_ca_config


def make_device(tmp_path, name, serial, key_store=SOFTWARE):
    return SimDevice(tmp_path / name, name, serial, key_store)


def configure(device, factory_ca):
    device.configure(
        "127.0.0.1", 8883, factory_ca.root_path, factory_ca.root_path
    )


@pytest.fixture
def line(tmp_path, factory_ca):
    with FactoryLine(factory_ca, tmp_path / "factory.sqlite") as line:
        yield line


def test_tpm_device_is_certified_with_its_ek_recorded(
    tmp_path, factory_ca, line
):
    device = make_device(tmp_path, "sim-1", "SN-1", TPM)
    device.manufacture_tpm(ek_ca_config(tmp_path / "ek-ca"))
    device.start_tpm()
    try:
        configure(device, factory_ca)
        record = line.manufacture(device)
    finally:
        device.stop_tpm()

    leaf = device.leaf("idevid")
    assert leaf.serial_number == record.cert_serial
    key_file = next((device.state_dir / "idevid" / "current").glob("key*"))
    assert b"TSS2 PRIVATE KEY" in key_file.read_bytes()
    ek = device.ek_certificates()
    assert ek and record.ek_cert == ek[0].fingerprint(hashes.SHA256()).hex()
    assert line.records() == [record]
    chain.verify(
        [leaf, factory_ca.intermediate],
        [factory_ca.root],
        "sim-1",
    )


def test_software_device_has_no_ek_record(tmp_path, factory_ca, line):
    device = make_device(tmp_path, "sim-2", "SN-2")
    configure(device, factory_ca)
    record = line.manufacture(device)
    assert record.ek_cert is None
    assert record.key_store == SOFTWARE


def test_duplicate_serial_is_refused_before_any_key_is_made(
    tmp_path, factory_ca, line
):
    first = make_device(tmp_path, "sim-1", "SN-1")
    configure(first, factory_ca)
    line.manufacture(first)
    second = make_device(tmp_path, "sim-2", "SN-1")
    configure(second, factory_ca)

    with pytest.raises(CloneError, match="serial SN-1") as refused:
        line.manufacture(second)

    assert "\n" not in str(refused.value)
    assert not second.has_key()
    assert [r.device_id for r in line.records()] == ["sim-1"]
    assert line.refusals()[0][:2] == ("SN-1", "sim-2")


def test_refusal_names_which_of_serial_and_id_was_made_before(
    tmp_path, factory_ca, line
):
    for name, serial in (("sim-1", "SN-1"), ("sim-2", "SN-2")):
        made = make_device(tmp_path, name, serial)
        configure(made, factory_ca)
        line.manufacture(made)
    reasons = {
        ("other-1", "SN-1"): "device serial SN-1 was already manufactured "
        "(as sim-1)",
        ("sim-1", "SN-9"): "device id sim-1 was already manufactured (with "
        "serial SN-1)",
        ("sim-2", "SN-1"): "device serial SN-1 and id sim-2 were both "
        "already manufactured: the serial as sim-1, the id with serial SN-2",
        ("sim-1", "SN-1"): "device sim-1 with serial SN-1 was already "
        "manufactured",
    }

    for (name, serial), reason in reasons.items():
        device = make_device(tmp_path / "again", name, serial)
        with pytest.raises(CloneError) as refused:
            line.check_new(device)
        assert str(refused.value) == reason

    assert [r.device_id for r in line.records()] == ["sim-1", "sim-2"]


def test_copied_key_is_refused_as_a_clone(tmp_path, factory_ca, line):
    original = make_device(tmp_path, "sim-1", "SN-1")
    configure(original, factory_ca)
    line.manufacture(original)
    clone = make_device(tmp_path, "sim-9", "SN-9")
    configure(clone, factory_ca)
    shutil.copytree(
        original.state_dir / "idevid",
        clone.state_dir / "idevid",
        symlinks=True,
        dirs_exist_ok=True,
    )
    (clone.state_dir / "idevid" / "current").unlink()
    (clone.state_dir / "idevid" / "current").symlink_to("generations/0001")

    with pytest.raises(CloneError, match="already belongs to sim-1"):
        line.manufacture(clone)

    assert [r.device_id for r in line.records()] == ["sim-1"]
    assert "cloned key" in line.refusals()[-1][2]


def test_cli_factory_makes_devices_and_refuses_a_known_serial(tmp_path):
    from sim_cli import assert_refused, invoke

    args = [
        "factory",
        "--dir", str(tmp_path / "line"),
        "--software-keys",
        "--count", "2",
        "--prefix", "sim",
        "--serial-base", "SN-100",
    ]  # fmt: skip
    result = invoke(args)
    assert result.exit_code == 0, result.output
    assert result.output.count("made sim-") == 2

    again = invoke([*args[:-4], "--count", "1", "--prefix", "other",
                    "--serial-base", "SN-100"])  # fmt: skip
    assert_refused(again, "SN-100")
    assert "device serial SN-100-0001 was already manufactured (as " in (
        again.output
    )
    assert "other-0001" not in again.output
    ids = [
        x509.load_pem_x509_certificate(
            (p / "state/idevid/current/chain.pem").read_bytes()
        ).subject.rfc4514_string()
        for p in sorted((tmp_path / "line" / "devices").iterdir())
    ]
    assert len(ids) == 2


def factory_args(directory, count, prefix, base, *more):
    return [
        "factory", "--dir", str(directory), "--software-keys",
        "--count", str(count), "--prefix", prefix, "--serial-base", base,
        *more,
    ]  # fmt: skip


def test_cli_factory_relative_dir_gives_devices_absolute_paths(
    tmp_path, monkeypatch
):
    from sim_cli import invoke

    monkeypatch.chdir(tmp_path)
    result = invoke(factory_args("line", 1, "sim", "SN"))
    assert result.exit_code == 0, result.output
    device = SimDevice(tmp_path / "line/devices/sim-0001", "sim-0001", "SN")
    settings = device.settings()
    assert settings.ca_file.is_absolute() and settings.ca_file.is_file()
    assert device.leaf("idevid") is not None


def test_cli_factory_refusal_leaves_made_devices_untouched(tmp_path):
    from sim_cli import assert_refused, invoke, tree

    line = tmp_path / "line"
    assert invoke(factory_args(line, 2, "pi", "ACME")).exit_code == 0
    before = tree(line / "devices")

    refused = invoke(factory_args(line, 2, "pi", "BETA"))

    assert_refused(refused, "ACME-0001")
    assert tree(line / "devices") == before
    again = invoke(factory_args(line, 2, "pi", "ACME"))
    assert again.exit_code == 0, again.output
    assert again.output.count("kept pi-") == 2
    assert tree(line / "devices") == before


def test_cli_factory_resumes_an_interrupted_batch(tmp_path, monkeypatch):
    from sim_cli import invoke

    line = tmp_path / "line"
    real = SimDevice.install_chain

    def interrupted(self, pem, lineage="idevid"):
        if self.device_id == "pi-0002":
            raise KeyboardInterrupt
        return real(self, pem, lineage)

    monkeypatch.setattr(SimDevice, "install_chain", interrupted)
    assert invoke(factory_args(line, 3, "pi", "SN")).exit_code != 0
    assert not (line / "devices" / "pi-0002").exists()
    # A half-made board from a harder stop: a directory, no record.
    (line / "devices" / "pi-0002" / "state").mkdir(parents=True)
    monkeypatch.setattr(SimDevice, "install_chain", real)

    result = invoke(factory_args(line, 3, "pi", "SN"))

    assert result.exit_code == 0, result.output
    assert "kept pi-0001" in result.output
    assert "made pi-0002" in result.output and "made pi-0003" in result.output
    for name in ("pi-0001", "pi-0002", "pi-0003"):
        device = SimDevice(line / "devices" / name, name, "x")
        assert device.leaf("idevid") is not None


def test_cli_factory_refuses_a_bad_prefix_before_writing(tmp_path):
    from sim_cli import assert_refused, invoke

    # The last case fits for the first id, not for the ten-thousandth.
    for prefix, count in (("a/b", 1), ("é", 1), ("a" * 70, 1),
                          ("a" * 59, 10000)):  # fmt: skip
        result = invoke([
            "factory", "--dir", str(tmp_path / "line"), "--prefix", prefix,
            "--count", str(count), "--software-keys",
        ])  # fmt: skip
        assert_refused(result, "--prefix")
        assert not (tmp_path / "line").exists()


def test_cli_factory_names_the_prefix_and_the_ids_it_would_make(tmp_path):
    from sim_cli import assert_refused, invoke

    result = invoke(factory_args(tmp_path / "line", 1, "bad id!", "SN"))

    assert_refused(
        result,
        "--prefix 'bad id!' makes device ids such as 'bad id!-0001', which "
        "are not valid: a device id is 1 to 64 letters",
    )
    assert result.exit_code == 2
    assert not (tmp_path / "line").exists()


@pytest.mark.parametrize(
    ("base", "count", "named"),
    [
        ("", 1, "--serial-base must not be empty"),
        (" ", 1, "--serial-base ' ' makes serials such as ' -0001'"),
        ("S N", 1, "--serial-base 'S N' makes serials such as 'S N-0001'"),
        ("SN\u00e9", 1, "which are not valid: a serial is 1 to 64"),
        # Fits for the first serial, not for the ten-thousandth.
        ("S" * 59, 10000, "(65 characters), which are not valid"),
    ],
    ids=["empty", "blank", "space", "not ascii", "too long at the end"],
)
def test_cli_factory_refuses_a_bad_serial_base_before_writing(
    tmp_path, base, count, named
):
    from sim_cli import assert_refused, invoke

    result = invoke(factory_args(tmp_path / "line", count, "dev", base))

    assert_refused(result, named)
    assert result.exit_code == 2
    assert not (tmp_path / "line").exists()


def test_cli_factory_refuses_a_second_run_on_a_line_in_use(tmp_path):
    """One run at a time per line; the second names the first's pid."""
    import subprocess
    import sys
    import time

    from sim_cli import assert_refused, invoke

    from firmware_sim.cli_factory import LOCK_FILE

    line = tmp_path / "line"
    first = subprocess.Popen(
        [sys.executable, "-m", "firmware_sim",
         *factory_args(line, 30, "par", "SN")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        lock = line / LOCK_FILE
        while not (lock.exists() and lock.read_text().strip()):
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.02)

        second = invoke(factory_args(line, 30, "par", "SN"))
        running = first.poll() is None
    finally:
        out, err = first.communicate(timeout=120)

    assert running, "the first run ended before the second started"
    assert_refused(
        second, f"{line} is in use by another factory run (pid {first.pid})"
    )
    assert first.returncode == 0, err
    assert out.count("made par-") == 30
    again = invoke(factory_args(line, 30, "par", "SN"))
    assert again.exit_code == 0, again.output
    assert again.output.count("kept par-") == 30
