"""Where errors become one line on stderr and an exit code, for every CLI,
and how their log lines are written."""

from __future__ import annotations

import logging
import signal
import sys
import traceback
from collections.abc import Sequence
from types import FrameType
from typing import Any, NoReturn

import click

from device_agent.errors import AgentError

INTERNAL_ERROR_EXIT = 70
INTERRUPTED_EXIT = 130
TERMINATED_EXIT = 128 + signal.SIGTERM
OS_ERROR_EXIT = 74


class Terminated(BaseException):
    """SIGTERM arrived.

    Raised like KeyboardInterrupt, and like it no ``Exception``, so that
    every ``finally`` runs and a key loaded in the TPM is flushed.
    """


def terminate_as_interrupt() -> None:
    """Unwind on SIGTERM, as on Ctrl-C, instead of dying on the spot.

    A command that loads a key into a TPM without a resource manager
    must flush it; a process killed outright leaves it loaded, and a
    few such leftovers fill the TPM's object slots.
    """
    signal.signal(signal.SIGTERM, _raise_terminated)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def run(
    group: click.Group, prog_name: str, argv: Sequence[str] | None = None
) -> Any:
    """Run a click group; no traceback reaches the user unless --debug."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        return group.main(
            args=args, prog_name=prog_name, standalone_mode=False
        )
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.NoArgsIsHelpError as exc:
        where = exc.ctx.command_path if exc.ctx else prog_name
        _fail(f"missing command (see '{where} --help')", exc.exit_code)
    except click.ClickException as exc:
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        _fail(f"{exc.format_message()}{hint}", exc.exit_code)
    except AgentError as exc:
        if debug:
            traceback.print_exc()
        _fail(str(exc), exc.exit_code)
    except OSError as exc:
        # A file or device the command was pointed at: say which and why.
        if debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        _fail(f"{where}{exc.strerror or exc}", OS_ERROR_EXIT)
    except (KeyboardInterrupt, click.Abort):
        _fail("interrupted", INTERRUPTED_EXIT)
    except Terminated:
        _fail("terminated", TERMINATED_EXIT)
    except Exception as exc:
        if debug:
            raise
        _fail(
            f"internal error: {type(exc).__name__}: {exc} "
            "(run with --debug for the traceback)",
            INTERNAL_ERROR_EXIT,
        )


def printable(text: str) -> str:
    """``text`` with control characters escaped, as Python writes them.

    A path or a name can hold any byte; written raw, an escape sequence
    in it would drive the terminal (retitle it, hide text, fake a line).
    """
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class PrintableFormatter(logging.Formatter):
    """One log record, one line: control characters in it are escaped.

    A path or a peer's words in a message could otherwise drive the
    terminal or forge a line of the log; a traceback (--debug) is
    added after this and keeps its lines.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        return printable(super().formatMessage(record))


def configure_logging(
    level: int, form: str = "%(levelname)s %(name)s: %(message)s"
) -> None:
    """Log to stderr at ``level``, each record on a line of its own."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(PrintableFormatter(form))
    logging.basicConfig(level=level, handlers=[handler])


def _fail(message: str, code: int) -> NoReturn:
    first = message.strip().splitlines()[0] if message.strip() else "failed"
    click.echo(f"error: {printable(first)}", err=True)
    sys.exit(code)
