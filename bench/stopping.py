"""How a benchmark or campaign run as a script ends on a stop signal.

Ctrl-C, SIGTERM and SIGHUP all unwind the run from wherever it was, so
that every ``with`` block stops what it started (swtpm, mosquitto, the
agents) and removes its directories; then one line says why it ended,
and the exit status is the one a shell reports for that signal.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
from collections.abc import Callable
from typing import ParamSpec

from firmware_sim.signals import StoppedError, stopped_by_signals

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# What a shell reports for a command stopped by SIGINT (128 + 2).
INTERRUPTED = 128 + signal.SIGINT

P = ParamSpec("P")


def stoppable(main: Callable[P, int | None]) -> Callable[P, int]:
    """``main``, ending on a stop signal with one line and 128 + signal.

    The signals are only caught while ``main`` runs; a second one during
    the cleanup is ignored, since cutting the cleanup short is what
    would leave servers and key files behind.
    """

    @functools.wraps(main)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> int:
        try:
            with stopped_by_signals(SIGNALS):
                return main(*args, **kwargs) or 0
        except StoppedError as stop:
            if stop.signum == signal.SIGINT:
                return _ended("interrupted", INTERRUPTED)
            return _ended(str(stop), stop.exit_code)
        except KeyboardInterrupt:
            # Ctrl-C before the handler was in place, or raised by hand.
            return _ended("interrupted", INTERRUPTED)

    return wrapper


def _ended(why: str, status: int) -> int:
    print(f"error: {why}", file=sys.stderr, flush=True)
    return status
