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

import dataclasses
import datetime
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from cryptography import x509

from firmware_sim.ca import CertificateAuthority, write_files
from firmware_sim.errors import SimError
from firmware_sim.registry import DECOMMISSIONED, REVOKED, Registry

logger = logging.getLogger(__name__)

OUT_OF_SERVICE = (REVOKED, DECOMMISSIONED)
CRL_NEXT_UPDATE = datetime.timedelta(days=1)


class RevocationError(SimError):
    """A device cannot be revoked as asked, or its CRL not published."""


class UnreadableCrlError(RevocationError):
    """A crlfile, or one block of it, is not a CRL that can be read.

    Its own exit status tells monitoring a broken file apart from an
    expired CRL: the fix is a different one.
    """

    exit_code = 4


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
    it again revokes what a crash in between left out, and keeps the
    time the status changed.

    :raises RevocationError: for an unknown status, IDevID serials
        that would be ignored, or a decommissioned device asked to be
        merely revoked (nothing changes).
    :raises CAError: an IDevID serial the factory CA never issued
        (nothing changes).
    :raises UnknownDeviceError: the device is not in the registry.
    """
    factory_serials = list(idevid_serials)
    _check_request(status, factory_ca, factory_serials)
    if factory_ca is not None:
        # Before the status changes: a mistyped serial leaves the
        # device as it was.
        factory_ca.check_issued(factory_serials)
    current = registry.get(device_id)
    if (
        current is not None
        and current.status == DECOMMISSIONED
        and status != DECOMMISSIONED
    ):
        # Decommissioning also revoked the IDevID: marking the device
        # merely revoked would claim it can still report for service.
        raise RevocationError(
            f"device {device_id!r} is already decommissioned; revoking "
            "it would weaken that"
        )

    if current is None or current.status != status:
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


def check_broker_pid(pid: int) -> None:
    """Refuse a ``pid`` that is not a running mosquitto.

    SIGHUP ends most programs: a mistyped pid must not kill one.
    """
    try:
        name = Path(f"/proc/{pid}/comm").read_text().strip()
    except FileNotFoundError:
        raise RevocationError(f"no process {pid} to reload") from None
    except OSError as exc:
        raise RevocationError(
            f"process {pid}: {exc.strerror or exc}"
        ) from None
    if name != "mosquitto":
        raise RevocationError(
            f"process {pid} is {name!r}, not mosquitto: not signalled"
        )


def signal_reload(pid: int) -> None:
    """Make the mosquitto with ``pid`` read its CRL file again (SIGHUP)."""
    check_broker_pid(pid)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise RevocationError(f"no process {pid} to reload") from None
    except PermissionError:
        raise RevocationError(f"not allowed to signal process {pid}") from None
    logger.info("sent SIGHUP to broker pid %d", pid)


# A CRL is re-issued when this share of its lifetime has passed, so one
# missed re-issue still leaves half a lifetime to notice and fix it.
REFRESH_FRACTION = 0.5


# OpenSSL, and so mosquitto, holds a CRL not yet valid until its
# thisUpdate; clocks a little apart should not make that a problem.
CLOCK_SKEW = datetime.timedelta(minutes=5)


@dataclasses.dataclass(frozen=True)
class CrlState:
    """One CRL in a crlfile: whose it is and how long it still holds."""

    issuer: str
    next_update: datetime.datetime
    revoked: int
    this_update: datetime.datetime | None = None

    def remaining(self, now: datetime.datetime) -> float:
        return (self.next_update - now).total_seconds()

    def not_yet_valid(self, now: datetime.datetime) -> bool:
        """Whether it starts later than ``now``, beyond the clock skew."""
        if self.this_update is None:
            return False
        return self.this_update > now + CLOCK_SKEW


def crl_states(data: bytes) -> list[CrlState]:
    """Every CRL in a PEM crlfile, in file order, or the one of a DER file.

    Data that is neither holds no CRL: the list is empty. A PEM block
    that is not a CRL raises UnreadableCrlError naming it.
    """
    states = []
    for crl in _load_crls(data):
        next_update = crl.next_update_utc
        if next_update is None:
            raise RevocationError(f"CRL of {crl.issuer} has no nextUpdate")
        states.append(
            CrlState(
                crl.issuer.rfc4514_string(),
                next_update,
                len(crl),
                crl.last_update_utc,
            )
        )
    return states


def _load_crls(data: bytes) -> list[x509.CertificateRevocationList]:
    if _CRL_END in data:
        blocks = data.split(_CRL_END)[:-1]
        return [
            _load_pem_block(block, number, len(blocks))
            for number, block in enumerate(blocks, start=1)
        ]
    try:
        return [x509.load_der_x509_crl(data)]
    except ValueError:
        return []


def _load_pem_block(
    block: bytes, number: int, count: int
) -> x509.CertificateRevocationList:
    try:
        return x509.load_pem_x509_crl(block.strip() + b"\n" + _CRL_END)
    except ValueError:
        # cryptography's reason is a parser's debug text; which block is
        # broken is what a person can act on.
        raise UnreadableCrlError(
            f"CRL {number} of {count} is not readable (its PEM block is "
            "damaged or holds no CRL)"
        ) from None


def check_crl_file(
    path: Path, warn_before: float, now: datetime.datetime | None = None
) -> list[str]:
    """Warnings for CRLs close to nextUpdate; RevocationError if one passed.

    OpenSSL, and so mosquitto, treats a CRL past its nextUpdate as a
    failed check: every new connection with a certificate of that
    issuer is refused (over TLS 1.2 with a certificate_expired alert),
    while sessions already open stay up. A CRL whose thisUpdate is
    still to come fails the same way. Nothing in the broker's log
    names the CRL, so this check is what makes it loud. A file that
    holds no readable CRL raises UnreadableCrlError.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        states = crl_states(path.read_bytes())
    except UnreadableCrlError as exc:
        raise UnreadableCrlError(f"{path}: {exc}") from None
    except OSError as exc:
        raise UnreadableCrlError(
            f"{path}: cannot be read ({exc.strerror or exc})"
        ) from None
    if not states:
        raise UnreadableCrlError(f"{path}: holds no CRL")
    warnings = []
    for state in states:
        if state.not_yet_valid(now):
            assert state.this_update is not None
            raise RevocationError(
                f"CRL of {state.issuer} in {path} is not yet valid: its "
                f"thisUpdate is {state.this_update:%Y-%m-%d %H:%M:%S}Z; "
                "until then the broker refuses every device certificate "
                "that issuer signed"
            )
        left = state.remaining(now)
        if left <= 0:
            raise RevocationError(
                f"CRL of {state.issuer} in {path} expired at "
                f"{state.next_update:%Y-%m-%d %H:%M:%S}Z: the broker now "
                "refuses every device certificate that issuer signed"
            )
        if left < warn_before:
            warnings.append(
                f"CRL of {state.issuer} expires in {left:.0f} s "
                f"({state.next_update:%Y-%m-%d %H:%M:%S}Z)"
            )
    return warnings


