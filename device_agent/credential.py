"""The device's credential: its key, its request, its chain, its session."""

from __future__ import annotations

import base64
import binascii
import contextlib
import datetime
import logging
import os
import shutil
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from device_agent import chain, csr, keys
from device_agent.config import Settings
from device_agent.errors import (
    ChainError,
    KeyStoreError,
    StoreError,
    TPMError,
)
from device_agent.keys.software import check_private_file
from device_agent.session import Session
from device_agent.store import (
    CredentialStore,
    Generation,
    check_access,
    check_private_dir,
)

if TYPE_CHECKING:
    from device_agent.keys.tpm import TPMKeyStore
    from device_agent.keys.tpmproc import ProcessTPMKeyStore

logger = logging.getLogger(__name__)

_NAMES = {NameOID.SERIAL_NUMBER: "serialNumber"}


FACTORY = "idevid"
OPERATIONAL = "ldevid"
IDENTITIES = {"factory": FACTORY, "operational": OPERATIONAL}


def open_store(settings: Settings, lineage: str = FACTORY) -> CredentialStore:
    return CredentialStore(settings.state_dir, lineage)


def keygen(
    settings: Settings, force: bool = False, lineage: str = FACTORY
) -> dict[str, Any]:
    """Make a key for the next certificate; the current one stays usable.

    Without ``force`` an existing key is never replaced. With it, the new
    key waits as "pending" and the credential in use is untouched until a
    chain for the new key is installed. A store left damaged is refused
    and left as it is: repairing it is the agent's recovery, which may
    fall back to an older generation, and no side effect of this command.
    """
    store = open_store(settings, lineage)
    with _renewal_held(settings, lineage), store.lock():
        _check_current(store)
        existing = store.pending() or store.current()
        if existing is not None and not force:
            raise KeyStoreError(
                f"a key exists already (generation {existing.number}); "
                "use --force to make a new one"
            )
        key_store = key_store_for_new_key(settings)
        generation = store.new_generation()
        try:
            public_key = key_store.generate(
                generation.key_path_for(key_store.key_suffix)
            )
        except BaseException:
            shutil.rmtree(generation.path, ignore_errors=True)
            raise
        replaced = store.pending()
        if replaced is not None and replaced == store.current():
            # A commit cut short leaves pending on the generation now in
            # use: that one is kept, not replaced.
            replaced = None
        store.set_pending(generation)
        if replaced is not None:
            store.discard(replaced)

    return {
        "replaced_pending": replaced.number if replaced else None,
        "generation": generation.number,
        "key_store": key_store.kind,
        "hardware_protected": key_store.hardware_protected,
        "fingerprint": fingerprint(public_key),
    }


@contextlib.contextmanager
def _renewal_held(settings: Settings, lineage: str) -> Iterator[None]:
    """Hold off a renewal while a new operational key is made.

    A renewal running meanwhile would take the new key for one an
    earlier renewal left behind, and discard it.
    """
    if lineage != OPERATIONAL:
        yield
        return
    from device_agent.renewal import RENEWAL_LOCK

    store = CredentialStore(settings.state_dir, lineage)
    with store.lock(timeout=0.5, name=RENEWAL_LOCK):
        yield


def _check_current(store: CredentialStore) -> None:
    """Refuse a current pointer that leads to a deleted generation."""
    broken = store.broken("current")
    if broken is not None:
        name = _LINEAGE_NAMES.get(store.lineage, store.lineage)
        raise StoreError(f"{name}: {broken}")


def key_store_for_new_key(settings: Settings) -> keys.KeyStore:
    """Where a new key goes: where this device's keys already are.

    ``key_store`` decides for the very first key, and when it asks for
    the TPM: a device moves up to hardware protection when told to. A
    device whose keys live in a TPM keeps making them there, and a TPM
    that does not answer is an error, never a reason to use software.
    """
    kinds: set[str] = set()
    for lineage in (OPERATIONAL, FACTORY):
        store = CredentialStore(settings.state_dir, lineage)
        for generation in (store.current(), store.pending()):
            key = generation.key_path() if generation else None
            if key is not None:
                kinds.add(keys.kind_of(key))
    if settings.key_store == "tpm" or "tpm" in kinds:
        return keys.for_kind("tpm", settings)
    if kinds:
        return keys.for_kind(kinds.pop(), settings)
    return keys.choose(settings)


