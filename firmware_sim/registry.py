"""The device registry: known devices, their status, what was issued."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from device_agent.config import DEVICE_ID, SERIAL
from firmware_sim.database import Database
from firmware_sim.errors import SimError

logger = logging.getLogger(__name__)

ACTIVE = "active"
REVOKED = "revoked"
DECOMMISSIONED = "decommissioned"
STATUSES = (ACTIVE, REVOKED, DECOMMISSIONED)

# Device ids become MQTT topic levels and, through the certificate CN,
# broker usernames that ACL patterns expand: no "/", "+" or "#". The
# agent's own rule (DEVICE_ID), so that nothing is registered or
# certified under an id the agent would refuse to run as.
DEVICE_ID_RULE = (
    "1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
)

# A board's serial as the agent's config takes it (SERIAL is the agent's
# own pattern, so that nothing is registered under a serial the device
# could not be configured with).
SERIAL_RULE = "1 to 64 printable ASCII characters without spaces"

# Names the broker's ACL grants more than a device's own topics: the
# registrar answers every device's enrollment requests, the fleet's and
# demo's monitor reads (and could write) every device's heartbeats. A
# device certificate carrying one of them would act with that service's
# rights, so no device may take one, and no CA certifies one for a
# device.
REGISTRAR = "registrar"
MONITOR = "monitor"
SERVICE_NAMES = (REGISTRAR, MONITOR)


def is_service_name(name: str) -> bool:
    """Whether ``name`` is a service's name, in any case.

    mosquitto matches usernames exactly, but a broker or an ACL written
    by hand may not: any spelling of a service name is kept from
    devices.
    """
    return name.casefold() in SERVICE_NAMES


SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS devices (
    device_id  TEXT PRIMARY KEY,
    serial     TEXT,
    status     TEXT NOT NULL CHECK (status IN
                   ('active', 'revoked', 'decommissioned')),
    added_at   TEXT NOT NULL,
    changed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS issuances (
    number      INTEGER PRIMARY KEY AUTOINCREMENT,
    device_id   TEXT NOT NULL REFERENCES devices (device_id),
    cert_serial TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    not_before  TEXT NOT NULL,
    not_after   TEXT NOT NULL,
    kind        TEXT NOT NULL,
    issued_at   TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS issuances_by_device
    ON issuances (device_id, number);
"""


class RegistryError(SimError):
    """The registry refused a change or cannot be read or written."""


class UnknownDeviceError(RegistryError):
    """The device id is not in the registry."""

    def __init__(self, device_id: str) -> None:
        super().__init__(f"device {device_id!r} is not in the registry")
        self.device_id = device_id


class OutOfServiceError(RegistryError):
    """The device is revoked or decommissioned: nothing is issued to it."""

    def __init__(self, device_id: str, status: str) -> None:
        super().__init__(f"device {device_id!r} is {status}")
        self.device_id = device_id
        self.status = status


@dataclasses.dataclass(frozen=True)
class Device:
    device_id: str
    serial: str | None
    status: str
    added_at: datetime.datetime
    changed_at: datetime.datetime


@dataclasses.dataclass(frozen=True)
class Issuance:
    """One certificate issued to a device; ``kind`` says which sort."""

    number: int
    device_id: str
    cert_serial: int
    fingerprint: str
    not_before: datetime.datetime
    not_after: datetime.datetime
    kind: str
    issued_at: datetime.datetime


def check_device_id(device_id: object) -> str:
    """The id unchanged if a device may carry it; RegistryError if not."""
    if type(device_id) is not str or not DEVICE_ID.fullmatch(device_id):
        raise RegistryError(
            f"device id {device_id!r} must be {DEVICE_ID_RULE}"
        )
    if is_service_name(device_id):
        raise RegistryError(
            f"device id {device_id!r} is reserved for a broker service"
        )
    return device_id


def check_serial(serial: str | None) -> str | None:
    """The serial unchanged if a device may carry it; RegistryError if not."""
    if serial is not None and not SERIAL.fullmatch(serial):
        raise RegistryError(f"serial {serial[:64]!r} is not {SERIAL_RULE}")
    return serial


def device_id_problem(device_id: str) -> str | None:
    """Why a device may not carry ``device_id``; None if it may."""
    if not DEVICE_ID.fullmatch(device_id):
        return f"a device id is {DEVICE_ID_RULE}"
    if is_service_name(device_id):
        return "it is reserved for a broker service"
    return None


