"""``firmware-sim factory``: manufacture simulated devices on a line."""

from __future__ import annotations

import logging
import shutil
from functools import partial
from pathlib import Path

import click

from firmware_sim import lock
from firmware_sim.ca import CertificateAuthority
from firmware_sim.cli_registrar import shorten
from firmware_sim.device import SOFTWARE, TPM, SimDevice
from firmware_sim.factory import FactoryError, FactoryLine, ek_ca_config
from firmware_sim.params import directory_option
from firmware_sim.registry import SERIAL, SERIAL_RULE, device_id_problem

logger = logging.getLogger(__name__)

CA_DIR = "factory-ca"
DB_FILE = "factory.sqlite"
EK_CA_DIR = "ek-ca"
DEVICES_DIR = "devices"
# In --dir: held by the run that uses the line; a second is refused.
LOCK_FILE = ".factory.lock"


@click.command()
@directory_option(
    "--dir",
    "directory",
    default="factory",
    help="The line: its CA, records and the devices it made.",
)
@click.option(
    "--count", type=click.IntRange(1, 10000), default=1, show_default=True
)
@click.option("--prefix", default="sim", show_default=True, help="Id prefix.")
@click.option(
    "--serial-base",
    default="SN",
    show_default=True,
    help="Hardware serials are BASE-0001, BASE-0002, ...",
)
@click.option(
    "--software-keys",
    is_flag=True,
    help="Devices without a TPM: software keys, NOT hardware-protected.",
)
@click.option(
    "--ek/--no-ek",
    default=True,
    show_default=True,
    help="Give each TPM an EK certificate (swtpm_setup).",
)
def factory(
    directory: Path,
    count: int,
    prefix: str,
    serial_base: str,
    software_keys: bool,
    ek: bool,
) -> None:
    """Manufacture devices: key on the device, CSR out, IDevID in.

    Refuses a device serial or a public key the line has seen before,
    and an id the line made with another serial, before writing
    anything. Re-running a batch keeps the devices already made
    ("kept ...") and makes the rest, so an interrupted run resumes.
    One run at a time may use a line: a second is refused.
    """
    _check_prefix(prefix, count)
    _check_serial_base(serial_base, count)
    directory = directory.absolute()
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    # Two runs on one line would make its CA twice and race for each
    # device's key; the second is refused before it touches anything.
    with lock.hold(directory / LOCK_FILE, partial(_in_use, directory)):
        _make_batch(directory, prefix, serial_base, count, software_keys, ek)


def _in_use(directory: Path, pid: int | None) -> FactoryError:
    holder = f" (pid {pid})" if pid is not None else ""
    return FactoryError(
        f"{directory} is in use by another factory run{holder}"
    )


def _make_batch(
    directory: Path,
    prefix: str,
    serial_base: str,
    count: int,
    software_keys: bool,
    ek: bool,
) -> None:
    ca_dir = directory / CA_DIR
    if (ca_dir / "root.pem").exists():
        ca = CertificateAuthority.load(ca_dir)
    else:
        ca = CertificateAuthority.create(ca_dir)
    setup = ek_ca_config(directory / EK_CA_DIR) if ek else None
    key_store = SOFTWARE if software_keys else TPM

    with FactoryLine(ca, directory / DB_FILE) as line:
        for number in range(1, count + 1):
            device = SimDevice(
                directory / DEVICES_DIR / f"{prefix}-{number:04d}",
                f"{prefix}-{number:04d}",
                f"{serial_base}-{number:04d}",
                key_store,
            )
            if _make(line, device, ca, setup):
                click.echo(f"made {device.device_id} serial {device.serial}")
            else:
                click.echo(
                    f"kept {device.device_id} serial {device.serial}: "
                    "already made"
                )


def _check_prefix(prefix: str, count: int) -> None:
    """Refuse a prefix that makes ids no device may carry, up front.

    Found out while configuring the first device, it would leave a CA
    and records behind and the message would not say which option was
    wrong. The last id is the longest, so checking the first and the
    last covers the batch.
    """
    for device_id in _numbered(prefix, count):
        problem = device_id_problem(device_id)
        if problem is not None:
            raise click.UsageError(
                f"--prefix {shorten(prefix)} makes device ids such as "
                f"{shorten(device_id)}, which are not valid: {problem}"
            )


def _check_serial_base(base: str, count: int) -> None:
    """Refuse a serial base that makes serials the agent would refuse."""
    if not base:
        raise click.UsageError(
            "--serial-base must not be empty: serials are BASE-0001, "
            "BASE-0002 and so on"
        )
    for serial in _numbered(base, count):
        if not SERIAL.fullmatch(serial):
            raise click.UsageError(
                f"--serial-base {shorten(base)} makes serials such as "
                f"{shorten(serial)}, which are not valid: a serial is "
                f"{SERIAL_RULE}"
            )


def _numbered(base: str, count: int) -> list[str]:
    """The first and the last of ``count`` numbered names: the longest."""
    return [f"{base}-{number:04d}" for number in sorted({1, count})]


def _make(
    line: FactoryLine,
    device: SimDevice,
    ca: CertificateAuthority,
    setup: Path | None,
) -> bool:
    """Make ``device``; False when the line had already made it.

    Every check runs before anything is written for the device: a board
    the line made is never touched again, so re-running a batch (say
    after Ctrl-C) keeps what was made and makes the rest. A directory
    without a record is an interrupted build and is made again from
    scratch; a build that fails leaves no directory behind.
    """
    if line.completed(device) is not None:
        return False
    if device.directory.exists():
        logger.info("%s: unfinished, made again", device.device_id)
        shutil.rmtree(device.directory)
    try:
        device.manufacture_tpm(setup)
        if device.tpm is not None:
            device.start_tpm()
        device.configure("127.0.0.1", 8883, ca.root_path, ca.root_path)
        line.manufacture(device)
    except BaseException:
        device.stop_tpm()
        # Unless the line recorded it after all: a made board stays.
        if line.record_of(device.device_id) is None:
            shutil.rmtree(device.directory, ignore_errors=True)
        raise
    finally:
        device.stop_tpm()
    return True
