"""The factory line: each device makes its key, the line certifies it.

Per device the key is made on the device (in its TPM when it has
one), the device emits a CSR, the manufacturing CA issues the IDevID
and the chain is written back into the device. Only the CSR leaves
the device. The line records what it made in SQLite and refuses a
device serial or a public key it has seen before: two boards with one
key are a clone, and the factory is the cheapest place to catch it.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import sqlite3
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_agent.credential import FACTORY, fingerprint
from device_agent.errors import AgentError
from firmware_sim.ca import CertificateAuthority, chain_pem
from firmware_sim.database import Database
from firmware_sim.device import SimDevice
from firmware_sim.errors import SimError

logger = logging.getLogger(__name__)

IDEVID_DAYS = 3650
_SCHEMA = """
CREATE TABLE IF NOT EXISTS manufactured (
    device_serial  TEXT PRIMARY KEY,
    device_id      TEXT NOT NULL UNIQUE,
    cert_serial    TEXT NOT NULL,
    public_key     TEXT NOT NULL UNIQUE,
    ek_cert        TEXT,
    key_store      TEXT NOT NULL,
    started_at     TEXT NOT NULL,
    finished_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS refused (
    number         INTEGER PRIMARY KEY AUTOINCREMENT,
    device_serial  TEXT NOT NULL,
    device_id      TEXT NOT NULL,
    reason         TEXT NOT NULL,
    at             TEXT NOT NULL
);
"""


class FactoryError(SimError):
    """The line refused a device or cannot certify it."""


class CloneError(FactoryError):
    """A device serial or public key the line has made before."""


@dataclasses.dataclass(frozen=True)
class Record:
    """What the line notes about one device it made."""

    device_serial: str
    device_id: str
    cert_serial: int
    public_key: str
    ek_cert: str | None
    key_store: str
    started_at: datetime.datetime
    finished_at: datetime.datetime


class FactoryLine(Database):
    """A manufacturing CA and the line's records, in ``db_path``."""

    def __init__(
        self,
        ca: CertificateAuthority,
        db_path: Path,
        read_only: bool = False,
    ) -> None:
        """Open the line's records; ``read_only`` to audit them.

        Read-only changes nothing in the file and refuses one that holds
        no factory records (an empty file, say).
        """
        self.ca = ca
        self.db_path = Path(db_path).absolute()
        try:
            super().__init__(self.db_path, read_only)
            if read_only:
                if not self.has_table("manufactured"):
                    self.close()
                    raise FactoryError(
                        f"{self.db_path} holds no factory records"
                    )
            else:
                self._db.execute("PRAGMA journal_mode = WAL")
                self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            self.close()
            raise FactoryError(f"factory records {db_path}: {exc}") from None

    def check_new(self, device: SimDevice) -> None:
        """Refuse ``device`` if its id or serial was made before.

        Run before anything is written to the device, so that a refused
        board leaves an already-made one of the same name untouched.

        :raises CloneError: the serial or the id was seen before.
        """
        self._refuse_known_serial(device)

    def completed(self, device: SimDevice) -> Record | None:
        """The record of ``device`` if the line made exactly this board.

        Id, serial and the IDevID on the device must all agree with the
        record; then a re-run of the batch can leave it alone.

        :raises CloneError: the id or serial is recorded for another
            board, or the board no longer holds what the line made.
        """
        record = self.record_of(device.device_id)
        if record is None:
            self._refuse_known_serial(device)
            return None
        if record.device_serial != device.serial:
            self._refuse(
                device,
                f"id {device.device_id} was already manufactured with "
                f"serial {record.device_serial}, not {device.serial}",
            )
        try:
            leaf = (
                device.leaf(FACTORY) if device.config_path.exists() else None
            )
        except AgentError:
            leaf = None
        if leaf is None or leaf.serial_number != record.cert_serial:
            raise FactoryError(
                f"{device.device_id} is recorded as made but "
                f"{device.directory} no longer holds its IDevID"
            )
        return record

    def manufacture(
        self, device: SimDevice, days: int = IDEVID_DAYS
    ) -> Record:
        """Certify ``device``: key on it, CSR out, IDevID chain in.

        A device that already holds a key (a board arriving with one)
        is asked for a CSR of that key rather than a new one, so that a
        copied key shows up here.

        :raises CloneError: the serial or the public key was seen before.
        """
        started = _now()
        self._refuse_known_serial(device)

        if not device.has_key():
            device.keygen()
        csr = x509.load_pem_x509_csr(device.csr())
        public_key = csr.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise FactoryError(f"{device.device_id}: not an EC key")
        key_print = fingerprint(public_key)
        self._refuse_known_key(device, key_print)
        _check_subject(csr, device)

        chain = self.ca.sign_csr(csr, days)
        device.install_chain(chain_pem(chain))
        ek = device.ek_certificates()
        ek_print = ek[0].fingerprint(hashes.SHA256()).hex() if ek else None

        record = Record(
            device_serial=device.serial,
            device_id=device.device_id,
            cert_serial=chain[0].serial_number,
            public_key=key_print,
            ek_cert=ek_print,
            key_store=device.key_store,
            started_at=started,
            finished_at=_now(),
        )
        self._insert(record)
        logger.info(
            "%s (serial %s) made: IDevID %x",
            device.device_id,
            device.serial,
            record.cert_serial,
        )
        return record

    def records(self) -> list[Record]:
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM manufactured ORDER BY device_id"
            ).fetchall()
        return [_record(row) for row in rows]

    def record_of(self, device_id: str) -> Record | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM manufactured WHERE device_id = ?",
                (device_id,),
            ).fetchone()
        return None if row is None else _record(row)

    def refusals(self) -> list[tuple[str, str, str]]:
        """(device serial, device id, reason) of every refused device."""
        with self._lock:
            rows = self._db.execute(
                "SELECT device_serial, device_id, reason FROM refused "
                "ORDER BY number"
            ).fetchall()
        return [(str(a), str(b), str(c)) for a, b, c in rows]

    def _refuse_known_serial(self, device: SimDevice) -> None:
        """Refuse a serial or id made before, saying which of the two."""
        with self._lock:
            serial_owner = self._db.execute(
                "SELECT device_id FROM manufactured WHERE device_serial = ?",
                (device.serial,),
            ).fetchone()
            id_serial = self._db.execute(
                "SELECT device_serial FROM manufactured WHERE device_id = ?",
                (device.device_id,),
            ).fetchone()

        reason = _collision(
            device,
            None if serial_owner is None else str(serial_owner[0]),
            None if id_serial is None else str(id_serial[0]),
        )
        if reason is not None:
            self._refuse(device, reason)

    def _refuse_known_key(self, device: SimDevice, key_print: str) -> None:
        with self._lock:
            row = self._db.execute(
                "SELECT device_id FROM manufactured WHERE public_key = ?",
                (key_print,),
            ).fetchone()
        if row is not None:
            self._refuse(
                device,
                f"{device.device_id}: public key sha256 {key_print[:16]}... "
                f"already belongs to {row[0]}: a cloned key",
            )

    def _refuse(self, device: SimDevice, reason: str) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO refused VALUES (NULL, ?, ?, ?, ?)",
                (device.serial, device.device_id, reason, _now().isoformat()),
            )
        # The caller reports the refusal; a warning too would say it twice.
        logger.info("refused: %s", reason)
        raise CloneError(reason)

    def _insert(self, record: Record) -> None:
        try:
            with self._lock:
                self._db.execute(
                    "INSERT INTO manufactured VALUES (?,?,?,?,?,?,?,?)",
                    (
                        record.device_serial,
                        record.device_id,
                        format(record.cert_serial, "x"),
                        record.public_key,
                        record.ek_cert,
                        record.key_store,
                        record.started_at.isoformat(),
                        record.finished_at.isoformat(),
                    ),
                )
        except sqlite3.IntegrityError:
            # Two lines racing on one serial or key: the database's
            # unique constraints are the last word.
            raise CloneError(
                f"{record.device_id}: serial or key already recorded"
            ) from None


