"""The renewal transaction: a new key and certificate, switched in live.

new key -> CSR -> enroll -> verify -> stage -> connect -> commit

Until the commit the operational lineage's ``current`` pointer and the
files it leads to are not touched, so any failure, and a crash at any
point, leaves the working credential as it was. The new key waits under
the ``pending`` pointer; recovery deletes it if it never got a chain.
The caller retires the old generation once the new one has proven itself.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from device_agent import chain, csr, keys
from device_agent.config import Settings
from device_agent.credential import OPERATIONAL, key_store_for_new_key
from device_agent.enroll import Enroller
from device_agent.errors import (
    AgentError,
    ChainError,
    RenewalError,
    StoppedError,
)
from device_agent.session import Session
from device_agent.store import CredentialStore, Generation

logger = logging.getLogger(__name__)

STEPS = ("key", "csr", "enroll", "verify", "stage", "connect", "commit")
RENEWAL_LOCK = ".renewal.lock"

# Crash campaigns kill the agent at a named step to prove recovery; the
# variable names the step, and nothing happens when it is unset.
KILL_AT_ENV = "DEVICE_AGENT_TEST_KILL_AT"


class Renewed:
    """What a successful transaction hands back to the agent."""

    def __init__(
        self,
        generation: Generation,
        leaf: x509.Certificate,
        session: Session,
        previous: Generation | None,
    ) -> None:
        self.generation = generation
        self.leaf = leaf
        self.session = session
        self.previous = previous


def renew(
    settings: Settings,
    enroller: Enroller,
    open_session: Callable[[Generation], Session],
    now: Callable[[], datetime.datetime] | None = None,
) -> Renewed:
    """Run one transaction for the operational identity.

    ``open_session`` builds a session (not yet open) for a generation;
    the transaction opens it and commits only once the broker accepted
    the new credential. Raises RenewalError naming the failed step, or
    StoppedError when a stop broke off a wait; either way nothing is kept.
    """
    clock = now or (lambda: datetime.datetime.now(datetime.UTC))
    store = CredentialStore(settings.state_dir, OPERATIONAL)
    with store.lock(timeout=0.5, name=RENEWAL_LOCK):
        return _Transaction(settings, store, enroller, clock).run(open_session)


class _Transaction:
    def __init__(
        self,
        settings: Settings,
        store: CredentialStore,
        enroller: Enroller,
        clock: Callable[[], datetime.datetime],
    ) -> None:
        self.settings = settings
        self.store = store
        self.enroller = enroller
        self.clock = clock
        self.step = "start"
        self.generation: Generation | None = None
        self.session: Session | None = None

    def run(self, open_session: Callable[[Generation], Session]) -> Renewed:
        try:
            previous, seen = self._begin()
            key_store, key_path = self._make_key()
            request = self._make_csr(key_store, key_path)
            chain_pem = self._enroll(request)
            ordered = self._verify(chain_pem, key_store, key_path)
            self._stage(ordered)
            session = self._connect(open_session)
            self._commit(previous, seen)
        except BaseException as exc:
            self._abandon()
            if isinstance(exc, RenewalError | StoppedError):
                raise
            if isinstance(exc, AgentError):
                raise RenewalError(self.step, str(exc)) from exc
            if isinstance(exc, OSError):
                where = f"{exc.filename}: " if exc.filename else ""
                detail = f"{where}{exc.strerror or exc}"
                raise RenewalError(self.step, detail) from exc
            raise

        assert self.generation is not None
        logger.info(
            "renewed: generation %d, certificate %x valid until %s",
            self.generation.number,
            ordered[0].serial_number,
            ordered[0].not_valid_after_utc,
        )
        return Renewed(self.generation, ordered[0], session, previous)

    def _begin(self) -> tuple[Generation | None, str | None]:
        with self.store.lock():
            stale = self.store.pending()
            if stale is not None and stale == self.store.current():
                self.store.drop_pending()
            elif stale is not None:
                logger.warning(
                    "discarding pending generation %d (from an earlier "
                    "renewal or keygen that got no certificate)",
                    stale.number,
                )
                self.store.discard(stale)
            previous = self.store.current()
        return previous, _seal(previous)

    def _make_key(self) -> tuple[keys.KeyStore, Path]:
        self.step = "key"
        key_store = key_store_for_new_key(self.settings)
        with self.store.lock():
            self.generation = self.store.new_generation()
            key_path = self.generation.key_path_for(key_store.key_suffix)
            key_store.generate(key_path)
            self.store.set_pending(self.generation)
        _checkpoint("key")
        return key_store, key_path

    def _make_csr(self, key_store: keys.KeyStore, key_path: Path) -> bytes:
        self.step = "csr"
        with key_store.signer(key_path) as signer:
            request = csr.build(
                signer,
                self.settings.device_id,
                self.settings.device_uri,
                self.settings.serial,
            )
        _checkpoint("csr")
        return request.public_bytes(serialization.Encoding.PEM)

    def _enroll(self, request: bytes) -> bytes:
        self.step = "enroll"
        chain_pem = self.enroller.enroll(request, self.settings.enroll_timeout)
        _checkpoint("enroll")
        return chain_pem

    def _verify(
        self, chain_pem: bytes, key_store: keys.KeyStore, key_path: Path
    ) -> list[x509.Certificate]:
        self.step = "verify"
        anchors = chain.load_anchors(self.settings.require("anchor_file"))
        public_key = key_store.public_key(key_path)
        ordered = chain.order_chain(chain.read_bundle(chain_pem), public_key)
        chain.verify(
            ordered,
            anchors,
            self.settings.device_id,
            self._judging_time(ordered[0]),
        )
        _checkpoint("verify")
        return ordered

    def _judging_time(self, leaf: x509.Certificate) -> datetime.datetime:
        """Now, or the leaf's notBefore when it lies within the skew.

        A CA whose clock runs a little ahead issues certificates that
        start in our future; within the allowed skew that is no reason to
        refuse them.
        """
        now = self.clock()
        ahead = (leaf.not_valid_before_utc - now).total_seconds()
        if 0 < ahead <= self.settings.clock_skew:
            return leaf.not_valid_before_utc
        if ahead > self.settings.clock_skew:
            raise ChainError(
                "not-yet-valid",
                f"the certificate starts {ahead:.0f} s from now, beyond "
                f"the allowed skew of {self.settings.clock_skew:g} s",
            )
        return now

    def _stage(self, ordered: list[x509.Certificate]) -> None:
        self.step = "stage"
        assert self.generation is not None
        with self.store.lock():
            self.store.stage(self.generation, chain.to_pem(ordered))
        _checkpoint("stage")

    def _connect(
        self, open_session: Callable[[Generation], Session]
    ) -> Session:
        self.step = "connect"
        assert self.generation is not None
        self.session = open_session(self.generation)
        self.session.open()
        _checkpoint("connect")
        return self.session

    def _commit(self, previous: Generation | None, seen: str | None) -> None:
        self.step = "commit"
        assert self.generation is not None
        with self.store.lock():
            now_current = self.store.current()
            if now_current != previous or _seal(now_current) != seen:
                raise RenewalError(
                    "commit",
                    "the operational credential was changed on disk by "
                    "someone else during the renewal; it was left as found",
                )
            self.store.commit(self.generation)
        _checkpoint("commit")

    def _abandon(self) -> None:
        """Undo what this transaction made; the current credential stays."""
        if self.session is not None:
            self.session.close()
        generation = self.generation
        if generation is None or generation == self.store.current():
            return
        try:
            with self.store.lock():
                self.store.discard(generation)
        except AgentError as exc:
            logger.warning(
                "could not discard generation %d: %s", generation.number, exc
            )


def _seal(generation: Generation | None) -> str | None:
    """A digest of a generation's files, to notice changes by others."""
    if generation is None:
        return None
    digest = hashlib.sha256(str(generation.number).encode())
    for path in sorted(generation.path.iterdir()):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _checkpoint(step: str) -> None:
    logger.debug("renewal step %s done", step)
    if os.environ.get(KILL_AT_ENV) == step:
        os.kill(os.getpid(), signal.SIGKILL)
