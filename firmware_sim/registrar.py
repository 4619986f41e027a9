"""The registrar: answers devices' enrollment requests with certificates."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import hashlib
import itertools
import json
import logging
import os
import queue
import re
import socket
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from device_agent import tls
from device_agent.core import messages
from device_agent.errors import SessionError
from device_agent.keys.software import write_private_file
from device_agent.session import Message, Session
from firmware_sim import lock
from firmware_sim.ca import (
    CA_FILES,
    ROOT_CERT,
    CertificateAuthority,
    chain_pem,
    key_pem,
    san_of,
)
from firmware_sim.errors import SimError
from firmware_sim.registry import (
    DECOMMISSIONED,
    DEVICE_ID,
    REGISTRAR,
    REVOKED,
    OutOfServiceError,
    Registry,
)

logger = logging.getLogger(__name__)

# The registrar's certificate CN, and so its broker username; the
# registry keeps devices from taking it.
NAME = REGISTRAR

REQUEST_FILTER = messages.request_topic("+")
RESPONSE_FILTER = messages.response_topic("+")
# What the broker's ACL must let the registrar reach.
ACL_TOPICS = (REQUEST_FILTER, RESPONSE_FILTER)

# What the registry calls the certificates the registrar issues.
KIND = "ldevid"
_EKU = (ExtendedKeyUsageOID.CLIENT_AUTH,)

CA_DIR = "ca"
CHAIN_FILE = "registrar.pem"
KEY_FILE = "registrar.key"
REGISTRY_FILE = "registry.sqlite"
# Held by the registrar serving a directory, with its pid inside.
LOCK_FILE = "registrar.lock"

DEFAULT_LIFETIME = 86400
CREDENTIAL_DAYS = 365
CACHE_SIZE = 1024
MAX_BACKLOG = 1000
BUSY_RETRY_AFTER = 5.0
PUBLISH_TIMEOUT = 5.0

# Numbers the registrars of one process, for their client ids.
_INSTANCES = itertools.count(1)

# Put on the worker's inbox to wake it when the registrar stops.
_WAKE = Message("", b"", 0, False)


class RegistrarError(SimError):
    """The registrar cannot be set up, started, or was misconfigured."""


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where a registrar keeps its CA, credential and registry."""

    directory: Path

    @property
    def ca_dir(self) -> Path:
        return self.directory / CA_DIR

    @property
    def root_path(self) -> Path:
        """The operational trust anchor, for devices and the broker."""
        return self.ca_dir / ROOT_CERT

    @property
    def chain_path(self) -> Path:
        return self.directory / CHAIN_FILE

    @property
    def key_path(self) -> Path:
        return self.directory / KEY_FILE

    @property
    def registry_path(self) -> Path:
        return self.directory / REGISTRY_FILE

    def check(self) -> None:
        """Refuse a directory that :func:`prepare` has not set up."""
        needed = [
            self.registry_path,
            self.chain_path,
            self.key_path,
            *(self.ca_dir / name for name in CA_FILES),
        ]
        missing = [path for path in needed if not path.exists()]
        if missing:
            raise RegistrarError(
                f"{missing[0]}: no such file; run 'registrar init "
                f"--dir {self.directory}' first"
            )


def default_client_id() -> str:
    """``registrar.<host>.<pid>.<n>``: a client id no one else holds.

    A broker closes the older of two sessions with the same client id,
    so a shared id would let any second registrar, or a test, knock the
    serving one off. The broker's ACL goes by certificate CN, not by
    client id, so the id may vary freely.
    """
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname())[:32]
    return f"{NAME}.{host or 'host'}.{os.getpid()}.{next(_INSTANCES)}"


@contextlib.contextmanager
def hold_directory(directory: Path) -> Iterator[None]:
    """Be the only registrar serving ``directory``, or refuse at once.

    Two registrars on one registry would answer every request twice.
    The lock goes with the process, so a killed registrar leaves none
    behind; the pid inside only names the holder for the refusal.
    """

    def refuse(pid: int | None) -> RegistrarError:
        return RegistrarError(
            f"{directory}: a registrar (pid {pid or '?'}) serves this "
            "directory already"
        )

    with lock.hold(Path(directory) / LOCK_FILE, refuse, mode=0o644):
        yield


