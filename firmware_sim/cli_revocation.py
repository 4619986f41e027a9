"""``firmware-sim revoke``, ``decommission`` and ``crl-check``.

The same work as the registrar group's commands, with the factory
line's records at hand: decommissioning looks the device's IDevID up
there, so that its factory certificate is revoked too. Revoking needs
no records, only the factory CA for the broker's CRL.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from firmware_sim.ca import ROOT_CERT, CertificateAuthority
from firmware_sim.cli_factory import CA_DIR, DB_FILE
from firmware_sim.cli_registrar import put_out_of_service
from firmware_sim.errors import SimError
from firmware_sim.factory import FactoryLine
from firmware_sim.params import directory_option
from firmware_sim.registry import DECOMMISSIONED, REVOKED
from firmware_sim.revocation import check_crl_file

logger = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])

# crl-check's status when a CRL is close to its nextUpdate; one that
# has passed it exits 1, as RevocationError does.
EXPIRES_SOON_EXIT = 3

_REGISTRAR_DIR = directory_option(
    "--registrar-dir",
    default="registrar",
    help="Directory of the operational CA and registry.",
    envvar="FIRMWARE_SIM_REGISTRAR_DIR",
)
_FACTORY_DIR = directory_option(
    "--factory-dir",
    default="factory",
    help="The factory line (firmware-sim factory --dir), or for revoke "
    "the factory CA alone (firmware-sim ca init --dir).",
)
_CRL_OUT = click.option(
    "--crl-out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The broker's crlfile, replaced with the new CRLs; a file that "
    "holds anything but CRLs is left alone.",
)
_CRL_DAYS = click.option(
    "--crl-days", type=click.IntRange(1, 365), default=1, show_default=True
)
_BROKER_PID = click.option(
    "--broker-pid",
    type=click.IntRange(1),
    help="Send this mosquitto SIGHUP so that it reads the new CRL; "
    "refused unless the process is mosquitto.",
)


def _out_of_service_options(command: _F) -> _F:
    """What revoke and decommission both take, in this order."""
    for option in reversed(
        (
            click.argument("device_id"),
            _REGISTRAR_DIR,
            _FACTORY_DIR,
            _CRL_OUT,
            _CRL_DAYS,
            _BROKER_PID,
        )
    ):
        command = option(command)
    return command


def _finite(ctx: click.Context, param: click.Parameter, value: float) -> float:
    """Click callback: a number of seconds, not nan or infinity."""
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds")
    return value


@click.command()
@_out_of_service_options
def revoke(
    device_id: str,
    registrar_dir: Path,
    factory_dir: Path,
    crl_out: Path,
    crl_days: int,
    broker_pid: int | None,
) -> None:
    """Cut a compromised device off: its operational certificates go.

    Its IDevID stays, so it can still reach the registrar and learn that
    it needs service. The factory line's records are not needed: a
    world made by hand with 'ca init' works too.
    """
    put_out_of_service(
        device_id,
        REVOKED,
        registrar_dir,
        _factory_ca_dir(factory_dir),
        (),
        crl_out,
        crl_days,
        broker_pid,
    )


@click.command()
@_out_of_service_options
def decommission(
    device_id: str,
    registrar_dir: Path,
    factory_dir: Path,
    crl_out: Path,
    crl_days: int,
    broker_pid: int | None,
) -> None:
    """Retire a device: every certificate it holds is revoked, IDevID too.

    Its IDevID serial comes from the factory line's records. Without
    them, name the serial: 'firmware-sim registrar decommission DEVICE
    --factory-ca CA --idevid-serial HEX --crl-out CRL'.
    """
    idevid = _factory_record(factory_dir, device_id)
    put_out_of_service(
        device_id,
        DECOMMISSIONED,
        registrar_dir,
        factory_dir / CA_DIR,
        (idevid,),
        crl_out,
        crl_days,
        broker_pid,
    )


@click.command("crl-check")
# Any path: a missing or unreadable file is status 4, which monitoring
# tells apart from a usage mistake (2).
@click.argument("crl_file", type=click.Path(path_type=Path))
@click.option(
    "--warn-seconds",
    type=click.FloatRange(0),
    callback=_finite,
    default=3600.0,
    show_default=True,
    help="Warn about a CRL that expires sooner than this.",
)
def crl_check(crl_file: Path, warn_seconds: float) -> None:
    """Fail loudly if a CRL in the broker's crlfile is past nextUpdate.

    A broker with an expired CRL refuses every new connection of that
    issuer's devices; run this from monitoring.

    \b
    Exit status:
      0  every CRL is current
      1  a CRL has expired, or is not yet valid (thisUpdate to come)
      2  the command was used wrongly
      3  a CRL expires within --warn-seconds (a warning names it)
      4  the file cannot be read, holds no CRL, or one of its CRLs is
         unreadable
    """
    warnings = check_crl_file(crl_file, warn_seconds)
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    if warnings:
        # Its own status, so that monitoring can page on the warning
        # and tell it from an expired CRL.
        sys.exit(EXPIRES_SOON_EXIT)
    click.echo(f"{crl_file}: every CRL is current")


def _factory_ca_dir(factory_dir: Path) -> Path:
    """The factory CA of a line's directory, or the directory itself.

    A world set up by hand holds the CA that 'ca init' made, without a
    line around it.
    """
    line_ca = factory_dir / CA_DIR
    if not line_ca.exists() and (factory_dir / ROOT_CERT).exists():
        return factory_dir
    return line_ca


def _factory_record(factory_dir: Path, device_id: str) -> int:
    """The IDevID serial the line issued to ``device_id``."""
    database = factory_dir / DB_FILE
    if not database.is_file():
        raise SimError(
            f"{database}: no factory records to find the IDevID serial of "
            f"{device_id} in; name it instead: firmware-sim registrar "
            f"decommission {device_id} --factory-ca CA_DIR --idevid-serial "
            "HEX --crl-out CRL"
        )
    ca = CertificateAuthority.load(factory_dir / CA_DIR)
    with FactoryLine(ca, database) as line:
        record = line.record_of(device_id)
    if record is None:
        raise SimError(f"device {device_id!r} was not made on this line")
    return record.cert_serial
