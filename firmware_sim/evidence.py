"""CRA evidence: how each authentication requirement is met, device by device.

The EU Cyber Resilience Act asks that products protect access with
appropriate authentication, hold no default or shared credentials, keep
secrets confidential and can be securely reset. For each requirement
this module runs a check over the records (factory line, registry,
CAs) and over the devices' own state directories and status, and says
which devices fail it. Nothing is asserted that was not checked here.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import logging
import stat
import tomllib
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from device_agent.credential import FACTORY, OPERATIONAL, fingerprint
from firmware_sim.ca import CertificateAuthority
from firmware_sim.errors import SimError
from firmware_sim.factory import FactoryError, FactoryLine, Record
from firmware_sim.registry import ACTIVE, Issuance, Registry, RegistryError
from firmware_sim.revocation import crl_states

logger = logging.getLogger(__name__)

TPM_BLOB = b"-----BEGIN TSS2 PRIVATE KEY-----"
# An operational lineage holds the current generation, and for a moment
# the previous one until the new key has carried a heartbeat.
MAX_OPERATIONAL_GENERATIONS = 2


NOT_DEMONSTRATED = "not demonstrated in this run"


class EvidenceError(SimError):
    """The records or devices to judge cannot be found or read."""


@dataclasses.dataclass
class Requirement:
    """One requirement, how it is met, the check run, and who fails it."""

    name: str
    how: str
    check: str
    failures: dict[str, str] = dataclasses.field(default_factory=dict)
    checked: int = 0
    # Devices checked that this run gave no chance to show it (a
    # certificate that was never due for renewal, say): not failures.
    undemonstrated: dict[str, str] = dataclasses.field(default_factory=dict)
    # Not fleet devices but worth saying: boards the factory refused.
    notes: dict[str, str] = dataclasses.field(default_factory=dict)
    # What the run lacked, said when no device could show the requirement.
    lacking: str = "no device to check"

    @property
    def met(self) -> bool:
        return not self.failures

    @property
    def verdict(self) -> str:
        """ "NOT MET", "not run", "not demonstrated" or "met".

        Met only when at least one device showed it: a check over no
        device proves nothing, whatever kind of directory it ran on.
        """
        if self.failures:
            return "NOT MET"
        if self.check.startswith("not run"):
            return "not run"
        if self.checked <= len(self.undemonstrated):
            return NOT_DEMONSTRATED
        return "met"

    @property
    def summary(self) -> str:
        """The verdict in one line, with what was and was not checked.

        A requirement not met names its first failing device and why,
        so the line reads without the report beside it.
        """
        head = f"{self.verdict}: {self.name}"
        if self.failures:
            device_id, why = next(iter(self.failures.items()))
            return (
                f"{head} ({self.checked} devices checked, "
                f"{len(self.failures)} fail; first {device_id}: {why})"
            )
        if self.verdict != NOT_DEMONSTRATED:
            return f"{head} ({self.checked} devices checked)"
        if not self.checked:
            return f"{head} ({self.lacking})"
        return (
            f"{head} ({self.lacking}; the rest of its check held on "
            f"{self.checked} devices)"
        )

    def fail(self, device_id: str, why: str) -> None:
        self.failures.setdefault(device_id, why)


@dataclasses.dataclass(frozen=True)
class DeviceState:
    """What evidence needs from one device's flash and status."""

    device_id: str
    directory: Path
    state_dir: Path
    status: dict[str, Any]

    def key_files(self) -> list[Path]:
        return sorted(self.state_dir.glob("*/generations/*/key.*"))

    def generations(self, lineage: str) -> list[Path]:
        return sorted((self.state_dir / lineage / "generations").glob("*"))

    def leaf(self, lineage: str) -> x509.Certificate | None:
        path = self.state_dir / lineage / "current" / "chain.pem"
        try:
            return x509.load_pem_x509_certificate(path.read_bytes())
        except (OSError, ValueError):
            return None


