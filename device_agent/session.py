"""MQTT sessions over mutual TLS, with reconnects that back off."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import itertools
import logging
import queue
import random
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.reasoncodes import ReasonCode

from device_agent.core import backoff
from device_agent.errors import SessionError, StoppedError

logger = logging.getLogger(__name__)

_PROTOCOLS = {"5": mqtt.MQTTv5, "3.1.1": mqtt.MQTTv311}
DEFAULT_OFFLINE_QUEUE = 1000


class StopSignal:
    """A request to stop that also ends a wait in progress.

    A signal handler calls :meth:`request`. An event cannot wake a
    wait on the network, since a TLS handshake blocks in a system call;
    so while the main thread is inside :meth:`waiting`, the request
    raises StoppedError from the handler, which breaks off that call.
    Anywhere else the request is only noted, and the next wait is
    refused at once. Other threads' waits are never broken off: the
    handler runs, and raises, in the main thread only.
    """

    def __init__(self) -> None:
        self.requested = False
        self._waits: list[str] = []

    def request(self) -> None:
        self.requested = True
        if self._waits:
            waiting_for = self._waits[-1]
            self._waits.clear()  # one exception per wait, not one per signal
            raise StoppedError(waiting_for)

    @contextlib.contextmanager
    def waiting(self, waiting_for: str) -> Iterator[None]:
        """Let a stop request end what runs inside, naming what it awaited."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        if self.requested:
            raise StoppedError(waiting_for)
        self._waits.append(waiting_for)
        try:
            yield
        finally:
            if self._waits:
                self._waits.pop()


class Message:
    """A message received on a subscription."""

    __slots__ = ("payload", "qos", "retain", "topic")

    def __init__(self, topic: str, payload: bytes, qos: int, retain: bool):
        self.topic = topic
        self.payload = payload
        self.qos = qos
        self.retain = retain


@dataclasses.dataclass(eq=False)
class Outgoing:
    """A message accepted for delivery and not yet acknowledged."""

    number: int
    topic: str
    payload: bytes
    qos: int
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    refused: ReasonCode | None = None