def signing_generation(store: CredentialStore) -> Generation:
    """The key a new request should carry: pending first, else current."""
    _check_current(store)
    generation = store.pending() or store.current()
    if generation is None or generation.key_path() is None:
        raise KeyStoreError(_no_key(store.lineage))
    return generation


def _no_key(lineage: str) -> str:
    """What to run when ``lineage`` holds no key yet."""
    option = " --identity operational" if lineage == OPERATIONAL else ""
    return f"no key yet: run 'device-agent keygen{option}' first"


def make_csr(settings: Settings, lineage: str = FACTORY) -> bytes:
    """A PEM CSR signed by the pending (or current) key."""
    check_private_dir(settings.state_dir)
    generation = signing_generation(open_store(settings, lineage))
    key_path = _key_path(generation)
    key_store = keys.for_key(key_path, settings)
    with key_store.signer(key_path) as signer:
        request = csr.build(
            signer, settings.device_id, settings.device_uri, settings.serial
        )
    logger.info("CSR made for generation %d", generation.number)
    return request.public_bytes(serialization.Encoding.PEM)


def install_chain(
    settings: Settings,
    data: bytes,
    now: datetime.datetime | None = None,
    lineage: str = FACTORY,
) -> x509.Certificate:
    """Check a chain for one of our keys and make it the current one.

    Everything is checked before anything is written, so a refused chain
    leaves the store exactly as it was.
    """
    anchors = chain.load_anchors(settings.require("anchor_file"))
    certificates = chain.read_bundle(data)
    store = open_store(settings, lineage)
    with store.lock():
        target, ordered = _match_key(settings, store, certificates)
        chain.verify(ordered, anchors, settings.device_id, now)
        pem = chain.to_pem(ordered)
        if (
            target.chain_path.exists()
            and target.chain_path.read_bytes() == pem
        ):
            # The same chain again: after an interrupted install it may
            # still wait under "pending"; otherwise nothing changes.
            if target != store.current():
                store.commit(target)
        else:
            sealed = target if target.chain_path.exists() else None
            if sealed is not None:
                target = store.copy_key(sealed)
            store.install(target, pem)
            if sealed is not None and sealed == store.pending():
                store.discard(sealed)
        store.prune()

    leaf = ordered[0]
    logger.info(
        "certificate %x installed, valid until %s",
        leaf.serial_number,
        leaf.not_valid_after_utc,
    )
    return leaf


def _match_key(
    settings: Settings,
    store: CredentialStore,
    certificates: list[x509.Certificate],
) -> tuple[Generation, list[x509.Certificate]]:
    _check_current(store)
    candidates = [g for g in (store.pending(), store.current()) if g]
    if not candidates:
        raise KeyStoreError(_no_key(store.lineage))
    for generation in candidates:
        key_path = _key_path(generation)
        public_key = keys.for_key(key_path, settings).public_key(key_path)
        try:
            return generation, chain.order_chain(certificates, public_key)
        except ChainError as exc:
            if exc.reason != "not-our-key":
                raise
    raise ChainError(
        "not-our-key", "no certificate in it holds this device's key"
    )


