"""The ``device-agent`` command line: one module per group of verbs."""

from __future__ import annotations

import importlib
import sys
from typing import Any

# The exit status of a command stopped by Ctrl-C, as a shell reports it.
_INTERRUPTED = 130


def start(target: str) -> Any:
    """Import the command ``module:function`` and run it.

    Importing a command's libraries takes a tenth of a second, long
    enough for a Ctrl-C to land before the error edge is in place; it
    then ends in one line like any other interruption.
    """
    module, _, function = target.partition(":")
    try:
        command = getattr(importlib.import_module(module), function)
    except KeyboardInterrupt:
        sys.stderr.write("error: interrupted\n")
        raise SystemExit(_INTERRUPTED) from None
    return command()


def device_agent() -> Any:
    """The ``device-agent`` command."""
    return start("device_agent.cli.main:main")