def prepare(
    directory: Path,
    ca_name: str = "Device Operations",
    days: int = CREDENTIAL_DAYS,
) -> Layout:
    """Make what a registrar needs in ``directory``; keep what is there.

    That is an operational CA, the registrar's own client certificate
    (CN "registrar") and software key, and an empty registry. A
    credential that is missing, expired, or not from this CA is made
    anew.
    """
    layout = Layout(Path(directory))
    layout.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    if layout.root_path.exists():
        ca = CertificateAuthority.load(layout.ca_dir)
    else:
        # The registry records every certificate this CA issues, in the
        # transaction that answers the device; a second record, a file
        # synced at each issuance, would cost a third of the rate.
        ca = CertificateAuthority.create(
            layout.ca_dir, ca_name, issued_record=False
        )

    if not _credential_usable(layout, ca):
        _make_credential(layout, ca, days)

    Registry(layout.registry_path).close()
    return layout


def _credential_usable(layout: Layout, ca: CertificateAuthority) -> bool:
    try:
        leaf = x509.load_pem_x509_certificate(layout.chain_path.read_bytes())
        key = serialization.load_pem_private_key(
            layout.key_path.read_bytes(), None
        )
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        return False

    try:
        leaf.verify_directly_issued_by(ca.intermediate)
    except (ValueError, TypeError, InvalidSignature):
        return False
    now = datetime.datetime.now(datetime.UTC)
    return (
        leaf.public_key() == key.public_key()
        and _common_names(leaf.subject) == [NAME]
        and now < leaf.not_valid_after_utc
    )


def _make_credential(
    layout: Layout, ca: CertificateAuthority, days: int
) -> None:
    chain, key = ca.issue_client_cert(NAME, days, service=True)

    # The key goes first: a chain whose key is missing is made anew on
    # the next run, so a crash in between costs nothing.
    _replace(layout.key_path, key_pem(key), private=True)
    _replace(layout.chain_path, chain_pem(chain), private=False)
    logger.info(
        "registrar credential made: serial %x, valid until %s",
        chain[0].serial_number,
        chain[0].not_valid_after_utc.isoformat(),
    )


def _replace(path: Path, data: bytes, *, private: bool) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.unlink(missing_ok=True)
    write_private_file(partial, data)
    if not private:
        os.chmod(partial, 0o644)
    os.replace(partial, path)


@dataclasses.dataclass(frozen=True)
class Policy:
    """How the registrar answers, to play the part of various real CAs.

    ``lifetime`` is in seconds from the moment of issue and ``backdate``
    moves notBefore that many seconds into the past. ``max_lifetime``
    caps the lifetime, as a CA does that issues less than was asked.
    ``refuse_all`` refuses every request with that reason (an outage, a
    maintenance window), with ``retry_after`` seconds as the hint.
    """

    lifetime: int = DEFAULT_LIFETIME
    backdate: int = 0
    max_lifetime: int | None = None
    refuse_all: str | None = None
    retry_after: float | None = None

    def __post_init__(self) -> None:
        if self.lifetime < 1:
            raise RegistrarError("lifetime must be at least 1 second")
        if self.backdate < 0:
            raise RegistrarError("backdate cannot be negative")
        if self.max_lifetime is not None and self.max_lifetime < 1:
            raise RegistrarError("max_lifetime must be at least 1 second")
        if self.refuse_all is not None and (
            self.refuse_all not in messages.REASONS
        ):
            raise RegistrarError(
                f"refuse_all {self.refuse_all!r} is not one of "
                f"{', '.join(messages.REASONS)}"
            )
        if self.retry_after is not None and self.retry_after < 0:
            raise RegistrarError("retry_after cannot be negative")

    @property
    def granted_lifetime(self) -> int:
        if self.max_lifetime is None:
            return self.lifetime
        return min(self.lifetime, self.max_lifetime)


class _Refusal(Exception):  # noqa: N818 - an answer, not a failure
    def __init__(
        self, reason: str, detail: str, retry_after: float | None = None
    ) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


