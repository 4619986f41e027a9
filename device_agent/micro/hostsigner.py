"""TEST ONLY: a signer whose keys live in another process on this host.

It stands in for a secure element where there is none, in the end-to-end
test under the MicroPython unix port: the test process makes the keys
with ``cryptography`` and signs for the device over a loopback socket
(tests/micro/host_signer.py is the other end). It hands out the private
key in DER, because the unix port's TLS stack needs one, so its keys are
reported as NOT hardware-protected. Never use it on a board.

Protocol, one line each way: ``NEW <slot>``, ``PUB <slot>``, ``SIGN
<slot> <hex digest>``, ``KEY <slot>``; answers ``OK <hex>`` or ``ERR
<text>``.
"""

import binascii
import socket

from device_agent.micro.errors import SignerError
from device_agent.micro.signer import Signer

_LOOPBACK = "127.0.0.1"


class HostSigner(Signer):
    kind = "test host signer, key outside any secure element"
    hardware_protected = False

    def __init__(self, port, host=_LOOPBACK):
        if host != _LOOPBACK:
            raise SignerError("the host signer is for loopback tests only")
        self.port = port

    def new_key(self, slot):
        return self._ask("NEW " + str(slot))

    def public_key(self, slot):
        return self._ask("PUB " + str(slot))

    def sign_digest(self, slot, digest):
        text = binascii.hexlify(digest).decode()
        return self._ask("SIGN " + str(slot) + " " + text)

    def tls_key(self, slot):
        return self._ask("KEY " + str(slot))

    def _ask(self, line):
        address = socket.getaddrinfo(_LOOPBACK, self.port)[0][-1]
        connection = socket.socket()
        try:
            connection.connect(address)
            connection.write((line + "\n").encode())
            answer = connection.readline().decode().strip()
        finally:
            connection.close()
        if not answer.startswith("OK "):
            raise SignerError("host signer: " + (answer or "no answer"))
        return binascii.unhexlify(answer[3:])