def ek_ca_config(directory: Path) -> Path:
    """A swtpm_setup config whose EK certificates a local CA signs.

    The CA (swtpm_localca) keeps its key and serial counter in
    ``directory``; returns the swtpm_setup config file to pass on.
    """
    directory = Path(directory).absolute()
    state = directory / "localca"
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    localca = directory / "swtpm-localca.conf"
    localca.write_text(
        f"statedir = {state}\n"
        f"signingkey = {state}/signkey.pem\n"
        f"issuercert = {state}/issuercert.pem\n"
        f"certserial = {state}/certserial\n"
    )
    options = directory / "swtpm-localca.options"
    options.write_text(
        "--platform-manufacturer device-agent-sim\n"
        "--platform-version 2.1\n"
        "--platform-model simulated-board\n"
    )
    setup = directory / "swtpm_setup.conf"
    setup.write_text(
        "create_certs_tool = /usr/bin/swtpm_localca\n"
        f"create_certs_tool_config = {localca}\n"
        f"create_certs_tool_options = {options}\n"
        "active_pcr_banks = sha256\n"
    )
    return setup


def _collision(
    device: SimDevice, serial_owner: str | None, id_serial: str | None
) -> str | None:
    """Why ``device`` collides with a board the line made, if it does.

    ``serial_owner`` is the id made with the device's serial, and
    ``id_serial`` the serial made with its id.
    """
    serial, device_id = device.serial, device.device_id
    if serial_owner is not None and id_serial is not None:
        if serial_owner == device_id:
            return (
                f"device {device_id} with serial {serial} was already "
                "manufactured"
            )
        return (
            f"device serial {serial} and id {device_id} were both already "
            f"manufactured: the serial as {serial_owner}, the id with "
            f"serial {id_serial}"
        )
    if serial_owner is not None:
        return (
            f"device serial {serial} was already manufactured (as "
            f"{serial_owner})"
        )
    if id_serial is not None:
        return (
            f"device id {device_id} was already manufactured (with serial "
            f"{id_serial})"
        )
    return None


def _check_subject(
    csr: x509.CertificateSigningRequest, device: SimDevice
) -> None:
    names = [
        str(a.value)
        for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    serials = [
        str(a.value)
        for a in csr.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    ]
    if names != [device.device_id] or serials != [device.serial]:
        raise FactoryError(
            f"{device.device_id}: the CSR names {names} {serials}, not this "
            "device"
        )


def _record(row: tuple[object, ...]) -> Record:
    serial, device_id, cert, key, ek, store, started, finished = row
    return Record(
        device_serial=str(serial),
        device_id=str(device_id),
        cert_serial=int(str(cert), 16),
        public_key=str(key),
        ek_cert=None if ek is None else str(ek),
        key_store=str(store),
        started_at=datetime.datetime.fromisoformat(str(started)),
        finished_at=datetime.datetime.fromisoformat(str(finished)),
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
