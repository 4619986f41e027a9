"""MQTT sessions over mutual TLS, with reconnects that back off."""

from __future__ import annotations

import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from device_agent.core import backoff
from device_agent.errors import SessionError

logger = logging.getLogger(__name__)

_PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}


class Message:
    """A message received on a subscription."""

    __slots__ = ("payload", "qos", "retain", "topic")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain


class Session:
    """One MQTT client identity on one broker.

    "Connected" means the broker sent a successful CONNACK: with TLS 1.3
    a refused client certificate only shows after the handshake returns,
    as a connection lost before CONNACK. Once open, a network thread keeps
    the session alive and reconnects with backoff and jitter, building a
    fresh TLS context each time so a restarted TPM is picked up.
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        context_factory: Callable[[], ssl.SSLContext],
        mqtt_version: str = "5",
        keepalive: int = 60,
        connect_timeout: float = 10.0,
        reconnect_base: float = 1.0,
        reconnect_cap: float = 60.0,
    ) -> None:
        self.host = host
        self.port = port
        self.client_id = client_id
        self.mqtt_version = mqtt_version
        self.keepalive = keepalive
        self.connect_timeout = connect_timeout
        self.reconnect_base = reconnect_base
        self.reconnect_cap = reconnect_cap
        self.messages: queue.Queue[Message] = queue.Queue()
        self.tls_version: str | None = None
        # Set when a reconnect failed on our side (the key or certificate
        # could not be used) rather than on the broker's or the network's.
        self.credential_error = False

        self._context_factory = context_factory
        # Kept across reconnects: building one loads the key, which for a
        # TPM key costs five TPM commands. Dropped after any failed
        # connect, so a restarted TPM or a replaced file is picked up.
        self._context: ssl.SSLContext | None = None
        self._client: mqtt.Client | None = None
        self._connack: ReasonCode | None = None
        # Set by paho's thread on CONNACK and on any disconnect.
        self._changed = threading.Event()
        self._connected = threading.Event()
        self._stop = threading.Event()
        self._last_error: str | None = None
        self._subscriptions: dict[str, int] = {}
        self._handlers: dict[str, Callable[[Message], None]] = {}
        self._acks: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._acks_lock = threading.Lock()
        self._puback_codes: dict[int, ReasonCode] = {}
        self._thread: threading.Thread | None = None
        self._random = random.SystemRandom()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def last_error(self) -> str | None:
        """Why the last connect failed or the link dropped, if it did."""
        return self._last_error

    def open(self) -> None:
        """Connect once, and keep the session up from then on."""
        self._connect_once()
        self._thread = threading.Thread(
            target=self._supervise,
            name=f"session-{self.client_id}",
            daemon=True,
        )
        self._thread.start()

    def publish(
        self, topic: str, payload: bytes, qos: int = 1, timeout: float = 10.0
    ) -> None:
        """Publish and, for QoS 1 and 2, wait until the broker has it."""
        check_topic(topic, wildcards=False)
        client = self._require_client()
        info = client.publish(topic, payload, qos=qos)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise SessionError("lost", f"publish to {topic} failed")
        if not qos:
            return
        try:
            info.wait_for_publish(timeout)
        except RuntimeError as exc:
            raise SessionError("lost", str(exc)) from None
        if not info.is_published():
            raise SessionError("timeout", f"no acknowledgement for {topic}")
        code = self._puback_codes.pop(info.mid, None)
        if code is not None and code.is_failure:
            raise SessionError(
                "refused", f"publish to {topic} refused: {code}", code.value
            )

    def subscribe(
        self,
        topic: str,
        qos: int = 1,
        timeout: float = 10.0,
        handler: Callable[[Message], None] | None = None,
    ) -> None:
        """Subscribe and wait for the broker to grant it.

        Messages matching ``topic`` go to ``handler`` (called on the
        network thread) when one is given, else to :attr:`messages`.
        """
        check_topic(topic, wildcards=True)
        client = self._require_client()
        if handler is not None:
            self._handlers[topic] = handler
        event = threading.Event()
        granted: list[Any] = []
        # The SUBACK can arrive before subscribe() returns its message id;
        # the lock makes the callback wait until the id is registered.
        with self._acks_lock:
            result, mid = client.subscribe(topic, qos=qos)
            if result != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
                raise SessionError("lost", f"subscribe to {topic} failed")
            self._acks[mid] = (event, granted)
        if not event.wait(timeout):
            raise SessionError("timeout", f"no SUBACK for {topic}")
        codes = [int(getattr(c, "value", c)) for c in granted]
        if not codes or any(c >= 0x80 for c in codes):
            name = str(granted[0]) if granted else "no reason"
            raise SessionError(
                "refused", f"subscribe to {topic} refused: {name}", codes[0]
            )
        self._subscriptions[topic] = qos

    def close(self) -> None:
        """Disconnect cleanly and stop the threads."""
        self._stop.set()
        self._changed.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self._connected.clear()
        self._context = None

    def _require_client(self) -> mqtt.Client:
        if self._client is None or not self._connected.is_set():
            raise SessionError("lost", "the session is not connected")
        return self._client

    def _connect_once(self) -> None:
        try:
            self._connect_with_context()
        except BaseException:
            self._context = None
            raise

    def _connect_with_context(self) -> None:
        client = self._new_client()
        self._connack = None
        self._last_error = None
        self._changed.clear()
        target = f"{self.host}:{self.port}"

        try:
            client.connect(self.host, self.port, self.keepalive)
        except ssl.SSLCertVerificationError as exc:
            raise SessionError(
                "tls", f"broker certificate refused: {exc.verify_message}"
            ) from None
        except ssl.SSLError as exc:
            raise SessionError("tls", _ssl_reason(exc)) from None
        except ConnectionRefusedError:
            raise SessionError(
                "unreachable", f"connection refused by {target}"
            ) from None
        except TimeoutError:
            raise SessionError("timeout", f"no answer from {target}") from None
        except OSError as exc:
            raise SessionError(
                "unreachable", f"{target}: {exc.strerror or exc}"
            ) from None

        self.tls_version = self.tls_version_of(client)
        # paho's own thread owns the socket from here on: an SSL socket
        # must not be read and written from two threads at once.
        client.loop_start()
        self._changed.wait(self.connect_timeout)
        code = self._connack
        if code is None or code.is_failure:
            client.disconnect()
            client.loop_stop()
        if code is None:
            if not self._changed.is_set():
                raise SessionError("timeout", f"no CONNACK from {target}")
            raise SessionError("refused", self._closed_reason())
        if code.is_failure:
            raise SessionError("refused", f"CONNACK {code}", int(code.value))

        self._client = client
        self._changed.clear()
        self._connected.set()
        if not client.is_connected():
            self._changed.set()  # lost in the moment since the CONNACK
        logger.info(
            "connected to %s as %s (%s)",
            target,
            self.client_id,
            self.tls_version,
        )

    def _closed_reason(self) -> str:
        """Why the broker hung up between the handshake and CONNACK."""
        error = self._last_error
        if error and error.startswith("TLS alert"):
            return error
        # With TLS 1.3 the broker checks our certificate after our side of
        # the handshake is done, and often hangs up without an alert.
        seen = f" ({error})" if error else ""
        return (
            f"the broker closed the connection before CONNACK{seen}; it "
            "most likely refused our certificate (revoked, expired or "
            "from an unknown CA)"
        )

    @staticmethod
    def tls_version_of(client: mqtt.Client) -> str | None:
        sock = client.socket()
        if isinstance(sock, ssl.SSLSocket):
            return sock.version()
        return None

    def _new_client(self) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=_PROTOCOLS[self.mqtt_version],
            reconnect_on_failure=False,
        )
        if self._context is None:
            self._context = self._context_factory()
        client.tls_set_context(self._context)
        client.connect_timeout = self.connect_timeout
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_publish = self._on_publish
        client.on_log = self._on_log
        return client

    def _supervise(self) -> None:
        """Wait for the link to drop, then reconnect with backoff."""
        attempt = 0
        up_since = time.monotonic()
        while not self._stop.is_set():
            self._changed.wait()
            if self._stop.is_set():
                return
            self._connected.clear()
            old, self._client = self._client, None
            if old is not None:
                old.loop_stop()
            # Only a link that stayed up a while resets the backoff: one that
            # drops soon after each CONNACK (a broker that kicks us, another
            # client taking our id) must not be retried at full speed.
            if time.monotonic() - up_since > self.reconnect_cap:
                attempt = 0
            if self._reconnect(attempt):
                up_since = time.monotonic()
            attempt += 1

    def _reconnect(self, attempt: int) -> bool:
        wait = backoff.delay(
            attempt,
            self.reconnect_base,
            self.reconnect_cap,
            self._random.random(),
        )
        logger.warning(
            "session %s down (%s); reconnecting in %.1f s",
            self.client_id,
            self._last_error or "connection closed",
            wait,
        )
        if self._stop.wait(wait):
            return False
        try:
            self._connect_once()
        except Exception as exc:  # the thread must outlive any failure
            self._last_error = str(exc)
            self.credential_error = not isinstance(exc, SessionError)
            if self.credential_error:
                logger.error(
                    "session %s cannot reconnect: %s", self.client_id, exc
                )
            self._changed.set()
            return False
        self.credential_error = False
        self._restore_subscriptions()
        return True

    def _restore_subscriptions(self) -> None:
        client = self._client
        if client is None:
            return
        for topic, qos in self._subscriptions.items():
            client.subscribe(topic, qos=qos)

    def _on_connect(
        self, client: Any, userdata: Any, flags: Any, code: Any, props: Any
    ) -> None:
        self._connack = code
        self._changed.set()

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, code: Any, props: Any
    ) -> None:
        if code is not None and getattr(code, "is_failure", False):
            self._last_error = self._last_error or f"disconnected: {code}"
        self._changed.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        message = Message(msg.topic, bytes(msg.payload), msg.qos, msg.retain)
        for pattern, handler in list(self._handlers.items()):
            if mqtt.topic_matches_sub(pattern, msg.topic):
                try:
                    handler(message)
                except Exception:  # a handler must not kill paho's thread
                    logger.exception("handler for %s failed", pattern)
                return
        self.messages.put(message)

    def _on_publish(
        self, client: Any, userdata: Any, mid: int, code: Any, props: Any
    ) -> None:
        if isinstance(code, ReasonCode) and code.is_failure:
            if len(self._puback_codes) > 1000:
                self._puback_codes.clear()
            self._puback_codes[mid] = code

    def _on_subscribe(
        self, client: Any, userdata: Any, mid: int, codes: Any, props: Any
    ) -> None:
        with self._acks_lock:
            waiting = self._acks.pop(mid, None)
        if waiting is not None:
            event, granted = waiting
            granted.extend(codes)
            event.set()

    def _on_log(
        self, client: Any, userdata: Any, level: int, text: str
    ) -> None:
        # The first error of an attempt is the cause; later ones, such as
        # "client is not connected", are its consequences.
        if level == mqtt.MQTT_LOG_ERR and self._last_error is None:
            self._last_error = _clean_log(text)
        logger.debug("paho: %s", text)


MAX_TOPIC_BYTES = 65535


def check_topic(topic: str, wildcards: bool) -> None:
    """Refuse a topic (or, with ``wildcards``, a filter) MQTT forbids."""
    try:
        size = len(topic.encode("utf-8"))
    except UnicodeEncodeError:
        raise SessionError("topic", f"{topic!r} is not valid UTF-8") from None
    if not topic or size > MAX_TOPIC_BYTES or "\0" in topic:
        raise SessionError(
            "topic", "a topic must be 1 to 65535 bytes without NUL"
        )
    levels = topic.split("/")
    for index, level in enumerate(levels):
        if not wildcards and ("+" in level or "#" in level):
            raise SessionError(
                "topic", f"{topic!r}: wildcards are for subscribing only"
            )
        if "+" in level and level != "+":
            raise SessionError("topic", f"{topic!r}: '+' must fill a level")
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise SessionError("topic", f"{topic!r}: '#' must end the filter")


def _ssl_reason(exc: ssl.SSLError) -> str:
    reason = exc.reason or str(exc)
    return f"TLS handshake failed: {reason.lower().replace('_', ' ')}"


def _clean_log(text: str) -> str:
    # paho logs socket errors as "failed to receive on socket: [SSL: X] x
    # (_ssl.c:N)"; keep the part a person can act on.
    if "[SSL:" in text:
        text = text.split("]", 1)[-1].split("(_ssl.c", 1)[0].strip()
        return f"TLS alert: {text}"
    return text