@dataclasses.dataclass
class Sources:
    """Where a run keeps its records and its devices."""

    devices: Path
    factory_ca: Path
    factory_db: Path
    registrar: Path | None
    crl: Path | None

    @classmethod
    def find(cls, directory: Path) -> Sources:
        """A fleet run's directory, or a factory line's (fewer records)."""
        world = directory / "world"
        if world.is_dir():
            return cls(
                directory / "devices",
                world / "factory-ca",
                world / "factory.sqlite",
                world / "registrar",
                world / "crl.pem",
            )
        if (directory / "factory.sqlite").is_file():
            return cls(
                directory / "devices",
                directory / "factory-ca",
                directory / "factory.sqlite",
                None,
                None,
            )
        raise EvidenceError(
            f"{directory}: neither a fleet run (world/) nor a factory line "
            "(factory.sqlite)"
        )


def assess(directory: Path) -> list[Requirement]:
    """Run every check over the run or line in ``directory``."""
    sources = Sources.find(Path(directory).absolute())
    factory_ca = CertificateAuthority.load(sources.factory_ca)
    # Read-only throughout: an audit must not change what it audits,
    # not even by giving an empty file a schema.
    # Records that cannot be read leave nothing to judge against: the
    # audit fails rather than pass over the devices they would name.
    try:
        with FactoryLine(factory_ca, sources.factory_db, True) as line:
            records = {r.device_id: r for r in line.records()}
            refusals = {i: why for _, i, why in line.refusals()}
    except FactoryError as error:
        raise EvidenceError(str(error)) from None
    devices, refused = _split_refused(
        _devices(sources.devices), records, refusals
    )

    issuances: dict[str, list[Issuance]] = {}
    statuses: dict[str, str] = {}
    operational_ca = None
    registrar_dir = sources.registrar
    if registrar_dir is not None:
        try:
            with Registry(
                registrar_dir / "registry.sqlite", read_only=True
            ) as registry:
                for issuance in registry.issuances():
                    issuances.setdefault(issuance.device_id, []).append(
                        issuance
                    )
                statuses = {d.device_id: d.status for d in registry.devices()}
        except RegistryError as error:
            raise EvidenceError(str(error)) from None
        operational_ca = CertificateAuthority.load(registrar_dir / "ca")

    identity = _unique_identity(devices, records)
    identity.notes.update(refused)
    rotation = _rotation(devices, issuances, statuses, sources)
    revocation = _revocation(
        devices, records, issuances, statuses, sources, factory_ca,
        operational_ca,
    )  # fmt: skip
    return [
        _present(devices, refused, records, statuses, sources.devices),
        identity,
        _no_shared_credential(devices),
        _key_never_exported(devices),
        rotation,
        revocation,
        _secure_reset(devices, issuances),
    ]


def failing_devices(requirements: list[Requirement]) -> dict[str, list[str]]:
    """Device id -> the requirements it fails."""
    failing: dict[str, list[str]] = {}
    for requirement in requirements:
        for device_id in requirement.failures:
            failing.setdefault(device_id, []).append(requirement.name)
    return dict(sorted(failing.items()))