class Registrar:
    """An MQTT service that issues operational certificates to devices.

    Requests are handled one at a time by one worker thread, in the
    order the broker delivers them. The answer to an issued request is
    kept for a while, so a device that repeats a request id (because
    the answer was lost) gets the same certificate again instead of a
    second one.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        registry: Registry,
        host: str,
        port: int,
        ca_file: Path,
        chain_file: Path,
        key_file: Path,
        *,
        lifetime: int = DEFAULT_LIFETIME,
        backdate: int = 0,
        max_lifetime: int | None = None,
        refuse_all: str | None = None,
        retry_after: float | None = None,
        drop_responses: int = 0,
        cache_size: int = CACHE_SIZE,
        max_backlog: int = MAX_BACKLOG,
        client_id: str | None = None,
        mqtt_version: str = "5",
    ) -> None:
        self.ca = ca
        self.registry = registry
        self.host = host
        self.port = port
        self.ca_file = Path(ca_file)
        self.chain_file = Path(chain_file)
        self.key_file = Path(key_file)
        self.client_id = client_id or default_client_id()
        # RabbitMQ 3.10's MQTT plugin speaks 3.1.1 only.
        self.mqtt_version = mqtt_version
        self.max_backlog = max_backlog
        # Replaced whole, never changed in place: the worker reads it once
        # per request, so each request sees one consistent policy.
        self.policy = Policy(
            lifetime, backdate, max_lifetime, refuse_all, retry_after
        )

        self._cache_size = cache_size
        self._cache: collections.OrderedDict[
            tuple[str, str], tuple[bytes, bytes]
        ] = collections.OrderedDict()
        self._counts: collections.Counter[str] = collections.Counter()
        self._requests: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()
        self._drop_responses = drop_responses
        self._session: Session | None = None
        self._worker: threading.Thread | None = None
        self._stop = threading.Event()
        self._owned_registry: Registry | None = None

    @classmethod
    def from_directory(
        cls,
        directory: Path,
        host: str,
        port: int,
        ca_file: Path,
        **options: Any,
    ) -> Registrar:
        """A registrar for what :func:`prepare` made in ``directory``."""
        layout = Layout(Path(directory))
        layout.check()
        ca = CertificateAuthority.load(layout.ca_dir)
        registry = Registry(layout.registry_path)
        try:
            registrar = cls(
                ca,
                registry,
                host,
                port,
                ca_file,
                layout.chain_path,
                layout.key_path,
                **options,
            )
        except BaseException:
            registry.close()
            raise
        registrar._owned_registry = registry
        return registrar

    @property
    def running(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    @property
    def drop_responses(self) -> int:
        """How many of the next answers are made but never sent."""
        with self._lock:
            return self._drop_responses

    @drop_responses.setter
    def drop_responses(self, count: int) -> None:
        with self._lock:
            self._drop_responses = count

    def counts(self) -> dict[str, int]:
        """Requests so far: issued, refused, repeated, dropped, ..."""
        with self._lock:
            return dict(self._counts)

    def requests_from(self, device_id: str) -> int:
        """How many requests ``device_id`` sent so far, answered or not."""
        with self._lock:
            return self._requests[device_id]

    def start(self) -> None:
        """Connect, subscribe to every device's requests, start serving."""
        if self._session is not None:
            raise RegistrarError("the registrar is already running")

        session = Session(
            self.host,
            self.port,
            self.client_id,
            self._tls_context,
            mqtt_version=self.mqtt_version,
        )
        session.open()
        try:
            session.subscribe(REQUEST_FILTER, qos=1)
        except SessionError:
            session.close()
            raise

        self._session = session
        self._stop.clear()
        self._worker = threading.Thread(
            target=self._work,
            args=(session,),
            name="registrar",
            daemon=True,
        )
        self._worker.start()
        logger.info(
            "registrar serving %s on %s:%d",
            REQUEST_FILTER,
            self.host,
            self.port,
        )

    def stop(self) -> None:
        """Stop serving; requests not yet handled are left unanswered.

        :meth:`start` may serve again afterwards.
        """
        self._stop.set()
        session = self._session
        if session is not None:
            session.messages.put(_WAKE)
        if self._worker is not None:
            self._worker.join(PUBLISH_TIMEOUT + 1.0)
            self._worker = None

        self._session = None
        if session is not None:
            session.close()
            left = _unread(session.messages)
            if left:
                logger.warning("registrar stopped, %d requests unread", left)

    def close(self) -> None:
        """Stop, and close the registry if :meth:`from_directory` opened it."""
        self.stop()
        if self._owned_registry is not None:
            self._owned_registry.close()
            self._owned_registry = None

    def __enter__(self) -> Self:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def handle(self, device_id: str, payload: bytes) -> bytes | None:
        """The answer to one request from ``device_id``; None to drop it.

        Never raises: every failure becomes a refusal, or, when the
        message carries no request id to answer, a logged drop.
        """
        try:
            request_id, csr_pem = messages.decode_request(payload)
        except messages.MessageError as exc:
            return self._malformed(device_id, payload, str(exc))
        except RecursionError:
            # The json module gives up on deep nesting this way, not
            # with a ValueError.
            return self._malformed(device_id, payload, "nested too deeply")

        try:
            return self._answer(device_id, request_id, csr_pem)
        except _Refusal as refusal:
            return self._refuse(device_id, request_id, refusal)
        except Exception as exc:
            logger.error(
                "%s %s: internal error: %s: %s",
                device_id,
                request_id,
                type(exc).__name__,
                exc,
            )
            logger.debug("traceback", exc_info=True)
            return self._refuse(
                device_id,
                request_id,
                _Refusal("internal", "the registrar failed"),
            )

    def _tls_context(self) -> ssl.SSLContext:
        context = tls.client_context(
            self.ca_file, self.chain_file, self.key_file
        )
        context.sslsocket_class = _PromptSocket
        return context

    def _work(self, session: Session) -> None:
        while not self._stop.is_set():
            message = session.messages.get()
            if message is _WAKE:
                continue
            try:
                self._serve(session, message)
            except Exception:
                # handle() answers every failure it can foresee; this
                # keeps the one it could not from ending the service.
                self._count("dropped")
                logger.exception("dropped a message on %r", message.topic)

    def _serve(self, session: Session, message: Message) -> None:
        device_id = _requester(message)
        if device_id is None:
            self._count("dropped")
            logger.warning("dropped a message on %r", message.topic[:100])
            return

        with self._lock:
            self._requests[device_id] += 1
        answer = self.handle(device_id, message.payload)
        if answer is None or self._suppressed(device_id):
            return

        try:
            session.publish(
                messages.response_topic(device_id),
                answer,
                qos=1,
                timeout=PUBLISH_TIMEOUT,
            )
        except SessionError as exc:
            self._count("unsent")
            logger.warning("%s: answer not sent: %s", device_id, exc)

    def _answer(self, device_id: str, request_id: str, csr_pem: str) -> bytes:
        digest = hashlib.sha256(csr_pem.encode()).digest()
        with self._lock:
            cached = self._cache.get((device_id, request_id))
        if cached is not None:
            return self._repeat(device_id, request_id, digest, cached)

        policy = self.policy
        if policy.refuse_all is not None:
            raise _Refusal(
                policy.refuse_all,
                "the registrar refuses all requests for now",
                policy.retry_after,
            )
        if self._backlog() > self.max_backlog:
            raise _Refusal(
                "busy", "too many requests waiting", BUSY_RETRY_AFTER
            )

        csr, subject = _parse_csr(csr_pem)
        _check_signature(csr)
        key = _check_key(csr)
        _check_identity(subject, device_id)
        self._check_device(device_id)

        leaf = self._issue(device_id, csr, subject, key, policy)
        chain = leaf.public_bytes(serialization.Encoding.PEM)
        chain += self.ca.intermediate_pem
        answer = messages.encode_issued(request_id, chain.decode())
        self._remember(device_id, request_id, digest, answer)
        self._count("issued")
        logger.info(
            "%s %s: issued serial %x, valid until %s",
            device_id,
            request_id,
            leaf.serial_number,
            leaf.not_valid_after_utc.isoformat(),
        )
        return answer

    def _repeat(
        self,
        device_id: str,
        request_id: str,
        digest: bytes,
        cached: tuple[bytes, bytes],
    ) -> bytes:
        cached_digest, answer = cached
        if digest != cached_digest:
            raise _Refusal(
                "bad-request", "request id already used for another CSR"
            )
        self._count("repeated")
        logger.info("%s %s: answered again", device_id, request_id)
        return answer

    def _check_device(self, device_id: str) -> None:
        status = self.registry.status(device_id)
        if status is None:
            raise _Refusal("unknown-device", f"{device_id} is not registered")
        if status == REVOKED:
            raise _Refusal("revoked", f"{device_id} is revoked")
        if status == DECOMMISSIONED:
            raise _Refusal("decommissioned", f"{device_id} is decommissioned")

    def _issue(
        self,
        device_id: str,
        csr: x509.CertificateSigningRequest,
        subject: x509.Name,
        key: ec.EllipticCurvePublicKey,
        policy: Policy,
    ) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
        not_before = now - datetime.timedelta(seconds=policy.backdate)
        not_after = now + datetime.timedelta(seconds=policy.granted_lifetime)
        leaf = self.ca.issue_leaf(
            subject,
            key,
            not_before=not_before,
            not_after=not_after,
            eku=_EKU,
            san=san_of(csr),
        )

        # A certificate the registry does not know of is never handed
        # out: revocation works from the registry's records. A device
        # revoked since _check_device gets a refusal, not this leaf.
        try:
            self.registry.record_issuance(
                device_id,
                leaf.serial_number,
                leaf.fingerprint(hashes.SHA256()).hex(),
                leaf.not_valid_before_utc,
                leaf.not_valid_after_utc,
                KIND,
            )
        except OutOfServiceError as exc:
            raise _Refusal(
                exc.status, f"{device_id} is {exc.status}"
            ) from None
        return leaf

    def _remember(
        self, device_id: str, request_id: str, digest: bytes, answer: bytes
    ) -> None:
        with self._lock:
            self._cache[(device_id, request_id)] = (digest, answer)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _refuse(
        self, device_id: str, request_id: str, refusal: _Refusal
    ) -> bytes:
        self._count("refused")
        logger.info(
            "%s %s: refused %s (%s)",
            device_id,
            request_id,
            refusal.reason,
            refusal.detail,
        )
        return messages.encode_refused(
            request_id, refusal.reason, refusal.detail, refusal.retry_after
        )

    def _malformed(
        self, device_id: str, payload: bytes, problem: str
    ) -> bytes | None:
        request_id = _salvage_id(payload)
        if request_id is None:
            self._count("dropped")
            logger.warning(
                "%s: dropped a request without a usable id (%s)",
                device_id,
                problem,
            )
            return None
        return self._refuse(
            device_id, request_id, _Refusal("bad-request", problem)
        )

    def _suppressed(self, device_id: str) -> bool:
        with self._lock:
            if self._drop_responses <= 0:
                return False
            self._drop_responses -= 1
            self._counts["suppressed"] += 1
        logger.info("%s: answer dropped on purpose", device_id)
        return True

    def _backlog(self) -> int:
        session = self._session
        return 0 if session is None else session.messages.qsize()

    def _count(self, what: str) -> None:
        with self._lock:
            self._counts[what] += 1