class Registry(Database):
    """Devices and their issuances in one SQLite file.

    One object may be shared by threads; several processes may open the
    same file. Every change is one short transaction in WAL mode, so
    readers never wait for a writer and writers wait for each other at
    most :data:`~firmware_sim.database.BUSY_TIMEOUT` seconds.
    """

    def __init__(self, path: Path, read_only: bool = False) -> None:
        """Open (and if need be create) the registry in ``path``.

        ``read_only`` changes nothing in the file and refuses one that
        holds no registry (an empty file, say) rather than reading it as
        a registry without devices.
        """
        self.path = Path(path)
        try:
            super().__init__(self.path, read_only)
            if read_only:
                self._check_schema()
            else:
                self._prepare()
        except sqlite3.Error as exc:
            self.close()
            raise RegistryError(f"registry {self.path}: {exc}") from None
        except RegistryError:
            self.close()
            raise

    def _check_schema(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version == 0 or not self.has_table("devices"):
            raise RegistryError(f"{self.path} holds no registry")
        if version > SCHEMA_VERSION:
            raise RegistryError(
                f"registry {self.path} has schema {version}; this version "
                f"knows {SCHEMA_VERSION} at most"
            )

    def add(self, device_id: str, serial: str | None = None) -> Device:
        """Register a new device as active.

        Refuses an id already registered, and a serial another device
        has: a serial names one board, so a second device with it is a
        typing mistake or a cloned board.
        """
        check_device_id(device_id)
        check_serial(serial)
        now = _now()
        with self._write() as db:
            # The write lock is held from here on, so no other process
            # registers the serial between this look and the insert.
            owner = _serial_owner(db, serial)
            if owner is not None and owner != device_id:
                raise RegistryError(
                    f"serial {serial!r} is already registered for device "
                    f"{owner!r}"
                )

            try:
                row = db.execute(
                    "INSERT INTO devices VALUES (?, ?, ?, ?, ?) RETURNING *",
                    (device_id, serial, ACTIVE, now, now),
                ).fetchone()
            except sqlite3.IntegrityError:
                raise RegistryError(
                    f"device {device_id!r} is already in the registry"
                ) from None
        logger.info("device %s added", device_id)
        return _device(row)

    def get(self, device_id: str) -> Device | None:
        with self._locked() as db:
            row = db.execute(
                "SELECT * FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
        return None if row is None else _device(row)

    def status(self, device_id: str) -> str | None:
        """The status of ``device_id``; None if it is not registered."""
        with self._locked() as db:
            row = db.execute(
                "SELECT status FROM devices WHERE device_id = ?", (device_id,)
            ).fetchone()
        return None if row is None else str(row[0])

    def devices(self) -> list[Device]:
        with self._locked() as db:
            rows = db.execute(
                "SELECT * FROM devices ORDER BY device_id"
            ).fetchall()
        return [_device(row) for row in rows]

    def set_status(self, device_id: str, status: str) -> Device:
        """Change a device's status; returns the device as it is now."""
        if status not in STATUSES:
            raise RegistryError(
                f"status {status!r} is not one of {', '.join(STATUSES)}"
            )

        with self._write() as db:
            row = db.execute(
                "UPDATE devices SET status = ?, changed_at = ? "
                "WHERE device_id = ? RETURNING *",
                (status, _now(), device_id),
            ).fetchone()
        if row is None:
            raise UnknownDeviceError(device_id)

        logger.info("device %s is now %s", device_id, status)
        return _device(row)

    def record_issuance(
        self,
        device_id: str,
        cert_serial: int,
        fingerprint: str,
        not_before: datetime.datetime,
        not_after: datetime.datetime,
        kind: str,
    ) -> Issuance:
        """Note a certificate issued to an active device.

        A device revoked meanwhile is refused with
        :class:`OutOfServiceError`: the status and the issuances change
        in one transaction each, so whoever revokes a device and then
        reads its issuances sees every certificate it was ever given.
        The record is committed when this returns.
        """
        if not kind:
            raise RegistryError("an issuance needs a kind")
        issued_at = datetime.datetime.now(datetime.UTC)
        issuance = Issuance(
            number=0,
            device_id=device_id,
            cert_serial=cert_serial,
            fingerprint=fingerprint,
            not_before=_utc(not_before),
            not_after=_utc(not_after),
            kind=kind,
            issued_at=issued_at,
        )

        with self._locked() as db:
            number = _insert_issuance(db, issuance)
        if number is None:
            number = self._insert_or_refuse(issuance)
        return dataclasses.replace(issuance, number=number)

    def _insert_or_refuse(self, issuance: Issuance) -> int:
        # The device was not active a moment ago: say why, or insert
        # after all if it was added or made active again since.
        device_id = issuance.device_id
        with self._write() as db:
            known = db.execute(
                "SELECT status FROM devices WHERE device_id = ?",
                (device_id,),
            ).fetchone()
            if known is None:
                raise UnknownDeviceError(device_id)
            if known[0] != ACTIVE:
                raise OutOfServiceError(device_id, str(known[0]))
            number = _insert_issuance(db, issuance)
        if number is None:
            raise RegistryError(
                f"registry {self.path}: issuance to {device_id!r} not recorded"
            )
        return number

    def issuances(self, device_id: str | None = None) -> list[Issuance]:
        """Issuances, oldest first; of one device if ``device_id`` given."""
        query = "SELECT * FROM issuances"
        arguments: tuple[str, ...] = ()
        if device_id is not None:
            query += " WHERE device_id = ?"
            arguments = (device_id,)

        with self._locked() as db:
            rows = db.execute(query + " ORDER BY number", arguments)
            return [_issuance(row) for row in rows.fetchall()]

    def _prepare(self) -> None:
        db = self._db
        db.execute("PRAGMA journal_mode = WAL")
        # A commit is in the WAL file before record_issuance returns, so
        # every reader has it, and so does the registry after a crash of
        # the registrar or any other process; WAL never leaves a corrupt
        # file. Only a power cut or kernel crash before the system writes
        # the WAL out (within seconds) can lose the last commits: their
        # certificates would then miss a later revocation's CRL until
        # they expire, a day by default. FULL would close that window
        # with an fsync per issuance, which costs more than signing the
        # certificate and halves the rate at which the registrar issues.
        db.execute("PRAGMA synchronous = NORMAL")
        db.execute("PRAGMA foreign_keys = ON")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RegistryError(
                f"registry {self.path} has schema {version}; this version "
                f"knows {SCHEMA_VERSION} at most"
            )
        if version < SCHEMA_VERSION:
            db.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA} "
                f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )

    @contextmanager
    def _locked(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._db
            except sqlite3.Error as exc:
                raise RegistryError(f"registry {self.path}: {exc}") from None

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        # BEGIN IMMEDIATE takes the write lock up front, so a transaction
        # that read first never fails later to upgrade its lock.
        with self._locked() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")


def _insert_issuance(db: sqlite3.Connection, issuance: Issuance) -> int | None:
    """The number of the new record; None if the device is not active.

    One statement is one transaction, committed when it returns:
    SQLite takes the write lock before reading the status, as BEGIN
    IMMEDIATE would, so no revocation comes between check and insert.
    """
    cursor = db.execute(
        "INSERT INTO issuances SELECT NULL, device_id, ?, ?, ?, ?, ?, ? "
        "FROM devices WHERE device_id = ? AND status = ?",
        (
            # Serials are up to 159 bits, beyond SQLite integers.
            format(issuance.cert_serial, "x"),
            issuance.fingerprint,
            issuance.not_before.isoformat(),
            issuance.not_after.isoformat(),
            issuance.kind,
            issuance.issued_at.isoformat(),
            issuance.device_id,
            ACTIVE,
        ),
    )
    return cursor.lastrowid if cursor.rowcount == 1 else None


def _serial_owner(db: sqlite3.Connection, serial: str | None) -> str | None:
    """The device registered with ``serial``; None if there is none."""
    if serial is None:
        return None
    row = db.execute(
        "SELECT device_id FROM devices WHERE serial = ? LIMIT 1", (serial,)
    ).fetchone()
    return None if row is None else str(row[0])


def _device(row: tuple[object, ...]) -> Device:
    device_id, serial, status, added, changed = row
    return Device(
        device_id=str(device_id),
        serial=None if serial is None else str(serial),
        status=str(status),
        added_at=_parse(added),
        changed_at=_parse(changed),
    )


def _issuance(row: tuple[object, ...]) -> Issuance:
    number, device_id, serial, fingerprint, nb, na, kind, issued = row
    return Issuance(
        number=int(str(number)),
        device_id=str(device_id),
        cert_serial=int(str(serial), 16),
        fingerprint=str(fingerprint),
        not_before=_parse(nb),
        not_after=_parse(na),
        kind=str(kind),
        issued_at=_parse(issued),
    )


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat()


def _utc(moment: datetime.datetime) -> datetime.datetime:
    if moment.tzinfo is None:
        raise RegistryError("times in the registry must carry a time zone")
    return moment.astimezone(datetime.UTC)


def _parse(value: object) -> datetime.datetime:
    return datetime.datetime.fromisoformat(str(value))