class CrlPublisher:
    """Keeps a broker's crlfile fresh: re-issue at half its lifetime.

    :meth:`publish` writes both CAs' CRLs with every recorded
    revocation and calls ``reload`` (the broker re-reads the file);
    :meth:`start` does so again every ``lifetime * REFRESH_FRACTION``
    seconds in a thread, so a CRL never reaches its nextUpdate while
    the publisher runs.
    """

    def __init__(
        self,
        factory_ca: CertificateAuthority,
        operational_ca: CertificateAuthority,
        path: Path,
        reload: Callable[[], None],
        lifetime: datetime.timedelta = CRL_NEXT_UPDATE,
    ) -> None:
        self.factory_ca = factory_ca
        self.operational_ca = operational_ca
        self.path = Path(path)
        self.reload = reload
        self.lifetime = lifetime
        self.published = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def publish(self) -> None:
        with self._lock:
            crl = combined_crl(
                self.factory_ca, self.operational_ca, self.lifetime
            )
            write_crl(self.path, crl)
            self.reload()
            self.published += 1

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name="crl-publisher", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
            self._thread = None

    def _run(self) -> None:
        interval = self.lifetime.total_seconds() * REFRESH_FRACTION
        while not self._stop.wait(interval):
            try:
                self.publish()
            except Exception as exc:
                logger.error("CRL not re-issued: %s", exc)


_CRL_END = b"-----END X509 CRL-----"