def write(requirements: list[Requirement], out: Path) -> tuple[Path, Path]:
    """evidence.json and evidence.md in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    failing = failing_devices(requirements)
    data = {
        "generated": datetime.datetime.now(datetime.UTC).isoformat(),
        "requirements": [
            {
                "name": r.name,
                "how": r.how,
                "check": r.check,
                "devices_checked": r.checked,
                "met": r.met,
                "verdict": r.verdict,
                "failures": r.failures,
                "not_demonstrated": r.undemonstrated,
                "notes": r.notes,
            }
            for r in requirements
        ],
        "failing_devices": failing,
    }
    json_path = out / "evidence.json"
    json_path.write_text(json.dumps(data, indent=2) + "\n")
    md_path = out / "evidence.md"
    md_path.write_text(_markdown(requirements, failing))
    return json_path, md_path


def _markdown(
    requirements: list[Requirement], failing: dict[str, list[str]]
) -> str:
    lines = [
        "# CRA evidence: authentication",
        "",
        "| requirement | how it is met | check run | devices | result |",
        "|---|---|---|---|---|",
    ]
    for r in requirements:
        result = r.verdict if r.met else f"**{len(r.failures)} fail**"
        lines.append(
            f"| {r.name} | {r.how} | {r.check} | {r.checked} | {result} |"
        )
    lines += ["", "## Devices failing a requirement", ""]
    if not failing:
        lines.append("None.")
    for requirement in requirements:
        for device_id, why in requirement.failures.items():
            lines.append(f"- {device_id}: {requirement.name}: {why}")
    shown = [
        (device_id, r.name, why)
        for r in requirements
        for device_id, why in r.undemonstrated.items()
    ]
    if shown:
        lines += ["", "## Not demonstrated in this run (not failures)", ""]
        lines += [f"- {d}: {name}: {why}" for d, name, why in shown]
    notes = [(d, why) for r in requirements for d, why in r.notes.items()]
    if notes:
        lines += ["", "## Boards the factory refused (not fleet devices)", ""]
        lines += [f"- {d}: {why}" for d, why in notes]
    return "\n".join(lines) + "\n"


def _devices(directory: Path) -> list[DeviceState]:
    if not directory.is_dir():
        raise EvidenceError(f"{directory}: no devices")
    found = []
    for path in sorted(directory.iterdir()):
        state_dir = path / "state"
        if not state_dir.is_dir():
            continue
        try:
            status = json.loads((state_dir / "status.json").read_text())
        except (OSError, ValueError):
            status = {}
        found.append(DeviceState(path.name, path, state_dir, status))
    return found


def _split_refused(
    devices: list[DeviceState],
    records: dict[str, Record],
    refusals: dict[str, str],
) -> tuple[list[DeviceState], dict[str, str]]:
    """Fleet devices, and the boards the line refused (id -> why).

    A board the factory refused and never certified (a clone carrying
    another's key) is the line doing its job, not a fleet device that
    fails a requirement.
    """
    kept, refused = [], {}
    for device in devices:
        if (
            device.device_id in refusals
            and device.device_id not in records
            and device.leaf(FACTORY) is None
        ):
            refused[device.device_id] = (
                f"refused at the factory, no IDevID: "
                f"{refusals[device.device_id]}"
            )
        else:
            kept.append(device)
    return kept, refused


def _present(
    devices: list[DeviceState],
    refused: dict[str, str],
    records: dict[str, Record],
    statuses: dict[str, str],
    directory: Path,
) -> Requirement:
    requirement = Requirement(
        "every recorded device present",
        "the factory line records every device it makes and the registrar "
        "every device it serves; each is judged from its own flash",
        "every device in the factory records or the registry has its "
        "directory and state directory, so no check passes over it",
    )
    found = {device.device_id for device in devices} | set(refused)
    for device_id in sorted({*records, *statuses}):
        requirement.checked += 1
        if device_id in found:
            continue
        whose = "factory" if device_id in records else "registrar"
        if (directory / device_id).is_dir():
            why = f"on the {whose} records, but its state directory is gone"
        else:
            why = f"on the {whose} records, but absent from {directory}"
        requirement.fail(device_id, why)
    return requirement


def _unique_identity(
    devices: list[DeviceState], records: dict[str, Record]
) -> Requirement:
    requirement = Requirement(
        "unique identity per device",
        "each device holds an IDevID naming it alone, issued once by the "
        "factory line, which refuses a serial or key it has seen",
        "IDevID on the device: CN is the device id, serial matches the "
        "line's record; no CN or hardware serial on two devices",
    )
    seen: dict[str, str] = {}
    for device in devices:
        requirement.checked += 1
        leaf = device.leaf(FACTORY)
        record = records.get(device.device_id)
        if leaf is None:
            requirement.fail(device.device_id, "no IDevID installed")
            continue
        names = _attributes(leaf, NameOID.COMMON_NAME)
        serials = _attributes(leaf, NameOID.SERIAL_NUMBER)
        if names != [device.device_id]:
            requirement.fail(device.device_id, f"IDevID names {names}")
        if record is None or record.cert_serial != leaf.serial_number:
            requirement.fail(
                device.device_id, "IDevID not in the factory records"
            )
        else:
            why = _disagreement(device, record, serials)
            if why:
                requirement.fail(device.device_id, why)
        for value in names + serials:
            other = seen.setdefault(value, device.device_id)
            if other != device.device_id:
                requirement.fail(device.device_id, f"{value} also on {other}")
                requirement.fail(other, f"{value} also on {device.device_id}")
    return requirement


def _disagreement(
    device: DeviceState, record: Record, cert_serials: list[str]
) -> str | None:
    """Why the device no longer is the board the line made, if so.

    Its configured serial must be the one in its IDevID and the line's
    record, and its TPM the one the line certified (same EK
    certificate): a TPM set up again has a new seed, and the key the
    IDevID certifies no longer loads in it.
    """
    configured = _configured_serial(device)
    if configured != record.device_serial or cert_serials != [
        record.device_serial
    ]:
        return (
            f"serial disagrees: config {configured}, IDevID "
            f"{cert_serials}, factory record {record.device_serial}"
        )
    if record.ek_cert is not None:
        # The line recorded the first, as SimDevice.ek_certificates sorts.
        found = sorted(device.directory.glob("ek/*.crt"))[:1]
        prints = [hashlib.sha256(p.read_bytes()).hexdigest() for p in found]
        if prints != [record.ek_cert]:
            return (
                "its TPM is not the one the line certified (EK certificate "
                "changed): the IDevID key cannot load"
            )
    return None


def _configured_serial(device: DeviceState) -> str | None:
    try:
        data = tomllib.loads((device.directory / "agent.toml").read_text())
    except (OSError, ValueError):
        return None
    serial = data.get("serial")
    return serial if isinstance(serial, str) else None


def _no_shared_credential(devices: list[DeviceState]) -> Requirement:
    requirement = Requirement(
        "no default or shared credential",
        "no password or shared secret exists; every key is made on its "
        "device and no two devices hold the same key",
        "sha256 of every key file and every certified public key, "
        "compared across all devices",
    )
    owners: dict[str, set[str]] = {}
    for device in devices:
        requirement.checked += 1
        for path in device.key_files():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            owners.setdefault(f"key file {digest[:16]}", set()).add(
                device.device_id
            )
        for lineage in (FACTORY, OPERATIONAL):
            leaf = device.leaf(lineage)
            if leaf is not None:
                key = fingerprint(leaf.public_key())  # type: ignore[arg-type]
                owners.setdefault(f"public key {key[:16]}", set()).add(
                    device.device_id
                )
    for what, holders in owners.items():
        if len(holders) > 1:
            for device_id in holders:
                others = ", ".join(sorted(holders - {device_id}))
                requirement.fail(device_id, f"{what} shared with {others}")
    return requirement


def _key_never_exported(devices: list[DeviceState]) -> Requirement:
    requirement = Requirement(
        "private key never exported",
        "keys are made inside the device's TPM and stored only as TPM-"
        "wrapped blobs; only CSRs leave the device",
        "every key file is a TSS2 TPM blob, mode 0600 and no wider; the "
        "state directory is 0700",
    )
    for device in devices:
        requirement.checked += 1
        mode = stat.S_IMODE(device.state_dir.stat().st_mode)
        if mode & 0o077:
            requirement.fail(
                device.device_id,
                f"{device.state_dir} is mode {mode:o}, others may enter",
            )
        for path in device.key_files():
            key_mode = stat.S_IMODE(path.stat().st_mode)
            if key_mode & 0o077:
                requirement.fail(
                    device.device_id,
                    f"{path.name} of {path.parent.name} is mode "
                    f"{key_mode:o}: readable by others",
                )
            elif not path.read_bytes().startswith(TPM_BLOB):
                requirement.fail(
                    device.device_id,
                    f"{path.name} of {path.parents[2].name} is in a software "
                    "key store: not hardware-protected, the key can be "
                    "copied",
                )
    return requirement


def _rotation(
    devices: list[DeviceState],
    issuances: dict[str, list[Issuance]],
    statuses: dict[str, str],
    sources: Sources,
) -> Requirement:
    requirement = Requirement(
        "rotation",
        "operational certificates are short-lived and renewed with a new "
        "key each time; the registrar records every issuance",
        "every active device holds the newest operational certificate the "
        "registrar issued to it, and was renewed at least once",
        lacking="no certificate was due for renewal before the run ended",
    )
    if sources.registrar is None:
        requirement.check = "not run: no registrar records in this directory"
        return requirement
    for device in devices:
        if statuses.get(device.device_id) != ACTIVE:
            continue
        requirement.checked += 1
        mine = issuances.get(device.device_id, [])
        leaf = device.leaf(OPERATIONAL)
        ended = _last_seen(device)
        if len(mine) == 1 and ended < mine[0].not_after:
            # Its only certificate still held when the run ended: the
            # run gave it no need to renew.
            requirement.undemonstrated[device.device_id] = (
                "its only certificate had not expired when the run ended"
            )
            if leaf is None or leaf.serial_number != mine[0].cert_serial:
                requirement.fail(
                    device.device_id, "does not hold its newest certificate"
                )
        elif len(mine) < 2:
            requirement.fail(
                device.device_id, f"{len(mine)} issued, no renewal"
            )
        elif leaf is None or leaf.serial_number != mine[-1].cert_serial:
            requirement.fail(
                device.device_id, "does not hold its newest certificate"
            )
    return requirement


def _last_seen(device: DeviceState) -> datetime.datetime:
    """When the device last wrote its status: when its run ended."""
    try:
        stamp = (device.state_dir / "status.json").stat().st_mtime
    except OSError:
        return datetime.datetime.now(datetime.UTC)
    return datetime.datetime.fromtimestamp(stamp, datetime.UTC)


def _revocation(
    devices: list[DeviceState],
    records: dict[str, Record],
    issuances: dict[str, list[Issuance]],
    statuses: dict[str, str],
    sources: Sources,
    factory_ca: CertificateAuthority,
    operational_ca: CertificateAuthority | None,
) -> Requirement:
    requirement = Requirement(
        "revocation",
        "revoking or decommissioning a device revokes every certificate "
        "it was issued, publishes a new CRL and reloads the broker",
        "every certificate of a revoked or decommissioned device is in "
        "its CA's revocation records; the broker's CRL lists them and "
        "was current when last published",
        lacking="no device was revoked or decommissioned",
    )
    if operational_ca is None:
        requirement.check = "not run: no registrar records in this directory"
        return requirement
    operational = operational_ca.revocations()
    factory = factory_ca.revocations()
    listed, expired = _crl_listed(sources.crl)
    for device in devices:
        status = statuses.get(device.device_id)
        if status in (None, ACTIVE):
            continue
        requirement.checked += 1
        serials = [i.cert_serial for i in issuances.get(device.device_id, [])]
        missing = [s for s in serials if s not in operational]
        record = records.get(device.device_id)
        if (
            status == "decommissioned"
            and record is not None
            and record.cert_serial not in factory
        ):
            missing.append(record.cert_serial)
        if missing:
            requirement.fail(
                device.device_id, f"{len(missing)} certificates not revoked"
            )
        elif listed is not None and not set(serials) <= listed:
            requirement.fail(device.device_id, "not in the broker's CRL")
        elif expired:
            requirement.fail(device.device_id, "the broker's CRL expired")
    return requirement


def _secure_reset(
    devices: list[DeviceState], issuances: dict[str, list[Issuance]]
) -> Requirement:
    requirement = Requirement(
        "secure reset",
        "'device-agent reset' destroys the operational keys and "
        "certificates and keeps the factory identity; retired keys are "
        "deleted once their successor works",
        "no device holds more than the current and previous operational "
        "generation, and every device still holds its IDevID",
        lacking="no device held an operational identity to reset",
    )
    for device in devices:
        requirement.checked += 1
        if not issuances.get(device.device_id):
            # Never given an operational identity (a factory line, say):
            # nothing was there to reset, so keeping the IDevID shows
            # nothing about reset.
            requirement.undemonstrated[device.device_id] = (
                "never held an operational identity to reset"
            )
        generations = device.generations(OPERATIONAL)
        if len(generations) > MAX_OPERATIONAL_GENERATIONS:
            requirement.fail(
                device.device_id,
                f"{len(generations)} operational generations kept",
            )
        if device.leaf(FACTORY) is None:
            requirement.fail(device.device_id, "lost its factory identity")
    return requirement


def _crl_listed(path: Path | None) -> tuple[set[int] | None, bool]:
    if path is None or not path.is_file():
        return None, False
    data = path.read_bytes()
    serials: set[int] = set()
    end = b"-----END X509 CRL-----"
    for block in data.split(end)[:-1]:
        crl = x509.load_pem_x509_crl(block.strip() + b"\n" + end)
        serials.update(r.serial_number for r in crl)
    # Judged when the CRL was last published: a fleet that has stopped
    # no longer re-issues it, which says nothing about how it ran.
    published = datetime.datetime.fromtimestamp(
        path.stat().st_mtime, datetime.UTC
    )
    expired = any(s.remaining(published) <= 0 for s in crl_states(data))
    return serials, expired


def _attributes(
    cert: x509.Certificate, oid: x509.ObjectIdentifier
) -> list[str]:
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(oid)]
