"""Enrollment over MQTT: a CSR on the device's own request topic."""

from __future__ import annotations

import logging
import secrets
import threading
import time

from device_agent.core import messages
from device_agent.errors import EnrollError, SessionError
from device_agent.session import Message, Session

logger = logging.getLogger(__name__)


class MqttEnroller:
    """Asks the registrar for a chain over an open session.

    Each request carries a fresh random id; responses with another id,
    malformed ones and oversize ones are logged and ignored, so a stale or
    forged answer cannot be taken for ours.
    """

    def __init__(self, session: Session, device_id: str) -> None:
        self.session = session
        self.device_id = device_id
        self._lock = threading.Lock()
        self._waiting: str | None = None
        self._answer: dict[str, object] | None = None
        self._answered = threading.Event()
        self._ignored: list[str] = []
        self._subscribed = False

    def enroll(self, csr_pem: bytes, timeout: float) -> bytes:
        request_id = secrets.token_hex(16)
        with self._lock:
            self._waiting = request_id
            self._answer = None
            self._answered.clear()
            self._ignored = []
        self._subscribe(timeout)

        payload = messages.encode_request(request_id, csr_pem.decode())
        started = time.monotonic()
        try:
            self.session.publish(
                messages.request_topic(self.device_id), payload, qos=1
            )
        except SessionError as exc:
            raise EnrollError("unreachable", str(exc)) from None
        logger.info("enrollment request %s sent", request_id)

        left = max(timeout - (time.monotonic() - started), 0.0)
        with self.session.stop.waiting("the registrar's answer"):
            answered = self._answered.wait(left)
        if not answered:
            noise = f" (ignored: {self._ignored[-1]})" if self._ignored else ""
            raise EnrollError(
                "timeout",
                f"no answer from the registrar in {timeout:g} s{noise}",
            )
        return self._result()

    def _subscribe(self, timeout: float) -> None:
        if self._subscribed:
            return
        try:
            self.session.subscribe(
                messages.response_topic(self.device_id),
                timeout=timeout,
                handler=self._on_response,
            )
        except SessionError as exc:
            raise EnrollError("unreachable", str(exc)) from None
        self._subscribed = True

    def _on_response(self, message: Message) -> None:
        try:
            answer = messages.decode_response(message.payload)
        except messages.MessageError as exc:
            self._ignore(f"malformed response: {exc}")
            return
        with self._lock:
            if answer["id"] != self._waiting:
                self._ignore(f"response for another request {answer['id']}")
                return
            self._waiting = None
            self._answer = answer
        self._answered.set()

    def _ignore(self, why: str) -> None:
        # The timeout error repeats the last of these, so a command
        # still fails with one line; the daemon logs them with -v.
        logger.info("enrollment: %s", why)
        self._ignored.append(why)

    def _result(self) -> bytes:
        answer = self._answer or {}
        if answer.get("status") == messages.ISSUED:
            return str(answer["chain"]).encode()
        reason = str(answer.get("reason", "internal"))
        retry_after = answer.get("retry_after")
        raise EnrollError(
            reason,
            f"registrar refused: {reason}: {answer.get('detail', '')}",
            retry_after=retry_after
            if isinstance(retry_after, int | float)
            else None,
            permanent=reason in messages.PERMANENT,
        )