def open_session(
    settings: Settings,
    generation: Generation | None = None,
    lineage: str = "idevid",
    max_tls_version: str | None = None,
) -> Session:
    """A session (not yet open) that presents a credential.

    Without ``generation`` it is the lineage's current one. Each
    generation connects under its own client id, so that a session with
    a new credential can open while the old one is still up.
    """
    check_private_dir(settings.state_dir)
    if generation is None:
        store = CredentialStore(settings.state_dir, lineage)
        _check_current(store)
        generation = store.current()
    if generation is None:
        raise StoreError(
            "no certificate installed yet: run 'device-agent install-chain'"
        )
    key_path = _key_path(generation)
    chain_path = generation.chain_path
    kind = keys.kind_of(key_path)
    check_private_file(key_path)
    ca_file = settings.require("ca_file")

    def context() -> ssl.SSLContext:
        from device_agent import tls

        if kind == "tpm":
            tls.load_tpm_provider(settings.tcti, settings.openssl_modules)
        try:
            return tls.client_context(
                ca_file,
                chain_path,
                key_path,
                settings.tls_min_version,
                max_tls_version,
                settings.server_name,
            )
        except KeyStoreError:
            if kind == "tpm":
                _explain_tpm_refusal(settings, key_path)
            raise

    return Session(
        settings.broker_host,
        settings.broker_port,
        f"{settings.client_id}.{lineage}.{generation.number}",
        context,
        mqtt_version=settings.mqtt_version,
        keepalive=settings.keepalive,
        connect_timeout=settings.connect_timeout,
        reconnect_base=min(1.0, settings.retry_base),
        reconnect_cap=settings.retry_cap,
    )


def _explain_tpm_refusal(settings: Settings, key_path: Path) -> None:
    """Raise the TPM's own error when OpenSSL could not load its key.

    OpenSSL reports a TPM that refuses to load a key (its object slots
    full, say) only as a PEM error; loading the key once through the
    TPM key store names the TPM and its return code instead. If that
    load works, the caller's error stands.
    """
    keys.tpm_store(settings.tcti).check_loads(key_path)


ERROR = "error"
WARNING = "warning"
_LINEAGE_NAMES = {FACTORY: "factory", OPERATIONAL: "operational"}
# What status shows of the agent's status file, and the types it must have.
_AGENT_FIELDS: dict[str, tuple[type, ...]] = {
    "state": (str,),
    "clock": (str,),
    "clock_reason": (str,),
    "next_renewal": (str, type(None)),
    "last_result": (str,),
    "failures_in_row": (int,),
    "connect_failures_in_row": (int, type(None)),
}


def status(
    settings: Settings, now: datetime.datetime | None = None
) -> dict[str, Any]:
    """What a person or a monitor needs to know about this device.

    ``problems`` lists what stands in the credential's way, each with a
    level: an ``error`` means the credential cannot work as it is.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    problems: list[dict[str, str]] = []
    check_access(settings.state_dir)
    try:
        check_private_dir(settings.state_dir)
    except StoreError as exc:
        problems.append({"level": ERROR, "problem": str(exc)})
    report: dict[str, Any] = {
        "device_id": settings.device_id,
        "serial": settings.serial,
        "key_store_setting": settings.key_store,
        "state_dir": str(settings.state_dir),
        "identities": {
            lineage: _describe_lineage(settings, lineage, now, problems)
            for lineage in (FACTORY, OPERATIONAL)
        },
        "agent": _agent_status(settings, problems),
    }
    kinds = {
        lineage: identity["key"]["store"]
        for lineage, identity in report["identities"].items()
        if identity["key"] is not None
    }
    _check_key_store_setting(settings, kinds, problems)
    _check_anchors(settings, now, problems)
    _check_hook(settings, problems)
    report["tpm"] = _tpm_presence(settings, kinds, problems)
    report["problems"] = _fallback(problems)
    return report


def _check_anchors(
    settings: Settings,
    now: datetime.datetime,
    problems: list[dict[str, str]],
) -> None:
    """The CA files hold certificates, and our chains build to the anchor.

    A trust anchor that was replaced by the wrong file does no harm
    until the next renewal, which it then refuses; status says so now.
    """
    for field in ("ca_file", "trust_anchor"):
        path = getattr(settings, field)
        if path is None:
            continue
        try:
            chain.load_anchors(path, field)
        except ChainError as exc:
            problems.append({"level": ERROR, "problem": exc.detail})
    path = settings.anchor_file
    if path is None:
        return
    try:
        anchors = chain.load_anchors(path)
    except ChainError:
        return  # named above
    for lineage in (FACTORY, OPERATIONAL):
        trouble = _anchor_trouble(settings, lineage, anchors, now)
        if trouble is not None:
            problems.append(
                {
                    "level": ERROR,
                    "problem": f"{_LINEAGE_NAMES[lineage]}: {trouble}",
                }
            )


def _check_hook(settings: Settings, problems: list[dict[str, str]]) -> None:
    """The renewal hook's program exists: a missing one shows only later."""
    import shlex

    if not settings.renewal_hook:
        return
    program = shlex.split(settings.renewal_hook)[0]
    if shutil.which(program) is None:
        problems.append(
            {
                "level": WARNING,
                "problem": f"renewal_hook: {program} is not an executable "
                "program; the agent will log a failure after each renewal",
            }
        )