class Outbox:
    """Messages waiting for the link or for their acknowledgement.

    Bounded: at most ``limit`` messages are held, waiting or in flight;
    one more is refused with SessionError("queue_full") and counted in
    :attr:`dropped`, so a caller always knows what will not arrive, and
    nothing a caller was told is on its way is ever dropped to make
    room. One outbox can serve the successive sessions of an agent, so a
    renewal that replaces the session loses nothing either. paho's own
    queue is not used for this: it lives in a client, and every connect
    makes a new client.
    """

    def __init__(self, limit: int = DEFAULT_OFFLINE_QUEUE) -> None:
        self.limit = limit
        self.dropped = 0
        self._waiting: collections.deque[Outgoing] = collections.deque()
        self._in_flight: dict[tuple[int, int], Outgoing] = {}
        self._acked_early: dict[tuple[int, int], ReasonCode | None] = {}
        self._numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._full = False

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting) + len(self._in_flight)

    def put(self, topic: str, payload: bytes, qos: int) -> Outgoing:
        """Accept a message at the end of the queue, or refuse it."""
        with self._lock:
            held = len(self._waiting) + len(self._in_flight)
            if held < self.limit:
                message = Outgoing(next(self._numbers), topic, payload, qos)
                self._waiting.append(message)
                return message
            self.dropped += 1
            first, self._full = not self._full, True
        if first:
            logger.warning(
                "offline queue full (%d messages): refusing new messages "
                "until the broker acknowledges some",
                self.limit,
            )
        raise SessionError(
            "queue_full",
            f"offline queue full ({self.limit} messages); message to "
            f"{topic} dropped ({self.dropped} so far)",
        )

    def take(self) -> Outgoing | None:
        with self._lock:
            return self._waiting.popleft() if self._waiting else None

    def put_front(self, message: Outgoing) -> None:
        with self._lock:
            self._waiting.appendleft(message)

    def sent(self, token: int, mid: int, message: Outgoing) -> None:
        """``message`` went out as ``mid`` on connection ``token``."""
        with self._lock:
            if (token, mid) in self._acked_early:
                code = self._acked_early.pop((token, mid))
                self._finish(message, code)
            else:
                self._in_flight[(token, mid)] = message

    def acked(self, token: int, mid: int, code: ReasonCode | None) -> None:
        """The broker acknowledged ``mid`` on connection ``token``."""
        with self._lock:
            message = self._in_flight.pop((token, mid), None)
            if message is not None:
                self._finish(message, code)
                return
            # The acknowledgement can come before sent() is called, or be
            # for a message published without the queue; forget() or the
            # size limit clears those.
            if len(self._acked_early) > 1000:
                self._acked_early.clear()
            self._acked_early[(token, mid)] = code

    def forget(self, token: int, mid: int) -> None:
        with self._lock:
            self._acked_early.pop((token, mid), None)

    def put_back(self, token: int) -> int:
        """Queue again, in their order, what connection ``token`` lost."""
        with self._lock:
            lost = [key for key in self._in_flight if key[0] == token]
            messages = [self._in_flight.pop(key) for key in lost]
            self._acked_early = {
                key: code
                for key, code in self._acked_early.items()
                if key[0] != token
            }
            waiting = sorted(
                [*messages, *self._waiting], key=lambda m: m.number
            )
            self._waiting = collections.deque(waiting)
        return len(messages)

    def _finish(self, message: Outgoing, code: ReasonCode | None) -> None:
        if code is not None and code.is_failure:
            message.refused = code
        message.done.set()
        if self._full:
            self._full = False
            logger.info(
                "offline queue has room again; %d messages dropped so far",
                self.dropped,
            )


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
        outbox: Outbox | None = None,
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
        # Messages published with queue=True wait here while the link is
        # down; an owner may share one outbox between its sessions.
        self.outbox = outbox or Outbox()
        # An owner that handles SIGTERM puts its own here, so that a stop
        # ends a wait for the broker instead of waiting out its timeout.
        self.stop = StopSignal()

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
        # Guards the start of _thread against close() and a second start.
        self._supervisor_lock = threading.Lock()
        self._opened_at: float | None = None
        self._random = random.SystemRandom()
        # Names each paho client (each connection), so that messages in
        # flight on a connection that dropped can be queued again.
        self._tokens = itertools.count(1)
        self._token = 0
        self._flush_lock = threading.Lock()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def last_error(self) -> str | None:
        """Why the last connect failed or the link dropped, if it did."""
        return self._last_error

    def open(self) -> None:
        """Connect once, and keep the session up from then on.

        The thread that reconnects starts only when the link first
        drops: starting it here would cost every connect a thread
        start-up, and every session an idle thread while it stays up.
        """
        self._connect_once()
        self.flush()
        with self._supervisor_lock:
            self._opened_at = time.monotonic()
        if self._changed.is_set():
            self._start_supervisor()

    def _start_supervisor(self) -> None:
        """Start the reconnecting thread, once, if the session is open."""
        with self._supervisor_lock:
            if self._stop.is_set() or self._opened_at is None:
                return
            if self._thread is not None:
                return
            self._thread = threading.Thread(
                target=self._supervise,
                args=(self._opened_at,),
                name=f"session-{self.client_id}",
                daemon=True,
            )
            self._thread.start()

    def publish(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        timeout: float = 10.0,
        queue: bool = False,
    ) -> bool:
        """Publish and, for QoS 1 and 2, wait until the broker has it.

        Without ``queue`` a message that cannot be delivered now raises
        SessionError. With it (QoS 1 and 2 only) the message goes to the
        outbox when the link is down, or back to it when the link drops
        before the broker answered, and is sent when the link is back:
        the result is True once the broker acknowledged it and False
        while it waits; a full outbox raises SessionError("queue_full").
        """
        check_topic(topic, wildcards=False)
        if queue and qos:
            return self._publish_queued(topic, payload, qos, timeout)
        client = self._require_client()
        info = client.publish(topic, payload, qos=qos)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise SessionError("lost", f"publish to {topic} failed")
        if not qos:
            return True
        try:
            with self.stop.waiting(f"the broker to acknowledge {topic}"):
                info.wait_for_publish(timeout)
        except RuntimeError as exc:
            raise SessionError("lost", str(exc)) from None
        finally:
            self.outbox.forget(self._token, info.mid)
        if not info.is_published():
            raise SessionError("timeout", f"no acknowledgement for {topic}")
        code = self._puback_codes.pop(info.mid, None)
        if code is not None and code.is_failure:
            raise SessionError(
                "refused", f"publish to {topic} refused: {code}", code.value
            )
        return True

    def _publish_queued(
        self, topic: str, payload: bytes, qos: int, timeout: float
    ) -> bool:
        message = self.outbox.put(topic, payload, qos)
        if not self.connected:
            return False
        self.flush()
        # A link that drops meanwhile puts the message back in the queue;
        # the caller learns that at once rather than after the timeout.
        deadline = time.monotonic() + timeout
        with self.stop.waiting(f"the broker to acknowledge {topic}"):
            while not message.done.wait(0.1):
                if not self.connected or time.monotonic() >= deadline:
                    return False
        if message.refused is not None:
            code = message.refused
            raise SessionError(
                "refused", f"publish to {topic} refused: {code}", code.value
            )
        return True

    def flush(self) -> int:
        """Hand every waiting message to the link, oldest first.

        Returns how many went out; the rest wait for the next connect.
        """
        sent = 0
        with self._flush_lock:
            client = self._client
            if client is None or not self.connected:
                return 0
            token = self._token
            while (message := self.outbox.take()) is not None:
                info = client.publish(
                    message.topic, message.payload, qos=message.qos
                )
                if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                    self.outbox.put_front(message)
                    break
                self.outbox.sent(token, info.mid, message)
                sent += 1
        return sent

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
        with self.stop.waiting(f"the broker to grant {topic}"):
            granted_in_time = event.wait(timeout)
        if not granted_in_time:
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
        with self._supervisor_lock:
            thread = self._thread
        if thread is not None:
            thread.join(timeout=5.0)
        client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
            self.outbox.put_back(self._token)
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

        with self.stop.waiting(f"the broker at {target}"):
            self._open_link(client, target)
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
        self._token = client.user_data_get()
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

    def _open_link(self, client: mqtt.Client, target: str) -> None:
        """Connect, hand the socket to paho's thread, await the CONNACK."""
        try:
            client.connect(self.host, self.port, self.keepalive)
        except ssl.SSLCertVerificationError as exc:
            # Our side refused the broker: the same for every credential
            # we hold, and no sign that the broker refuses us.
            raise SessionError(
                "untrusted",
                f"broker certificate refused: {exc.verify_message} (check "
                "ca_file and server_name)",
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
        try:
            # paho's own thread owns the socket from here on: an SSL
            # socket must not be read and written from two threads.
            client.loop_start()
            self._changed.wait(self.connect_timeout)
        except StoppedError:
            client.disconnect()
            client.loop_stop()
            raise

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
            userdata=next(self._tokens),
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

    def _supervise(self, opened_at: float) -> None:
        """Wait for the link to drop, then reconnect with backoff."""
        attempt = 0
        up_since: float | None = opened_at
        while not self._stop.is_set():
            self._changed.wait()
            if self._stop.is_set():
                return
            self._connected.clear()
            old, self._client = self._client, None
            if old is not None:
                old.loop_stop()
                requeued = self.outbox.put_back(self._token)
                if requeued:
                    logger.info("%d messages in flight queued again", requeued)
            # Only a link that stayed up a while resets the backoff: one that
            # drops soon after each CONNACK (a broker that kicks us, another
            # client taking our id) must not be retried at full speed. It is
            # judged once, when the link drops, so that the failed attempts
            # that follow keep backing off.
            if up_since is not None:
                if time.monotonic() - up_since > self.reconnect_cap:
                    attempt = 0
                up_since = None
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
        self.flush()
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
        self._start_supervisor()

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
        reason = code if isinstance(code, ReasonCode) else None
        self.outbox.acked(userdata, mid, reason)
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
    # mosquitto drops the connection over a control character in a
    # topic as a malformed packet, so such a topic is refused here.
    if any(c < " " or "\x7f" <= c <= "\x9f" for c in topic):
        raise SessionError("topic", f"{topic!r} holds a control character")
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
