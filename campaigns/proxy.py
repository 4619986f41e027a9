"""A loopback TCP proxy that fails on demand, for network campaigns.

It sits between an agent and its broker on 127.0.0.1 and forwards bytes
both ways until told otherwise: ``refuse`` closes the listening socket
(connections are refused, as by a host whose broker is down), ``stall``
holds every byte in both directions without closing anything,
``reject`` accepts connections and resets them at once without calling
the server (a host whose broker is down, with every attempt counted),
``reset_all`` and ``close_all`` end every open connection with a TCP
reset or a clean close, and ``cut_handshakes`` resets the next few
connections once the server has started to answer, that is in the
middle of the TLS handshake. One thread accepts, one thread per
connection pumps; counters and the accept times say what happened.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import select
import socket
import struct
import threading
import time

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
CHUNK = 65536
POLL = 0.05


@dataclasses.dataclass
class Counters:
    """What the proxy saw; read them, or copy them with ``snapshot``."""

    accepted: int = 0
    upstream_refused: int = 0
    cut_in_handshake: int = 0
    reset: int = 0
    closed: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


class _Link:
    """One client connection and its connection to the server."""

    def __init__(
        self, client: socket.socket, server: socket.socket, accepted: float
    ) -> None:
        self.client = client
        self.server = server
        self.accepted = accepted
        self.answered = False
        self.cut_when_answered = False
        self.done = threading.Event()

    def end(self, reset: bool) -> None:
        if self.done.is_set():
            return
        self.done.set()
        for sock in (self.client, self.server):
            if reset:
                # Linger on, zero seconds: close sends RST, not FIN.
                with contextlib.suppress(OSError):
                    sock.setsockopt(
                        socket.SOL_SOCKET,
                        socket.SO_LINGER,
                        struct.pack("ii", 1, 0),
                    )
            with contextlib.suppress(OSError):
                sock.close()


class Proxy:
    """Forwards ``127.0.0.1:port`` to ``127.0.0.1:upstream``."""

    def __init__(self, port: int, upstream: int) -> None:
        self.port = port
        self.upstream = upstream
        self.counters = Counters()
        self._links: list[_Link] = []
        # Every accepted connection: (monotonic time, the link or None
        # when it was rejected or the server could not be reached).
        self.history: list[tuple[float, _Link | None]] = []
        self._rejecting = threading.Event()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._acceptor: threading.Thread | None = None
        self._stalled = threading.Event()
        self._cuts_armed = 0
        self._stop = threading.Event()

    def start(self) -> None:
        """Listen and forward; the port is bound before this returns."""
        self._stop.clear()
        self.accept()

    def stop(self) -> None:
        self._stop.set()
        self.refuse()
        self.close_all()

    def accept(self) -> None:
        """Listen again after ``refuse``."""
        with self._lock:
            if self._listener is not None:
                return
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((HOST, self.port))
            listener.listen(64)
            self._listener = listener
        self._acceptor = threading.Thread(
            target=self._accept_loop, args=(listener,), daemon=True
        )
        self._acceptor.start()

    def refuse(self) -> None:
        """Close the listening socket: new connections are refused."""
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is not None:
            # shutdown wakes the thread blocked in accept(); close alone
            # may leave it waiting on a socket that still listens.
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        if self._acceptor is not None:
            self._acceptor.join(timeout=2.0)
            self._acceptor = None

    def reject(self) -> None:
        """Reset every new connection at once; the server is not called."""
        self._rejecting.set()

    def admit(self) -> None:
        """Forward new connections again after ``reject``."""
        self._rejecting.clear()

    def stall(self) -> None:
        """Hold every byte, both ways, on old and new connections."""
        self._stalled.set()

    def resume(self) -> None:
        self._stalled.clear()

    def reset_all(self) -> int:
        """End every open connection with a TCP reset."""
        return self._end_all(reset=True)

    def close_all(self) -> int:
        """End every open connection with a clean close."""
        return self._end_all(reset=False)

    def cut_handshakes(self, count: int) -> None:
        """Reset the next ``count`` connections once the server answers."""
        with self._lock:
            self._cuts_armed = count

    def attempts_between(self, start: float, end: float) -> list[float]:
        """When connections were accepted in ``[start, end)``."""
        with self._lock:
            return [t for t, _ in self.history if start <= t < end]

    def kept_through(self, start: float) -> bool:
        """Whether a connection made before ``start`` is still open."""
        with self._lock:
            return any(
                link is not None and not link.done.is_set()
                for accepted, link in self.history
                if accepted < start
            )

    def first_kept_since(self, start: float) -> float | None:
        """When the first connection after ``start`` that is still open
        was accepted: the reconnect that worked."""
        with self._lock:
            for accepted, link in self.history:
                if accepted < start or link is None:
                    continue
                if not link.done.is_set():
                    return accepted
        return None

    def snapshot(self) -> Counters:
        with self._lock:
            return dataclasses.replace(self.counters)

    def _end_all(self, reset: bool) -> int:
        with self._lock:
            links, self._links = self._links, []
        ended = 0
        for link in links:
            if not link.done.is_set():
                link.end(reset)
                ended += 1
        with self._lock:
            if reset:
                self.counters.reset += ended
            else:
                self.counters.closed += ended
        return ended

    def _accept_loop(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # refuse() closed the listener
            accepted = time.monotonic()
            with self._lock:
                self.counters.accepted += 1
            if self._rejecting.is_set():
                with self._lock:
                    self.counters.reset += 1
                    self.history.append((accepted, None))
                _Link(client, client, accepted).end(reset=True)
                continue
            threading.Thread(
                target=self._serve, args=(client, accepted), daemon=True
            ).start()

    def _serve(self, client: socket.socket, accepted: float) -> None:
        try:
            server = socket.create_connection((HOST, self.upstream), 5.0)
        except OSError:
            with self._lock:
                self.counters.upstream_refused += 1
                self.history.append((accepted, None))
            client.close()
            return
        link = _Link(client, server, accepted)
        with self._lock:
            self._links.append(link)
            self.history.append((accepted, link))
            if self._cuts_armed > 0:
                self._cuts_armed -= 1
                link.cut_when_answered = True
        try:
            self._pump(link)
        finally:
            link.end(reset=False)

    def _pump(self, link: _Link) -> None:
        peers = {link.client: link.server, link.server: link.client}
        while not link.done.is_set() and not self._stop.is_set():
            if self._stalled.is_set():
                time.sleep(POLL)
                continue
            try:
                ready, _, _ = select.select(list(peers), [], [], POLL)
            except (OSError, ValueError):
                return
            for sock in ready:
                try:
                    data = sock.recv(CHUNK)
                except OSError:
                    return
                if not data:
                    return
                if sock is link.server and link.cut_when_answered:
                    with self._lock:
                        self.counters.cut_in_handshake += 1
                    link.end(reset=True)
                    return
                try:
                    peers[sock].sendall(data)
                except OSError:
                    return
                with self._lock:
                    if sock is link.client:
                        self.counters.bytes_up += len(data)
                    else:
                        self.counters.bytes_down += len(data)