def _anchor_trouble(
    settings: Settings,
    lineage: str,
    anchors: list[x509.Certificate],
    now: datetime.datetime,
) -> str | None:
    """Why a valid current chain does not build to the anchors, if so."""
    generation = CredentialStore(settings.state_dir, lineage).current()
    if generation is None:
        return None
    try:
        certificates = chain.read_bundle(generation.chain_path.read_bytes())
        leaf = certificates[0]
        if not leaf.not_valid_before_utc <= now < leaf.not_valid_after_utc:
            return None  # its dates are a problem of their own
        chain.verify(certificates, anchors, None, now)
    except (ChainError, OSError) as exc:
        if isinstance(exc, ChainError) and exc.reason == "unknown-ca":
            return (
                f"chain does not build to trust_anchor "
                f"{settings.anchor_file}: {exc.detail}"
            )
        return None  # unreadable chains are named elsewhere
    return None


def _check_key_store_setting(
    settings: Settings, kinds: dict[str, str], problems: list[dict[str, str]]
) -> None:
    """Warn when ``key_store`` says one thing and the keys are another.

    A person who set ``tpm`` expects hardware protection and must hear
    that the key in use has none until the next key is made.
    """
    for lineage, kind in kinds.items():
        if kind in ("tpm", "software") and kind != settings.key_store:
            after = (
                "the next key is made in the TPM"
                if settings.key_store == "tpm"
                else f"new keys stay in {kind}"
            )
            problems.append(
                {
                    "level": WARNING,
                    "problem": f'key_store = "{settings.key_store}" but '
                    f"the {_LINEAGE_NAMES[lineage]} key is a {kind} key "
                    f"({after})",
                }
            )


def _fallback(problems: list[dict[str, str]]) -> list[dict[str, str]]:
    """Operational troubles are warnings while the factory identity works.

    The agent then falls back to the factory identity and enrolls a new
    operational one by itself; only when that cannot happen is a broken
    operational credential in the way.
    """
    prefix = f"{_LINEAGE_NAMES[OPERATIONAL]}: "
    if any(
        p["level"] == ERROR and not p["problem"].startswith(prefix)
        for p in problems
    ):
        return problems
    return [
        {
            "level": WARNING,
            "problem": f"{p['problem']} (the agent falls back to the "
            "factory identity and enrolls again)",
        }
        if p["level"] == ERROR
        else p
        for p in problems
    ]


