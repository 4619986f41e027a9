"""The one root of the board adapter's exceptions, and its family.

The board adapter cannot import device_agent.errors, which is written for
CPython, so it has its own root: a board's main loop catches BoardError
(and OSError, for the network) and reports the step that failed.
"""


class BoardError(Exception):
    """Something the board agent could not do; the message says what."""


class MQTTError(BoardError):
    """The broker refused, or the stream broke the protocol."""


class TransportError(BoardError):
    """The TLS connection could not be set up."""


class SignerError(BoardError):
    """The signer could not make a key, sign or answer."""


class ClockNotSetError(BoardError):
    """No time source has set the clock since boot."""


class StepError(BoardError):
    """A step of the agent failed; ``state`` names it as status does."""

    def __init__(self, state, detail):
        super().__init__(state + ": " + detail)
        self.state = state
        self.detail = detail


# What the errno values a board meets mean; MicroPython's OSError carries
# the number alone. Negative values are Mbed TLS's own codes.
_REASONS = {
    1: "operation not permitted",
    2: "no such file or directory",
    5: "input/output error",
    12: "out of memory",
    13: "permission denied",
    20: "not a directory",
    21: "is a directory",
    28: "no space left on the device",
    103: "connection aborted",
    104: "connection reset by the peer",
    110: "timed out",
    111: "connection refused",
    113: "no route to host",
    116: "timed out",
    -2: "host name not found",
    -202: "host name not found",
    -9984: "certificate verification failed",
    -30592: "the peer ended the handshake with a fatal alert",
}


def os_reason(error):
    """An OSError in words, for a one-line report."""
    number = error.args[0] if error.args else None
    reason = _REASONS.get(number)
    if reason is None:
        return repr(error)
    return reason + " (" + str(number) + ")"
