"""Cutting a device off: registry status, revoked certificates, CRLs.

Revoking a device (compromised, stolen) makes the registrar refuse it
and revokes every operational certificate (LDevID) the registrar ever
issued to it. Its factory certificate (IDevID) stays valid, so the
device can still reach the broker, learn from the registrar that it is
revoked and report that it needs service. Decommissioning (retired from
service) does the same and also revokes the IDevID.

The registry does not know a device's IDevID serial, so the caller
names it; without it a decommissioned device keeps a valid IDevID.
"""

from __future__ import annotations

import datetime
import logging
import os
import signal
from collections.abc import Iterable
from pathlib import Path

from firmware_sim.ca import CertificateAuthority, write_files
from firmware_sim.errors import SimError
from firmware_sim.registry import DECOMMISSIONED, REVOKED, Registry

logger = logging.getLogger(__name__)

OUT_OF_SERVICE = (REVOKED, DECOMMISSIONED)
CRL_NEXT_UPDATE = datetime.timedelta(days=1)


class RevocationError(SimError):
    """A device cannot be revoked as asked, or its CRL not published."""


def revoke_device(
    registry: Registry,
    operational_ca: CertificateAuthority,
    device_id: str,
    factory_ca: CertificateAuthority | None = None,
    status: str = REVOKED,
    *,
    idevid_serials: Iterable[int] = (),
) -> list[int]:
    """Put a device out of service; return the serials newly revoked.

    The status changes first, so the registrar issues nothing more;
    then every certificate the registry says was issued to the device
    is recorded as revoked in ``operational_ca``. ``idevid_serials``
    go to ``factory_ca`` only when ``status`` is decommissioned. Running
    it again revokes what a crash in between left out.

    :raises RevocationError: for an unknown status, or IDevID serials
        that would be ignored.
    :raises UnknownDeviceError: the device is not in the registry.
    """
    factory_serials = list(idevid_serials)
    _check_request(status, factory_ca, factory_serials)

    registry.set_status(device_id, status)
    # The registry records no issuance for a device out of service, so
    # this list cannot miss one that a registrar signed meanwhile.
    issued = [i.cert_serial for i in registry.issuances(device_id)]

    revoked = operational_ca.revoke(issued)
    if factory_ca is not None and factory_serials:
        revoked += factory_ca.revoke(factory_serials)

    logger.info(
        "device %s %s: %d certificates newly revoked",
        device_id,
        status,
        len(revoked),
    )
    return revoked


def _check_request(
    status: str,
    factory_ca: CertificateAuthority | None,
    factory_serials: list[int],
) -> None:
    if status not in OUT_OF_SERVICE:
        raise RevocationError(
            f"status {status!r} is not one of {', '.join(OUT_OF_SERVICE)}"
        )
    if factory_serials and status != DECOMMISSIONED:
        raise RevocationError(
            "only decommissioning revokes the IDevID; a revoked device "
            "keeps it to report that it needs service"
        )
    if factory_serials and factory_ca is None:
        raise RevocationError("revoking an IDevID needs the factory CA")


def combined_crl(
    factory_ca: CertificateAuthority,
    operational_ca: CertificateAuthority,
    next_update: datetime.timedelta = CRL_NEXT_UPDATE,
) -> bytes:
    """Both intermediates' CRLs, with every recorded revocation, as PEM.

    With a crlfile, mosquitto refuses every certificate whose issuer
    has no CRL in it, so the file holds one of each intermediate.
    """
    return b"".join(crls(factory_ca, operational_ca, next_update=next_update))


def crls(
    *cas: CertificateAuthority,
    next_update: datetime.timedelta = CRL_NEXT_UPDATE,
) -> list[bytes]:
    """Each CA's CRL, with its recorded revocations, in the order given."""
    return [ca.recorded_crl(next_update) for ca in cas]


def write_crl(path: Path, crl: bytes) -> None:
    """Replace the CRL file at ``path`` whole, keeping its group.

    mosquitto may read the file through its group, so a replacement
    made by root keeps the group of the file it replaces.
    """
    group = None
    if os.geteuid() == 0 and path.exists():
        group = path.stat().st_gid
    write_files([(path, crl, 0o644)], replace=True, group=group)
    logger.info("CRL written to %s", path)


def signal_reload(pid: int) -> None:
    """Make the mosquitto with ``pid`` read its CRL file again (SIGHUP)."""
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise RevocationError(f"no process {pid} to reload") from None
    except PermissionError:
        raise RevocationError(f"not allowed to signal process {pid}") from None
    logger.info("sent SIGHUP to broker pid %d", pid)