def _describe_lineage(
    settings: Settings,
    lineage: str,
    now: datetime.datetime,
    problems: list[dict[str, str]],
) -> dict[str, Any]:
    name = _LINEAGE_NAMES[lineage]

    def problem(text: str, level: str = ERROR) -> None:
        problems.append({"level": level, "problem": f"{name}: {text}"})

    store = CredentialStore(settings.state_dir, lineage)
    current = _pointer(store, "current", problem)
    pending = _pointer(store, "pending", lambda text: problem(text, WARNING))
    described: dict[str, Any] = {
        "pending_generation": pending.number if pending else None,
        "key": None,
        "certificate": None,
    }
    generation = current or pending
    key_path = generation.key_path() if generation else None
    if generation is not None and key_path is None:
        problem(f"generation {generation.number} holds no key")
    if generation is not None and key_path is not None:
        try:
            kind = keys.kind_of(key_path)
        except KeyStoreError as exc:
            problem(f"key unreadable: {exc}")
            kind = "unknown"
        described["key"] = {
            "store": kind,
            "hardware_protected": kind == "tpm",
            "generation": generation.number,
        }
        if kind != "unknown":
            trouble = _key_trouble(key_path, kind)
            if trouble is not None:
                problem(f"key unreadable: {trouble}")
                described["key"]["problem"] = trouble
    if current is not None and current.chain_path.is_file():
        try:
            leaf = chain.read_bundle(current.chain_path.read_bytes())[0]
        except ChainError as exc:
            problem(f"certificate unreadable: {exc.detail}")
            described["certificate"] = {
                "state": "unreadable",
                "detail": exc.detail,
            }
        else:
            described["certificate"] = _describe_leaf(leaf, now)
            names = described["certificate"].pop("names")
            if names != [settings.device_id]:
                problem(_stranger(names, settings.device_id))
            elif generation is current and "problem" not in (
                described["key"] or {}
            ):
                disagreement = key_disagrees(settings, current, leaf)
                if disagreement is not None:
                    problem(disagreement)
            certificate = described["certificate"]
            if certificate["state"] == "expired":
                problem(
                    f"certificate {certificate['serial']} expired at "
                    f"{certificate['not_after']}"
                )
    return described


def _pointer(
    store: CredentialStore, name: str, problem: Callable[[str], None]
) -> Generation | None:
    """A pointer of the store; a broken one is a problem, not a crash."""
    try:
        generation = store.current() if name == "current" else store.pending()
    except StoreError as exc:
        problem(f"{name} pointer broken: {exc}")
        return None
    link = store.root / name
    broken = store.broken(name) if generation is None else None
    if broken is not None:
        problem(broken)
    if generation is None and name == "current" and not os.path.lexists(link):
        complete = [g for g in store.generations() if g.complete()]
        if complete:
            problem(
                f"generation {complete[-1].number} is on disk but no "
                "current pointer leads to it ('device-agent run' "
                "recovers it)",
            )
    return generation


def _key_trouble(path: Path, kind: str) -> str | None:
    """Why the key file at ``path`` cannot work, or None if it looks fine.

    Only the file is read: a TPM key's blob is checked for its armour and
    encoding, without the TPM (which status does not need to reach).
    """
    try:
        check_private_file(path)
        data = path.read_bytes()
    except KeyStoreError as exc:
        return str(exc).removeprefix(f"{path}: ")
    except OSError as exc:
        return exc.strerror or str(exc)
    if kind == "software":
        try:
            serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            return "not a key (no PEM private key in the file)"
        return None
    return _tss2_trouble(data)


def _tss2_trouble(data: bytes) -> str | None:
    """The armour and outer DER of a TPM key blob, checked without TSS.

    Importing the TSS bindings would slow every ``status`` down; a blob
    damaged beyond this check is still caught when the agent loads it.
    """
    text = data.decode("ascii", "replace").strip().splitlines()
    begin = "-----BEGIN TSS2 PRIVATE KEY-----"
    end = "-----END TSS2 PRIVATE KEY-----"
    if len(text) < 3 or text[0] != begin or text[-1] != end:
        return "not a key (no TSS2 PRIVATE KEY in the file)"
    try:
        der = base64.b64decode("".join(text[1:-1]), validate=True)
    except (binascii.Error, ValueError):
        return "not a key (the TSS2 PRIVATE KEY is not base64)"
    if not der.startswith(b"\x30"):
        return "not a key (the TSS2 PRIVATE KEY is not DER)"
    return None