class _PromptSocket(ssl.SSLSocket):
    """A TLS socket that sends each MQTT packet at once.

    paho leaves Nagle's algorithm on. The PUBACK for a request goes out
    first, and the PUBLISH of its answer then waits for the broker's
    delayed ACK: about 40 ms a request, 25 requests a second at most.
    paho calls do_handshake itself, on the connected TCP socket.
    """

    def do_handshake(self, block: bool = False) -> None:
        self.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().do_handshake(block)


def _unread(inbox: queue.Queue[Message]) -> int:
    count = 0
    while True:
        try:
            message = inbox.get_nowait()
        except queue.Empty:
            return count
        count += message is not _WAKE


def _requester(message: Message) -> str | None:
    # The broker's ACL lets only the device itself publish under its id,
    # so the topic says who sent the request.
    if message.retain:
        return None
    device_id = messages.device_of(message.topic)
    if device_id is None or message.topic != messages.request_topic(device_id):
        return None
    # No device can hold another id: the agent and the registry both
    # keep to this pattern, and its length bounds what gets logged.
    return device_id if DEVICE_ID.fullmatch(device_id) else None


def _salvage_id(payload: bytes) -> str | None:
    """The request id of a malformed request, if it has a valid one."""
    if len(payload) > messages.MAX_MESSAGE_BYTES:
        return None
    try:
        message = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    if not isinstance(message, dict):
        return None

    request_id = message.get("id")
    if not isinstance(request_id, str):
        return None
    try:
        # Encoding checks the id the same way decoding does.
        messages.encode_refused(request_id, "bad-request", "")
    except messages.MessageError:
        return None
    return request_id


