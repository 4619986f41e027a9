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