def _agent_status(
    settings: Settings, problems: list[dict[str, str]]
) -> dict[str, Any] | None:
    """What the running agent last wrote, or None when it never ran."""
    import json

    from device_agent.agent import running_pid

    path = settings.status_file
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not JSON"
        _unreadable(problems, path, why or str(exc))
        return None
    if not isinstance(report, dict):
        _unreadable(problems, path, "not a JSON object")
        return None
    for field, types in _AGENT_FIELDS.items():
        value = report.get(field)
        if type(value) not in types:
            _unreadable(problems, path, f"{field} is {value!r}"[:120])
            return None
    report["running"] = running_pid(settings.state_dir) is not None
    if not report["running"]:
        # What a stopped agent wrote is history: its schedule died with
        # it (and a reset since may have invalidated it), and its view of
        # the clock is judged again now.
        report["stale"] = True
        report["next_renewal"] = None
        _judge_clock(settings, report, problems)
    elif report["state"] == "needs_service":
        problems.append(
            {
                "level": ERROR,
                "problem": "the agent needs service: it stopped trying "
                f"(last result: {report['last_result']})",
            }
        )
    elif report["state"] == "renewal_loop":
        problems.append(
            {
                "level": ERROR,
                "problem": "the agent stopped renewing: fresh certificates "
                "kept arriving already due; check the CA's lifetimes and "
                "the clock, then run 'device-agent renew --now'",
            }
        )
    elif report["clock"] != "trusted":
        problems.append(
            {
                "level": WARNING,
                "problem": f"clock {report['clock']}: nothing is renewed "
                f"or deleted until it is sane: {report['clock_reason']}",
            }
        )
    return report


def _judge_clock(
    settings: Settings,
    report: dict[str, Any],
    problems: list[dict[str, str]],
) -> None:
    """Judge the clock against the last known-good time, as the agent will."""
    from device_agent.agent import LAST_GOOD_FILE
    from device_agent.core import clock

    path = settings.state_dir / LAST_GOOD_FILE
    try:
        last_good = clock.decode_last_good(path.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError) as exc:
        last_good = None
        why = exc.strerror if isinstance(exc, OSError) else str(exc)
    else:
        why = "not a time this agent wrote"
    if last_good is None:
        problems.append(
            {
                "level": WARNING,
                "problem": f"{path} unreadable ({why}): the agent will judge "
                "the clock without it and write it anew",
            }
        )
        return
    now = datetime.datetime.now(datetime.UTC).timestamp()
    state, reason = clock.assess(now, last_good, (), settings.clock_skew)
    report["clock"] = state
    report["clock_reason"] = reason
    if state != "trusted":
        report["clock_reason"] = (
            f"{reason}; if the clock is right, delete {path}"
        )
        problems.append(
            {
                "level": WARNING,
                "problem": f"clock {state}: {report['clock_reason']}",
            }
        )


def _unreadable(problems: list[dict[str, str]], path: Path, why: str) -> None:
    problems.append(
        {
            "level": WARNING,
            "problem": f"agent status file unreadable (ignored): "
            f"{path}: {why}",
        }
    )


def _describe_leaf(
    leaf: x509.Certificate, now: datetime.datetime
) -> dict[str, Any]:
    left = leaf.not_valid_after_utc - now
    if now < leaf.not_valid_before_utc:
        state = "not-yet-valid"
    elif left.total_seconds() < 0:
        state = "expired"
    else:
        state = "valid"
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return {
        "names": [str(name.value) for name in names],
        "serial": f"{leaf.serial_number:x}",
        "subject": leaf.subject.rfc4514_string(_NAMES),
        "issuer": leaf.issuer.rfc4514_string(_NAMES),
        "not_before": leaf.not_valid_before_utc.isoformat(),
        "not_after": leaf.not_valid_after_utc.isoformat(),
        "days_left": round(left.total_seconds() / 86400, 2),
        "state": state,
    }


