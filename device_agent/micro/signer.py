"""Where a board's private keys live: the signer interface.

A signer makes P-256 keys in numbered slots and signs SHA-256 digests
with them; the private key never has to be seen by Python. Status output
shows ``protection()`` verbatim so nobody mistakes a key on flash for one
in a secure element.

Software keys are not offered on boards. No MicroPython port has EC key
generation or ECDSA, and the published pure-Python ECDSA libraries do not
run there unchanged: starkbank-ecdsa 2.3.1 stops at import (it reads
``sys.version_info.major``) and, past that, needs ``bit_length``,
``datetime``, ``hmac`` and ``random.SystemRandom``; its modular inverse
tries ``pow(x, -1, n)`` first, which MicroPython answers with 0 instead
of an error, so a patched copy would sign wrongly. python-ecdsa 0.19
needs ``six`` and more of the same. Patching elliptic-curve arithmetic
into shape is writing our own, which we do not do.
"""

from device_agent.micro.errors import SignerError


class Signer:
    """The interface; see ``atecc608.Atecc608`` and the test host signer.

    ``hardware_protected`` is True only when the private key cannot leave
    a secure element.
    """

    kind = "none"
    hardware_protected = False

    def new_key(self, slot):
        """Make a new key in ``slot``; return its public point X || Y."""
        raise NotImplementedError

    def public_key(self, slot):
        """The public point X || Y of the key in ``slot``."""
        raise NotImplementedError

    def sign_digest(self, slot, digest):
        """Sign a 32-byte SHA-256 digest; return r || s (64 bytes)."""
        raise NotImplementedError

    def tls_key(self, slot):
        """The DER private key for the TLS stack, or None if it has none.

        A secure element gives none: the TLS stack must then sign through
        it, which takes firmware with a sign callback.
        """
        raise NotImplementedError

    def protection(self):
        """One line for status: where the key is and whether it can leak."""
        if self.hardware_protected:
            return "hardware-protected (" + self.kind + ")"
        return "NOT hardware-protected (" + self.kind + ")"


def software_signer():
    """Refuse: software keys are unsupported on boards (see the module)."""
    raise SignerError(
        "software keys are unsupported on boards: MicroPython has no ECDSA "
        "and no published pure-Python ECDSA runs on it unchanged; use a "
        "secure element such as the ATECC608"
    )