def _parse_csr(
    csr_pem: str,
) -> tuple[x509.CertificateSigningRequest, x509.Name]:
    """The CSR and its subject (cryptography parses it anew on each read)."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except (ValueError, UnicodeError, UnsupportedAlgorithm):
        raise _Refusal("bad-request", "csr is not a PEM CSR") from None

    # Parts of a CSR are parsed only when first read; reading them here
    # turns a malformed one into this refusal rather than a failure
    # halfway through issuing.
    try:
        subject, _ = csr.subject, csr.extensions
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise _Refusal("bad-request", f"malformed CSR: {exc}") from None
    return csr, subject


def _check_signature(csr: x509.CertificateSigningRequest) -> None:
    try:
        valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm):
        valid = False
    if not valid:
        raise _Refusal("bad-signature", "the CSR signature does not verify")


def _check_key(
    csr: x509.CertificateSigningRequest,
) -> ec.EllipticCurvePublicKey:
    try:
        key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm):
        key = None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
        key.curve, ec.SECP256R1
    ):
        raise _Refusal("key-type", "the key must be EC P-256")
    return key


def _check_identity(subject: x509.Name, device_id: str) -> None:
    names = _common_names(subject)
    if names != [device_id]:
        shown = ", ".join(repr(n[:64]) for n in names) or "no CN"
        raise _Refusal(
            "identity-mismatch",
            f"the CSR names {shown}, the request came from {device_id}",
        )


def _common_names(name: x509.Name) -> list[str]:
    return [
        str(attribute.value)
        for attribute in name.get_attributes_for_oid(NameOID.COMMON_NAME)
    ]