def _tpm_presence(
    settings: Settings, kinds: dict[str, str], problems: list[dict[str, str]]
) -> dict[str, Any]:
    """Ask the TPM only when a key lives there, or will.

    Loading the TSS bindings costs more than the rest of ``status``, so
    a device whose keys are all software never pays for it.
    """
    holds_keys = "tpm" in kinds.values()
    if not holds_keys and (kinds or settings.key_store == "software"):
        return {"checked": False, "tcti": settings.tcti}
    store = keys.tpm_store(settings.tcti)
    present = store.answers()
    if not present:
        problems.append(
            {
                "level": ERROR if holds_keys else WARNING,
                "problem": f"the TPM at {settings.tcti} does not answer"
                + (": the device's key is in it" if holds_keys else ""),
            }
        )
    else:
        _check_tpm_keys_load(settings, kinds, store, problems)
    return {"checked": True, "present": present, "tcti": settings.tcti}


def _check_tpm_keys_load(
    settings: Settings,
    kinds: dict[str, str],
    store: TPMKeyStore | ProcessTPMKeyStore,
    problems: list[dict[str, str]],
) -> None:
    """Each current TPM key loads: a cleared or other TPM cannot use it."""
    for lineage, kind in kinds.items():
        generation = CredentialStore(settings.state_dir, lineage).current()
        key_path = generation.key_path() if generation else None
        if kind != "tpm" or key_path is None:
            continue
        try:
            store.check_loads(key_path)
        except TPMError as exc:
            problems.append(
                {
                    "level": ERROR,
                    "problem": f"{_LINEAGE_NAMES[lineage]}: the key does "
                    f"not load in the TPM at {settings.tcti} ({exc}): was "
                    "the TPM cleared, or is this another TPM?",
                }
            )
        except KeyStoreError:
            continue  # an unreadable key file is named with the key


