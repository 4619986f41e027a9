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
    ids = [
        x509.load_pem_x509_certificate(
            (p / "state/idevid/current/chain.pem").read_bytes()
        ).subject.rfc4514_string()
        for p in sorted((tmp_path / "line" / "devices").iterdir())
    ]
    assert len(ids) == 2
