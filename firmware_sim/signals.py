"""Stop signals that unwind a command the way Ctrl-C does."""

from __future__ import annotations

import contextlib
import logging
import signal
from collections.abc import Iterable, Iterator
from types import FrameType
from typing import Any

from firmware_sim.errors import SimError

logger = logging.getLogger(__name__)

# Signals that end a command the way Ctrl-C does, stopping what it
# started.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class StoppedError(SimError):
    """A signal ended the command; it exits as the signal would have."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum


class _StopSignal(BaseException):
    """Raised by a stop signal; like KeyboardInterrupt, no Exception."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def stopped_by_signals(
    signals: Iterable[signal.Signals] = STOP_SIGNALS,
) -> Iterator[None]:
    """Turn SIGTERM and SIGHUP (or ``signals``) into StoppedError inside.

    Without this, such a signal ends the process at once and leaves
    behind whatever it started (swtpm, mosquitto, agents) and their
    directories; raised where the process was, it unwinds through
    every cleanup like Ctrl-C does, and only then becomes the error.
    """

    def interrupt(signum: int, frame: FrameType | None) -> None:
        # Cleanup takes a few seconds; a second signal must not cut it
        # short, so the rest are ignored until it is done.
        for number in previous:
            signal.signal(number, signal.SIG_IGN)
        raise _StopSignal(signum)

    # A signal ignored on purpose, as nohup does with SIGHUP, stays so.
    previous: dict[signal.Signals, Any] = {}
    for number in signals:
        if signal.getsignal(number) is not signal.SIG_IGN:
            previous[number] = signal.signal(number, interrupt)

    try:
        yield
    except _StopSignal as stop:
        raise StoppedError(stop.signum) from None
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