def fingerprint(public_key: ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the DER public key, as hex: a name for a key."""
    digest = hashes.Hash(hashes.SHA256())
    digest.update(chain.public_key_bytes(public_key))
    return digest.finalize().hex()


def _key_path(generation: Generation) -> Path:
    path = generation.key_path()
    if path is None:
        raise StoreError(f"generation {generation.number} holds no key")
    return path


def best_credential(
    settings: Settings, now: datetime.datetime | None = None
) -> tuple[str, Generation]:
    """The operational credential while it is valid, else the factory one.

    A damaged or expired operational credential is passed over with a
    warning, as the agent does: the factory identity still connects, and
    enrolls again. The factory credential's damage is an error naming
    what is wrong, and an expired one is never presented.
    """
    check_private_dir(settings.state_dir)
    now = now or datetime.datetime.now(datetime.UTC)
    expired: list[str] = []
    for lineage in (OPERATIONAL, FACTORY):
        store = CredentialStore(settings.state_dir, lineage)
        generation = store.current()
        if generation is None:
            _skip_broken(store)
            continue
        path = generation.chain_path
        try:
            leaf = chain.read_bundle(path.read_bytes())[0]
        except (ChainError, OSError) as exc:
            why = (
                exc.detail
                if isinstance(exc, ChainError)
                else exc.strerror or str(exc)
            )
            if lineage == FACTORY:
                raise ChainError("unreadable", f"{path}: {why}") from None
            logger.warning(
                "operational chain %s unreadable (%s): using the factory "
                "identity",
                path,
                why,
            )
            continue
        stranger = other_device(leaf, settings.device_id) or key_disagrees(
            settings, generation, leaf, read_tpm_keys=False
        )
        if stranger is not None:
            if lineage == FACTORY:
                raise StoreError(f"factory: {stranger}")
            logger.warning("operational: %s: using the factory one", stranger)
            continue
        if leaf.not_valid_after_utc <= now:
            expired.append(
                f"certificate of the {_LINEAGE_NAMES[lineage]} identity "
                f"expired at {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z"
            )
            if lineage == OPERATIONAL:
                logger.warning("%s: using the factory identity", expired[-1])
            continue
        if lineage == FACTORY or leaf.not_valid_before_utc <= now:
            return lineage, generation
    if expired:
        raise StoreError("; ".join(expired))
    raise StoreError(
        "no certificate installed yet: run 'device-agent install-chain'"
    )


def key_disagrees(
    settings: Settings,
    generation: Generation,
    leaf: x509.Certificate,
    *,
    read_tpm_keys: bool = True,
) -> str | None:
    """Why the generation's key cannot present ``leaf``, or None if it can.

    A key file emptied, damaged or swapped for another key would fail
    only inside the TLS handshake, with OpenSSL's words for it. Without
    ``read_tpm_keys`` a TPM key blob is only checked for its armour:
    reading its public key takes the TSS bindings, several megabytes a
    process that only connects through the OpenSSL provider never needs.
    """
    key_path = generation.key_path()
    if key_path is None:
        return f"generation {generation.number} holds no key"
    kind = keys.kind_of(key_path)
    if kind == "tpm" and not read_tpm_keys:
        trouble = _key_trouble(key_path, kind)
        return None if trouble is None else f"key unreadable: {trouble}"
    try:
        public_key = keys.for_key(key_path, settings).public_key(key_path)
    except KeyStoreError as exc:
        return f"key unreadable: {str(exc).removeprefix(f'{key_path}: ')}"
    leaf_key = leaf.public_key()
    if not isinstance(leaf_key, ec.EllipticCurvePublicKey) or fingerprint(
        public_key
    ) != fingerprint(leaf_key):
        return (
            f"key {key_path} is not the key of certificate "
            f"{leaf.serial_number:x}"
        )
    return None


def other_device(leaf: x509.Certificate, device_id: str) -> str | None:
    """Why ``leaf`` is not this device's certificate, or None if it is.

    A store copied from another device, or a config whose device_id was
    changed over an existing store, holds a credential that would log in
    under the other device's name: it is never presented.
    """
    names = [
        str(name.value)
        for name in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
    if names == [device_id]:
        return None
    return _stranger(names, device_id)


def _stranger(names: list[str], device_id: str) -> str:
    return (
        f"certificate names another device (CN={', '.join(names) or 'none'})"
        f", not {device_id}: is state_dir another device's store?"
    )


def _skip_broken(store: CredentialStore) -> None:
    """Pass over a broken operational pointer; refuse a factory one."""
    if store.lineage == FACTORY:
        _check_current(store)
        return
    broken = store.broken("current")
    if broken is not None:
        logger.warning("operational: %s: using the factory identity", broken)


def renew_once(settings: Settings) -> x509.Certificate:
    """One renewal over a session of its own, for ``renew --now``."""
    from device_agent.enroll.mqtt import MqttEnroller
    from device_agent.renewal import renew

    lineage, generation = best_credential(settings)
    session = open_session(settings, generation, lineage)
    session.open()
    try:
        renewed = renew(
            settings,
            MqttEnroller(session, settings.device_id),
            lambda g: open_session(settings, g, OPERATIONAL),
        )
    finally:
        session.close()

    try:
        # One acknowledged message proves the new credential works; only
        # then are the old keys destroyed.
        renewed.session.publish(settings.heartbeat_topic, b'{"renewed":true}')
        store = CredentialStore(settings.state_dir, OPERATIONAL)
        with store.lock():
            store.retire_others()
    finally:
        renewed.session.close()
    return renewed.leaf


def reset(settings: Settings) -> int:
    """Destroy the operational lineage; return how many generations went."""
    from device_agent.renewal import RENEWAL_LOCK

    store = CredentialStore(settings.state_dir, OPERATIONAL)
    with store.lock(timeout=0.5, name=RENEWAL_LOCK), store.lock():
        count = len(store.generations())
        store.destroy()
    logger.info("operational identity destroyed (%d generations)", count)
    return count
