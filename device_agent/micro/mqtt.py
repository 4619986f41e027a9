"""A small MQTT 3.1.1 client for boards: connect, publish, subscribe, ping.

The MicroPython unix port has no umqtt, and umqtt.simple leaves TLS
set-up to the caller anyway, so this client takes any connected stream
with ``read`` and ``write`` (a TLS socket from ``transport``). It speaks
QoS 0 and 1, which is all enrollment needs; QoS 1 messages that arrive
while it waits for an acknowledgement are kept for ``wait``.
"""

import time

from device_agent.micro.errors import MQTTError

CONNECT = 0x10
CONNACK = 0x20
PUBLISH = 0x30
PUBACK = 0x40
SUBSCRIBE = 0x82
SUBACK = 0x90
PINGREQ = 0xC0
PINGRESP = 0xD0
DISCONNECT = 0xE0

_TIMEOUT_ERRNOS = (11, 110, 116)
_MAX_REMAINING = 268435455


class Client:
    """One MQTT session over a connected stream.

    ``settimeout`` is the raw socket's, used to wait for the next packet
    without blocking forever; the TLS layer reads through it.
    """

    def __init__(self, client_id, keepalive=60):
        self.client_id = client_id
        self.keepalive = keepalive
        self.stream = None
        self.settimeout = None
        self.queued = []
        self._packet_id = 0

    def connect(self, stream, settimeout=None, timeout=10):
        """Send CONNECT and wait for CONNACK; MQTTError if refused."""
        self.stream = stream
        self.settimeout = settimeout
        body = b"\x00\x04MQTT\x04\x02" + _u16(self.keepalive)
        body += _string(self.client_id)
        self._send(CONNECT, body)
        kind, payload = self._read_packet(timeout)
        if kind != CONNACK or len(payload) != 2:
            raise MQTTError("expected CONNACK")
        if payload[1] != 0:
            raise MQTTError("broker refused: return code " + str(payload[1]))

    def publish(self, topic, payload, qos=0, timeout=10):
        """Publish; with QoS 1, return once the broker acknowledged."""
        if qos not in (0, 1):
            raise ValueError("qos must be 0 or 1")
        header = PUBLISH | (qos << 1)
        body = _string(topic)
        packet_id = None
        if qos:
            packet_id = self._next_id()
            body += _u16(packet_id)
        self._send(header, body + payload)
        if qos:
            self._await(PUBACK, packet_id, timeout)

    def subscribe(self, topic, qos=1, timeout=10):
        """Subscribe and return the granted QoS; MQTTError if refused."""
        packet_id = self._next_id()
        body = _u16(packet_id) + _string(topic) + bytes([qos])
        self._send(SUBSCRIBE, body)
        payload = self._await(SUBACK, packet_id, timeout)
        granted = payload[2] if len(payload) > 2 else 0x80
        if granted == 0x80:
            raise MQTTError("subscription to " + topic + " refused")
        return granted

    def ping(self, timeout=10):
        self._send(PINGREQ, b"")
        self._await(PINGRESP, None, timeout)

    def wait(self, timeout):
        """The next (topic, payload) received, or None after ``timeout``."""
        if self.queued:
            return self.queued.pop(0)
        deadline = time.ticks_add(time.ticks_ms(), int(timeout * 1000))
        while True:
            left = time.ticks_diff(deadline, time.ticks_ms())
            if left <= 0:
                return None
            packet = self._read_packet(left / 1000, optional=True)
            if packet is None:
                return None
            message = self._handle(packet[0], packet[1])
            if message is not None:
                return message

    def disconnect(self):
        try:
            self._send(DISCONNECT, b"")
        except (OSError, MQTTError):
            pass  # closing anyway
        self.close()

    def close(self):
        if self.stream is not None:
            try:
                self.stream.close()
            except OSError:
                pass  # already gone
        self.stream = None

    def _await(self, kind, packet_id, timeout):
        deadline = time.ticks_add(time.ticks_ms(), int(timeout * 1000))
        while True:
            left = time.ticks_diff(deadline, time.ticks_ms())
            if left <= 0:
                raise MQTTError("no answer from the broker in time")
            packet = self._read_packet(left / 1000, optional=True)
            if packet is None:
                continue
            got, payload = packet
            if got == kind and (
                packet_id is None or payload[:2] == _u16(packet_id)
            ):
                return payload
            message = self._handle(got, payload)
            if message is not None:
                self.queued.append(message)

    def _handle(self, kind, payload):
        # A PUBLISH becomes a message (acknowledged if QoS 1); any other
        # packet arriving unasked is dropped.
        if kind & 0xF0 != PUBLISH:
            return None
        qos = (kind >> 1) & 0x03
        length = (payload[0] << 8) | payload[1]
        topic = bytes(payload[2 : 2 + length]).decode()
        rest = payload[2 + length :]
        if qos:
            self._send(PUBACK, bytes(rest[:2]))
            rest = rest[2:]
        return topic, bytes(rest)

    def _next_id(self):
        self._packet_id = self._packet_id % 65535 + 1
        return self._packet_id

    def _send(self, header, body):
        if self.stream is None:
            raise MQTTError("not connected")
        if len(body) > _MAX_REMAINING:
            raise ValueError("packet too large")
        self._write(bytes([header]) + _remaining_length(len(body)) + body)

    def _write(self, data):
        view = memoryview(data)
        while view:
            written = self.stream.write(view)
            if written is None:
                continue
            view = view[written:]

    def _read_packet(self, timeout, optional=False):
        first = self._read_first(timeout)
        if first is None:
            if optional:
                return None
            raise MQTTError("no answer from the broker in time")
        length = 0
        shift = 0
        while True:
            byte = self._read_exact(1)[0]
            length |= (byte & 0x7F) << shift
            if not byte & 0x80:
                break
            shift += 7
            if shift > 21:
                raise MQTTError("malformed remaining length")
        return first, self._read_exact(length)

    def _read_first(self, timeout):
        if self.settimeout is not None:
            self.settimeout(max(timeout, 0.01))
        try:
            data = self.stream.read(1)
        except OSError as error:
            if error.args and error.args[0] in _TIMEOUT_ERRNOS:
                return None
            raise
        finally:
            if self.settimeout is not None:
                self.settimeout(30)
        if data is None:
            return None
        if not data:
            raise MQTTError("the broker closed the connection")
        return data[0]

    def _read_exact(self, count):
        data = b""
        while len(data) < count:
            chunk = self.stream.read(count - len(data))
            if chunk is None:
                continue
            if not chunk:
                raise MQTTError("the broker closed the connection")
            data += chunk
        return data


def _u16(value):
    return bytes([(value >> 8) & 0xFF, value & 0xFF])


def _string(text):
    data = text.encode() if type(text) is str else bytes(text)
    return _u16(len(data)) + data


def _remaining_length(length):
    out = bytearray()
    while True:
        byte = length & 0x7F
        length >>= 7
        out.append(byte | 0x80 if length else byte)
        if not length:
            return bytes(out)
