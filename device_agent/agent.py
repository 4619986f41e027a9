"""The daemon: stay connected, send heartbeats, renew before expiry."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import random
import select
import signal
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from cryptography import x509

from device_agent import chain, credential, keys
from device_agent.config import Settings
from device_agent.core import clock, policy
from device_agent.credential import FACTORY, OPERATIONAL
from device_agent.enroll.mqtt import MqttEnroller
from device_agent.errors import (
    AgentError,
    EnrollError,
    KeyStoreError,
    RenewalError,
    SessionError,
    StoppedError,
    StoreError,
    TPMError,
)
from device_agent.hook import HookRunner
from device_agent.renewal import renew
from device_agent.session import Outbox, Session, StopSignal
from device_agent.store import CredentialStore, Generation, write_atomic
from device_agent.systemd import Notifier

logger = logging.getLogger(__name__)

AGENT_LOCK = ".agent.lock"
PID_FILE = "agent.pid"
LAST_GOOD_FILE = "last-good-time"
# The longest the loop sleeps before it looks at the wall clock again, so
# suspend, resume and clock steps are noticed within this many seconds.
MAX_SLEEP = 5.0
NEVER = float("inf")
# Rounds of refusals of every credential before the device asks for
# service, and the backoff step that stands for "as slow as allowed".
REFUSED_ROUNDS = 3
NEVER_RAMP = 64


class RestartError(AgentError):
    """The process cannot recover by itself; a new one would."""

    exit_code = 75


class Agent:
    """Keeps one device connected with its freshest credential."""

    def __init__(
        self,
        load_settings: Callable[[], Settings],
        now: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._load_settings = load_settings
        self.settings = load_settings()
        self.now = now
        self.rng = rng or random.SystemRandom()
        self.notifier = Notifier()

        self.session: Session | None = None
        self.identity: tuple[str, Generation] | None = None
        self.leaf: x509.Certificate | None = None
        self.retire_after_proof = False
        # One outbox for every session this agent opens, so heartbeats
        # queued while offline survive reconnects and renewals alike.
        self.outbox = Outbox(self.settings.offline_queue)
        self.heartbeats = 0
        self.hooks = HookRunner()

        self.state = "starting"
        self.clock_state = "trusted"
        self.clock_reason = ""
        self.last_good: float | None = None
        # The notAfter of a certificate the broker or the CA vouched for a
        # moment ago, and when: a clock past it is wrong, not the cert.
        self._fresh: tuple[float, float] | None = None
        self._good_since: float | None = None
        self.next_renewal = NEVER
        self.next_heartbeat = 0.0
        self.next_connect = 0.0
        self.connect_attempt = 0
        self.refused_rounds = 0
        self.failures = 0
        self.tick_failures = 0
        self.last_result = "none yet"
        self._status_written: tuple[str, float] | None = None
        self.renewals = policy.LoopDetector(floor=self.settings.renew_floor)

        self._wake = Wakeup()
        self._stop = False
        self.stopping = StopSignal()
        self._renew_now = False
        self._reload = False
        # Requests to renew now (SIGUSR1) answered so far, and the last
        # answer: ``renew --now`` waits for the count to grow, since the
        # same refusal twice leaves ``last_result`` unchanged.
        self.renew_requests_answered = 0
        self.renew_answer: str | None = None

    def run(self) -> None:
        """Run until SIGTERM or SIGINT."""
        store = CredentialStore(self.settings.state_dir, FACTORY)
        with store.lock(timeout=0.5, name=AGENT_LOCK), self._pid_file():
            self._install_signals()
            # What a previous run wrote is replaced before anything that
            # can block: status must not show a dead process's state.
            self._write_status_quietly()
            try:
                self._recover()
                self.last_good = self._read_last_good()
                logger.info("agent started for %s", self.settings.device_id)
                # Ready means running, not connected: a board that boots
                # without network must not be killed for it by a start
                # timeout. STATUS says whether it is connected.
                self.notifier.send(ready="1", status=self._summary())
                self._check_watchdog()
                while not self._stop:
                    self._guarded_tick()
                    self._sleep()
            finally:
                self._shutdown()

    def _guarded_tick(self) -> None:
        """One tick; a failure is reported and retried, never fatal.

        A disk that is full, a file made immutable, a TPM that is gone:
        each is logged and shown in status, and the next tick tries
        again after a pause that grows while the failures go on.
        """
        try:
            self._tick()
        except StoppedError as exc:
            # Asked to stop in the middle of a wait: not a failure.
            self.last_result = str(exc)
            logger.info("%s", exc)
        except RestartError as exc:
            self.state = "restarting"
            self.last_result = str(exc)
            self._write_status_quietly()
            raise
        except Exception as exc:
            self.tick_failures += 1
            self.state = "error"
            self.last_result = f"error: {_describe(exc)}"
            logger.error("%s", self.last_result)
            if self.tick_failures > 1 or not isinstance(exc, AgentError):
                logger.debug("tick failed", exc_info=True)
            pause = min(2.0**self.tick_failures, self.settings.retry_cap)
            self._wake.wait(pause)
            self._write_status_quietly()
        else:
            self.tick_failures = 0

    def _tick(self) -> None:
        if self._reload:
            self._apply_reload()
        now = self.now()
        self._check_clock(now)
        if self.session is None or not self.session.connected:
            self._ensure_session(now)
        if self.session is not None and self.session.connected:
            if self.state not in ("needs_service", "renewal_loop"):
                self.state = "connected"
            now = self.now()
            if now >= self.next_heartbeat:
                self._heartbeat(now)
            now = self.now()
            if self._renewal_due(now):
                self._renew(now)
        elif self.now() >= self.next_heartbeat:
            self._heartbeat(self.now())
        if self._renew_now and self.state == "needs_service":
            # No session to renew over, and none will come soon: the
            # broker refuses every credential. Say so rather than keep
            # the request waiting for a connection.
            self._renew_now = False
            self._answer_request(
                "not attempted: the device needs service; the broker "
                "refuses every credential it holds"
            )
        self._write_status_quietly()
        self.notifier.send(watchdog="1", status=self._summary())

    def _check_watchdog(self) -> None:
        """Warn when one wait of the agent can outlast the watchdog.

        A connect or an enrollment blocks the loop for up to its timeout,
        and no watchdog ping goes out meanwhile.
        """
        interval = self.notifier.watchdog_interval
        if interval is None:
            return
        longest = max(
            self.settings.connect_timeout, self.settings.enroll_timeout
        )
        if longest >= interval:
            logger.warning(
                "connect_timeout or enroll_timeout (%g s) is not below "
                "half the service's WatchdogSec (%g s): a slow broker "
                "will get the agent killed by the watchdog",
                longest,
                interval * 2,
            )

    def _sleep(self) -> None:
        deadline = min(self.next_heartbeat, self.next_renewal)
        if self.session is None or not self.session.connected:
            deadline = min(deadline, self.next_connect)
        wait = min(max(deadline - self.now(), 0.05), MAX_SLEEP)
        if self.notifier.watchdog_interval is not None:
            wait = min(wait, self.notifier.watchdog_interval)
        self._wake.wait(wait)

    # -- credentials and sessions -------------------------------------

    def _recover(self) -> None:
        for lineage in (FACTORY, OPERATIONAL):
            store = CredentialStore(self.settings.state_dir, lineage)
            with store.lock():
                store.recover()
        if self._candidates(self.now()) == []:
            raise StoreError(
                "no credential installed: bring the device up first "
                "(keygen, csr, install-chain)"
            )

    def _candidates(self, now: float) -> list[tuple[str, Generation]]:
        """Credentials to try, best first: operational, then factory."""
        found = []
        for lineage in (OPERATIONAL, FACTORY):
            store = CredentialStore(self.settings.state_dir, lineage)
            generation = store.current()
            if generation is None:
                continue
            leaf = _leaf(generation)
            stranger = (
                None
                if leaf is None
                else (credential.other_device(leaf, self.settings.device_id))
            )
            if stranger is not None:
                name = "factory" if lineage == FACTORY else "operational"
                self.last_result = f"{name}: {stranger}"
                logger.warning("%s", self.last_result)
                continue
            expired = (
                leaf is None or leaf.not_valid_after_utc.timestamp() <= now
            )
            # An untrusted clock cannot say a certificate expired.
            if (
                lineage == OPERATIONAL
                and expired
                and self.clock_state == "trusted"
            ):
                continue
            found.append((lineage, generation))
        return found

    def _ensure_session(self, now: float) -> None:
        if self.session is not None:
            if self.session.credential_error:
                self._drop_session(
                    f"this credential cannot be used: "
                    f"{self.session.last_error}"
                )
            elif self._refused(self.session):
                self._drop_session("the broker refuses this credential")
            else:
                self.state = "reconnecting"
                self.last_result = (
                    f"link down: {self.session.last_error or 'reconnecting'}"
                )
                return  # the session reconnects by itself
        if now < self.next_connect:
            return
        self.state = "connecting"
        self._write_status_quietly()  # a connect can take connect_timeout
        candidates = self._candidates(now)
        refused = self._connect_any(candidates)
        if refused is None:
            return
        attempt = self.connect_attempt
        if candidates and refused == len(candidates):
            self.refused_rounds += 1
        else:
            self.refused_rounds = 0
        if self.refused_rounds >= REFUSED_ROUNDS:
            # The broker keeps refusing every credential we hold: most
            # likely they were revoked. Hammering it cannot help; say so
            # and try again only at the slowest pace, in case the fault
            # was the broker's (a stale CRL refuses everybody).
            self.state = "needs_service"
            self.last_result = (
                f"the broker refused every credential on this device "
                f"{self.refused_rounds} times in a row (revoked?); it "
                f"needs service. Last error: {self.last_result}"
            )
            logger.error("%s", self.last_result)
            attempt = NEVER_RAMP
        delay = policy.retry_delay(
            attempt,
            now,
            NEVER,
            NEVER,
            base=min(1.0, self.settings.retry_base),
            cap=self.settings.retry_cap,
            unit=self.rng.random(),
        )
        self.connect_attempt += 1
        self.next_connect = now + delay

    def _connect_any(
        self, candidates: list[tuple[str, Generation]]
    ) -> int | None:
        """Connect with the first credential that works.

        Returns None once connected, else how many credentials the
        broker refused.
        """
        refused = 0
        for lineage, generation in candidates:
            try:
                session = self._new_session(generation, lineage)
                session.open()
            except StoppedError:
                raise
            except SessionError as exc:
                self._connect_failed(lineage, generation, exc)
                if exc.reason in ("refused", "tls"):
                    refused += 1
                    continue
                # Unreachable, or a broker we do not trust: another
                # credential cannot change that, and it is no refusal.
                break
            except AgentError as exc:
                self._connect_failed(lineage, generation, exc)
                self._check_tpm_provider(generation, exc)
                continue
            self._use(session, lineage, generation)
            return None
        return refused

    def _new_session(self, generation: Generation, lineage: str) -> Session:
        session = credential.open_session(self.settings, generation, lineage)
        session.outbox = self.outbox
        session.stop = self.stopping
        return session

    def _connect_failed(
        self, lineage: str, generation: Generation, exc: AgentError
    ) -> None:
        logger.warning("%s credential %d: %s", lineage, generation.number, exc)
        self.last_result = f"connect failed: {exc}"

    def _check_tpm_provider(
        self, generation: Generation, exc: AgentError
    ) -> None:
        """Restart when the TPM answers but TLS cannot use its key.

        The OpenSSL provider keeps its own connection to the TPM, made
        when it loaded; once that broke it does not recover inside the
        process, while a fresh process works at once.
        """
        key = generation.key_path()
        if key is None or keys.kind_of(key) != "tpm":
            return
        if not isinstance(exc, KeyStoreError) or isinstance(exc, TPMError):
            return
        if keys.tpm_store(self.settings.tcti).answers():
            raise RestartError(
                f"TLS cannot use the TPM key although the TPM answers "
                f"({exc}); restarting to reset the TPM provider"
            )

    def _use(
        self, session: Session, lineage: str, generation: Generation
    ) -> None:
        self.session = session
        self.identity = (lineage, generation)
        self.leaf = _leaf(generation)
        self.connect_attempt = 0
        self.refused_rounds = 0
        self.state = "connected"
        self.next_heartbeat = self.now()
        self._schedule_renewal()
        self._write_status_quietly()
        self.notifier.send(status=self._summary())
        logger.info(
            "connected with the %s credential, generation %d",
            lineage,
            generation.number,
        )

    def _vouched(self) -> None:
        if self.leaf is not None:
            not_after = self.leaf.not_valid_after_utc.timestamp()
            self._fresh = (not_after, time.monotonic())

    def _refused(self, session: Session) -> bool:
        error = session.last_error or ""
        return not session.connected and (
            "alert" in error or "CONNACK" in error
        )

    def _drop_session(self, why: str) -> None:
        logger.warning("closing the session: %s", why)
        if self.session is not None:
            self.session.close()
        self.session = None
        self.identity = None

    def _heartbeat(self, now: float) -> None:
        """Send a heartbeat (QoS 1), or queue it while the link is down.

        Queued ones go out in order once the link is back, so a monitor
        sees the gap filled; only one the broker acknowledged right away
        proves a new credential and lets the old keys go.
        """
        self.heartbeats += 1
        lineage, generation = self.identity or (None, None)
        payload = json.dumps(
            {
                "time": _iso(now),
                "seq": self.heartbeats,
                "identity": lineage,
                "generation": generation.number if generation else None,
                "serial": f"{self.leaf.serial_number:x}"
                if self.leaf
                else None,
            }
        ).encode()
        topic = self.settings.heartbeat_topic
        self.next_heartbeat = now + self.settings.heartbeat_interval
        try:
            if self.session is None:
                self.outbox.put(topic, payload, qos=1)
                return
            # A heartbeat that waits for its acknowledgement longer than
            # the interval would hold up the next; it stays queued.
            delivered = self.session.publish(
                topic,
                payload,
                queue=True,
                timeout=min(10.0, max(1.0, self.settings.heartbeat_interval)),
            )
        except SessionError as exc:
            # A full queue was logged once when it filled up.
            if exc.reason != "queue_full":
                logger.warning("heartbeat not delivered: %s", exc)
            return
        if delivered and self.retire_after_proof:
            self._retire_old()

    def _retire_old(self) -> None:
        """The new credential carried a heartbeat: destroy the old keys."""
        store = CredentialStore(self.settings.state_dir, OPERATIONAL)
        with store.lock():
            retired = store.retire_others()
        self.retire_after_proof = False
        if retired:
            logger.info("retired operational generations %s", retired)

    # -- renewal --------------------------------------------------------

    def _renewal_due(self, now: float) -> bool:
        if self._renew_now:
            return True
        if self.clock_state != "trusted" or self.state == "needs_service":
            return False
        return now >= self.next_renewal

    def _schedule_renewal(self) -> None:
        if self.identity is None or self.leaf is None:
            return
        lineage, generation = self.identity
        if lineage != OPERATIONAL:
            self.next_renewal = self.now()  # enroll an operational one
            return
        # A CA may backdate notBefore far into the past; the lifetime that
        # matters runs from when this device got the certificate.
        received = generation.chain_path.stat().st_mtime
        start = max(self.leaf.not_valid_before_utc.timestamp(), received)
        self.next_renewal = policy.renewal_time(
            min(start, self.leaf.not_valid_after_utc.timestamp()),
            self.leaf.not_valid_after_utc.timestamp(),
            fraction=self.settings.renew_fraction,
            jitter=self.settings.renew_jitter,
            unit=self.rng.random(),
            floor=self.settings.renew_floor,
        )
        logger.info("next renewal at %s", _iso(self.next_renewal))

    def _renew(self, now: float) -> None:
        assert self.session is not None
        requested, self._renew_now = self._renew_now, False
        in_service = self.state == "needs_service"
        try:
            self._attempt_renewal(now, requested)
        except BaseException as exc:
            if requested:
                self._answer_request(f"error: {_describe(exc)}")
            raise
        if not requested:
            return
        answer = self.last_result
        if in_service and self.state == "needs_service":
            answer += " (one attempt made although the device needs service)"
        self._answer_request(answer)

    def _answer_request(self, answer: str) -> None:
        self.renew_requests_answered += 1
        self.renew_answer = answer

    def _attempt_renewal(self, now: float, requested: bool = False) -> None:
        """Renew now; ``requested`` when an operator asked for it.

        What an operator asks for is no loop: it is neither judged by
        the loop detector nor counted by it, and it clears the history,
        since someone has now looked at the device.
        """
        assert self.session is not None
        operational = (
            self.identity is not None and self.identity[0] == OPERATIONAL
        )
        if requested:
            self.renewals.reset()
        elif (
            operational
            and self.leaf is not None
            and self.renewals.is_loop(
                now,
                self.leaf.not_valid_before_utc.timestamp(),
                self.leaf.not_valid_after_utc.timestamp(),
            )
        ):
            self.state = "renewal_loop"
            self.next_renewal = NEVER
            self.last_result = "stopped: renewing fresh certificates"
            logger.error("renewal loop detected; renewals stopped")
            return

        enroller = MqttEnroller(self.session, self.settings.device_id)
        started = time.monotonic()
        try:
            renewed = renew(
                self.settings,
                enroller,
                lambda g: self._new_session(g, OPERATIONAL),
            )
        except RenewalError as exc:
            self._renewal_failed(now, exc)
            return

        old, self.session = self.session, renewed.session
        self.identity = (OPERATIONAL, renewed.generation)
        self.leaf = renewed.leaf
        self._vouched()
        old.close()
        self.retire_after_proof = True
        self.failures = 0
        if not requested:
            self.renewals.record(now)
        verb = "renewed" if operational else "enrolled"
        self.last_result = (
            f"{verb} at {_iso(now)}: certificate "
            f"{renewed.leaf.serial_number:x} in "
            f"{time.monotonic() - started:.2f} s"
        )
        self.state = "connected"
        self.next_heartbeat = self.now()
        self._schedule_renewal()
        self._run_hook(renewed.leaf)

    def _renewal_failed(self, now: float, exc: RenewalError) -> None:
        self.failures += 1
        self.last_result = f"failed: {exc}"
        cause = exc.__cause__
        if isinstance(cause, EnrollError) and cause.permanent:
            self.state = "needs_service"
            self.next_renewal = NEVER
            logger.error("renewal refused for good: %s", exc)
            return
        retry_after = (
            cause.retry_after if isinstance(cause, EnrollError) else None
        )
        not_after, lifetime = NEVER, NEVER
        if (
            self.leaf is not None
            and self.identity
            and self.identity[0] == OPERATIONAL
        ):
            not_after = self.leaf.not_valid_after_utc.timestamp()
            lifetime = not_after - self.leaf.not_valid_before_utc.timestamp()
        delay = policy.retry_delay(
            self.failures - 1,
            now,
            not_after,
            lifetime,
            base=self.settings.retry_base,
            cap=self.settings.retry_cap,
            unit=self.rng.random(),
            retry_after=retry_after,
        )
        self.next_renewal = now + delay
        logger.warning("%s; next attempt in %.1f s", exc, delay)

    def _run_hook(self, leaf: x509.Certificate) -> None:
        if not self.settings.renewal_hook:
            return
        self.hooks.start(
            self.settings.renewal_hook,
            {
                "RENEWED_SERIAL": f"{leaf.serial_number:x}",
                "RENEWED_NOT_AFTER": leaf.not_valid_after_utc.isoformat(),
                "RENEWED_DEVICE_ID": self.settings.device_id,
            },
        )

    # -- clock, status, signals -------------------------------------------

    def _check_clock(self, now: float) -> None:
        if self.clock_state != "trusted":
            # Status tells the operator to delete the known-good time
            # once the clock is right: that must work without a restart.
            self.last_good = self._read_last_good()
        leaves = [_leaf(g) for _, g in self._current_generations()]
        not_befores = [
            leaf.not_valid_before_utc.timestamp() for leaf in leaves if leaf
        ]
        fresh = []
        if self._fresh is not None and time.monotonic() - self._fresh[1] < 60:
            fresh.append(self._fresh[0])
        state, reason = clock.assess(
            now,
            self.last_good,
            not_befores,
            self.settings.clock_skew,
            fresh_not_afters=fresh,
        )
        if state != "trusted":
            reason = (
                f"{reason}; if the clock is right, delete "
                f"{self.settings.state_dir / LAST_GOOD_FILE}"
            )
        if state != self.clock_state:
            logger.warning("clock %s: %s", state, reason or "sane again")
        self.clock_state, self.clock_reason = state, reason
        if state == "trusted":
            # Measured by the monotonic clock, so a wall clock stepped
            # forward under a running agent cannot drag it along.
            elapsed = None
            if self._good_since is not None:
                elapsed = time.monotonic() - self._good_since
            advanced = clock.advance(self.last_good, now, elapsed)
            if self.last_good is None or advanced - self.last_good >= 60:
                self.last_good = advanced
                self._good_since = time.monotonic()
                self._write_last_good(advanced)

    def _current_generations(self) -> Iterator[tuple[str, Generation]]:
        for lineage in (FACTORY, OPERATIONAL):
            generation = CredentialStore(
                self.settings.state_dir, lineage
            ).current()
            if generation is not None:
                yield lineage, generation

    def _read_last_good(self) -> float | None:
        path = self.settings.state_dir / LAST_GOOD_FILE
        try:
            value = clock.decode_last_good(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            value, why = None, str(exc)
        else:
            why = "not a time this agent wrote"
        if value is None:
            logger.warning(
                "%s unreadable (%s): the clock is judged without it and the "
                "file is written anew",
                path,
                why,
            )
        return value

    def _write_last_good(self, value: float) -> None:
        path = self.settings.state_dir / LAST_GOOD_FILE
        write_atomic(path, clock.encode_last_good(value).encode(), 0o600)

    def _summary(self) -> str:
        if self.clock_state != "trusted":
            return "clock_untrusted"
        return self.state

    def _write_status(self) -> None:
        """Write status.json when anything changed, else once a minute.

        It is replaced without fsync: it is a report, rebuilt on every
        start, and rewriting it durably every few seconds would wear
        the flash of a small board.
        """
        lineage, generation = self.identity or (None, None)
        report: dict[str, Any] = {
            "pid": os.getpid(),
            "state": self._summary(),
            "clock": self.clock_state,
            "clock_reason": self.clock_reason,
            "identity": lineage,
            "generation": generation.number if generation else None,
            "serial": f"{self.leaf.serial_number:x}" if self.leaf else None,
            "not_after": self.leaf.not_valid_after_utc.isoformat()
            if self.leaf
            else None,
            "next_renewal": _iso(self.next_renewal),
            "last_result": self.last_result,
            "failures_in_row": self.failures,
            "connect_failures_in_row": self.connect_attempt,
            "renew_now": {
                "answered": self.renew_requests_answered,
                "answer": self.renew_answer,
            },
            "offline_queue": {
                "held": len(self.outbox),
                "limit": self.outbox.limit,
                "dropped": self.outbox.dropped,
            },
        }
        content = json.dumps(report, sort_keys=True)
        now = time.monotonic()
        if self._status_written is not None:
            last_content, written_at = self._status_written
            if last_content == content and now - written_at < 60:
                return
        report["updated"] = _iso(self.now())
        data = json.dumps(report, indent=2, sort_keys=True).encode()
        write_atomic(self.settings.status_file, data, 0o644, durable=False)
        self._status_written = (content, now)

    def _write_status_quietly(self) -> None:
        try:
            self._write_status()
        except (OSError, AgentError) as exc:
            logger.warning("status not written: %s", _describe(exc))

    def _install_signals(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_reload)
        signal.signal(signal.SIGUSR1, self._on_renew)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stop = True
        self._wake.set()
        # In a wait for the network, this raises StoppedError to end it.
        self.stopping.request()

    def _on_reload(self, signum: int, frame: FrameType | None) -> None:
        self._reload = True
        self._wake.set()

    def _on_renew(self, signum: int, frame: FrameType | None) -> None:
        self._renew_now = True
        self._wake.set()

    def _apply_reload(self) -> None:
        self._reload = False
        try:
            settings = self._load_settings()
        except AgentError as exc:
            logger.error("reload refused, keeping the old config: %s", exc)
            return
        if settings.state_dir != self.settings.state_dir:
            logger.error("reload refused: state_dir cannot change")
            return
        self.settings = settings
        self.outbox.limit = settings.offline_queue
        logger.info("config reloaded")
        if self.session is not None:
            self._drop_session("config reloaded")
        self.next_connect = 0.0

    @contextlib.contextmanager
    def _pid_file(self) -> Iterator[None]:
        path = self.settings.state_dir / PID_FILE
        write_atomic(path, f"{os.getpid()}\n".encode(), 0o644)
        try:
            yield
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _shutdown(self) -> None:
        self.notifier.send(stopping="1")
        self.hooks.stop_all()
        if self.session is not None:
            self.session.close()
        self.state = "stopped"
        self._status_written = None
        self._write_status_quietly()
        logger.info(
            "agent stopped: %d heartbeats made, %d messages still queued "
            "(never sent), %d dropped on a full queue",
            self.heartbeats,
            len(self.outbox),
            self.outbox.dropped,
        )


class Wakeup:
    """Ends the agent's sleep early: from a signal handler or a thread.

    A threading.Event cannot serve: a handler runs in the main thread
    between two of its steps, and Event.set() takes a lock the main
    thread may hold at that moment (inside Event.wait()), which would
    deadlock the agent for good. A pipe needs no lock.
    """

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        weakref.finalize(self, _close_all, self._read, self._write)

    def set(self) -> None:
        # A full pipe has a wake-up pending already.
        with contextlib.suppress(BlockingIOError):
            os.write(self._write, b"\0")

    def wait(self, seconds: float) -> None:
        """Sleep up to ``seconds``, less if woken; clears the wake-up."""
        select.select([self._read], [], [], max(seconds, 0.0))
        with contextlib.suppress(BlockingIOError):
            while os.read(self._read, 4096):
                pass


def _close_all(*descriptors: int) -> None:
    for descriptor in descriptors:
        with contextlib.suppress(OSError):
            os.close(descriptor)


def running_pid(state_dir: Path) -> int | None:
    """The pid of the agent running on this state directory, if any."""
    store = CredentialStore(state_dir, FACTORY)
    try:
        with store.lock(timeout=0, name=AGENT_LOCK):
            return None
    except StoreError:
        pass
    try:
        return int((state_dir / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None


def _leaf(generation: Generation) -> x509.Certificate | None:
    try:
        return chain.read_bundle(generation.chain_path.read_bytes())[0]
    except (OSError, AgentError):
        return None


def _iso(timestamp: float) -> str | None:
    if timestamp == NEVER:
        return None
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC)
    return moment.isoformat(timespec="seconds")


def _describe(exc: BaseException) -> str:
    """One line for an error, naming the file when there is one."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    return str(exc) or type(exc).__name__
