"""A signer backed by a Microchip ATECC608 secure element over I2C.

This is the small part of the chip's command set the agent needs: wake,
GenKey (a new P-256 key in a slot, returning its public point), Nonce in
pass-through mode (loads the digest to sign) and Sign (external message).
Packets and the CRC follow the chip's datasheet. The slots must have been
configured, and the configuration zone locked, at manufacturing to hold
private keys that GenKey may write and Sign may use.

It has not run against a chip: there was no hardware where it was
written. The command layer follows the datasheet, but execution delays
and the word-address handling should be checked on a board first (see
examples/esp32.md).
"""

import time

from device_agent.micro.errors import SignerError
from device_agent.micro.signer import Signer

ADDRESS = 0x60
_COMMAND = 0x03
_SLEEP = 0x01

GENKEY = 0x40
NONCE = 0x16
SIGN = 0x41
GENKEY_PRIVATE = 0x04
GENKEY_PUBLIC = 0x00
NONCE_PASSTHROUGH = 0x03
SIGN_EXTERNAL = 0x80

# Longest execution times from the datasheet, in milliseconds.
_WAIT_MS = {GENKEY: 115, NONCE: 7, SIGN: 70}
_WAKE_REPLY = b"\x04\x11\x33\x43"
_POLL_MS = 2


def crc16(data):
    """The chip's CRC-16 (polynomial 0x8005, bits taken LSB first)."""
    crc = 0
    for byte in data:
        for bit in range(8):
            data_bit = (byte >> bit) & 1
            crc_bit = crc >> 15
            crc = (crc << 1) & 0xFFFF
            if data_bit != crc_bit:
                crc ^= 0x8005
    return bytes([crc & 0xFF, crc >> 8])


def packet(opcode, param1, param2, data=b""):
    """A command packet: count, opcode, params, data and CRC."""
    body = bytes([7 + len(data), opcode, param1, param2 & 0xFF, param2 >> 8])
    body += data
    return body + crc16(body)


def parse_reply(reply):
    """The data of a reply, after its count and CRC were checked."""
    if len(reply) < 4 or reply[0] != len(reply):
        raise SignerError("ATECC608 reply has a bad length")
    if crc16(reply[:-2]) != reply[-2:]:
        raise SignerError("ATECC608 reply has a bad CRC")
    data = reply[1:-2]
    if len(data) == 1 and data[0] != 0:
        raise SignerError(f"ATECC608 status 0x{data[0]:02x}")
    return data


class Atecc608(Signer):
    """Keys in ATECC608 slots, reached through a ``machine.I2C`` bus."""

    kind = "ATECC608"
    hardware_protected = True

    def __init__(self, i2c, address=ADDRESS):
        self.i2c = i2c
        self.address = address

    def new_key(self, slot):
        return self._run(GENKEY, GENKEY_PRIVATE, slot, b"", 64)

    def public_key(self, slot):
        return self._run(GENKEY, GENKEY_PUBLIC, slot, b"", 64)

    def sign_digest(self, slot, digest):
        if len(digest) != 32:
            raise SignerError("the digest must be 32 bytes")
        self._run(NONCE, NONCE_PASSTHROUGH, 0, bytes(digest), 1)
        # Sign must follow Nonce without sleeping, or TempKey is lost.
        return self._command(SIGN, SIGN_EXTERNAL, slot, b"", 64)

    def tls_key(self, slot):
        return None

    def _run(self, opcode, param1, param2, data, size):
        self._wake()
        try:
            return self._command(opcode, param1, param2, data, size)
        finally:
            self._sleep()

    def _command(self, opcode, param1, param2, data, size):
        message = packet(opcode, param1, param2, data)
        self.i2c.writeto(self.address, bytes([_COMMAND]) + message)
        time.sleep_ms(_WAIT_MS[opcode])
        reply = self._read(size + 3)
        found = parse_reply(reply)
        if len(found) != size:
            raise SignerError("ATECC608 answered with the wrong length")
        return bytes(found)

    def _read(self, size):
        for _ in range(50):
            try:
                return self.i2c.readfrom(self.address, size)
            except OSError:
                time.sleep_ms(_POLL_MS)
        raise SignerError("ATECC608 does not answer")

    def _wake(self):
        # Holding SDA low for the wake time: a write to address 0 at the
        # bus speed does it and is not acknowledged.
        try:
            self.i2c.writeto(0, b"\x00")
        except OSError:
            pass  # address 0 never acknowledges
        time.sleep_ms(2)
        reply = self._read(4)
        if bytes(reply) != _WAKE_REPLY:
            raise SignerError("ATECC608 did not wake")

    def _sleep(self):
        try:
            self.i2c.writeto(self.address, bytes([_SLEEP]))
        except OSError:
            pass  # it sleeps by itself after its watchdog time
