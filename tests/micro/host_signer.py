"""The test side of device_agent/micro/hostsigner.py: keys for a device.

A loopback TCP service that stands in for a secure element in the
end-to-end test: it makes P-256 keys with ``cryptography``, signs
digests with them and, because the MicroPython unix port's TLS stack
needs it, hands out the private key in DER.
"""

import socketserver
import threading

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    Prehashed,
    decode_dss_signature,
)


def point(key):
    """The public point of ``key`` as X || Y, 64 bytes."""
    numbers = key.public_key().public_numbers()
    return numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")


class HostSigner:
    """Keys by slot, served on 127.0.0.1 until ``stop``."""

    def __init__(self):
        self.keys = {}
        self.lock = threading.Lock()
        self.requests = []
        signer = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self):
                line = self.rfile.readline().decode().strip()
                self.wfile.write((signer.answer(line) + "\n").encode())

        self.server = socketserver.ThreadingTCPServer(
            ("127.0.0.1", 0), Handler
        )
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(
            target=self.server.serve_forever, daemon=True
        )
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def new_key(self, slot):
        with self.lock:
            self.keys[slot] = ec.generate_private_key(ec.SECP256R1())
            return self.keys[slot]

    def answer(self, line):
        parts = line.split()
        self.requests.append(parts[0] if parts else "")
        try:
            verb, slot = parts[0], int(parts[1])
            if verb == "NEW":
                return "OK " + point(self.new_key(slot)).hex()
            key = self.keys[slot]
            if verb == "PUB":
                return "OK " + point(key).hex()
            if verb == "SIGN":
                digest = bytes.fromhex(parts[2])
                der = key.sign(digest, ec.ECDSA(Prehashed(hashes.SHA256())))
                r, s = decode_dss_signature(der)
                return (
                    "OK "
                    + (r.to_bytes(32, "big") + s.to_bytes(32, "big")).hex()
                )
            if verb == "KEY":
                der = key.private_bytes(
                    serialization.Encoding.DER,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
                return "OK " + der.hex()
        except (IndexError, KeyError, ValueError) as error:
            return "ERR " + repr(error)
        return "ERR unknown verb"
