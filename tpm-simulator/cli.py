"""The tpm-simulator command: start, stop, status and flush a swtpm."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from device_agent.cli import edge
from tpm_simulator.errors import SimulatorError
from tpm_simulator.ports import free_port_pair
from tpm_simulator.swtpm import (
    HIGHEST_PORT,
    LOG_FILE,
    PORT_FILE,
    Swtpm,
    remembered_port,
)

logger = logging.getLogger(__name__)

# Long enough for the slowest machine, short enough to notice a typo.
MAX_TIMEOUT = 3600.0
# `status` of a TPM that is not running: its own status, so a script
# can tell it from a mistyped state dir (1).
DOWN_EXIT = 3


class _StateDir(click.Path):
    """A directory path that is not empty: "" would mean the cwd."""

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: Any
    ) -> Any:
        if isinstance(value, str) and not value.strip():
            self.fail("must not be empty", param, ctx)
        return super().convert(value, param, ctx)


class _Seconds(click.FloatRange):
    """A positive, finite number of seconds."""

    name = "number of seconds"

    def __init__(self) -> None:
        super().__init__(0, MAX_TIMEOUT, min_open=True)

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: Any
    ) -> Any:
        seconds = super().convert(value, param, ctx)
        # NaN passes every range comparison, so it is refused by name.
        if not math.isfinite(seconds):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        return seconds


_STATE_DIR = click.option(
    "--state-dir",
    type=_StateDir(path_type=Path, file_okay=False),
    required=True,
    help="Directory holding the TPM state, pid, port and log files.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Log everything, show tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Run a software TPM 2.0 (swtpm) on loopback."""
    edge.configure_logging(logging.DEBUG if debug else logging.WARNING)
    if not debug:
        # The TSS libraries print their own errors to stderr; a failed
        # flush is reported here, in one line.
        os.environ.setdefault("TSS2_LOG", "all+NONE")


@main.command()
@_STATE_DIR
@click.option(
    "--port",
    type=click.IntRange(1, HIGHEST_PORT),
    help="TPM port; the control channel takes the next one. "
    "Default: the port used last in this state dir, else a free one.",
)
@click.option(
    "--timeout",
    type=_Seconds(),
    default=5.0,
    show_default=True,
    help="Seconds to wait for swtpm to answer.",
)
def start(state_dir: Path, port: int | None, timeout: float) -> None:
    """Start swtpm and print its TCTI string."""
    tpm = Swtpm(state_dir, port or _remembered_port(state_dir))
    tpm.start(timeout)
    click.echo(tpm.tcti)


@main.command()
@_STATE_DIR
def stop(state_dir: Path) -> None:
    """Stop the swtpm of a state dir; one that is not running is no error."""
    tpm = Swtpm.from_state_dir(state_dir)
    pid = tpm.stop()
    if pid is None:
        click.echo(f"no swtpm was running in {tpm.state_dir}")
    else:
        click.echo(f"stopped swtpm (pid {pid}) in {tpm.state_dir}")


@main.command()
@_STATE_DIR
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(state_dir: Path, as_json: bool) -> None:
    """Show whether swtpm runs and answers.

    A state dir where swtpm never ran is down like one whose swtpm
    stopped; one that does not exist is an error, most likely a
    mistyped path.

    \b
    Exit status:
      0  swtpm runs and answers
      1  the state dir does not exist or cannot be read
      2  the command was used wrongly
      3  swtpm is not running, or does not answer
    """
    port = remembered_port(state_dir)
    if port is None:
        facts = _never_started(state_dir)
    else:
        facts = Swtpm(state_dir, port).status()

    if as_json:
        click.echo(json.dumps(facts, indent=2))
    else:
        for name, value in facts.items():
            click.echo(f"{name}: {value}")

    if not facts["answers"]:
        sys.exit(DOWN_EXIT)


@main.command()
@_STATE_DIR
def flush(state_dir: Path) -> None:
    """Flush every transient object (keys left by killed clients)."""
    tpm = Swtpm.from_state_dir(state_dir)
    if not tpm.running:
        raise SimulatorError(f"no swtpm runs for {tpm.state_dir}")
    click.echo(f"flushed {tpm.flush()}")


def _never_started(state_dir: Path) -> dict[str, Any]:
    """The status of a state dir that holds no port file.

    A state dir that cannot hold one, such as a path under a file or in
    a directory we may not read, is refused instead of reported down.
    """
    try:
        os.lstat(state_dir / PORT_FILE)
    except FileNotFoundError:
        # Reported as down, a mistyped path would pass for a TPM to
        # start; no swtpm ever ran where there is no directory.
        if not os.path.lexists(state_dir):
            raise SimulatorError(
                f"{state_dir}: no such directory; 'tpm-simulator start' "
                "makes it"
            ) from None
    except OSError as exc:
        raise SimulatorError(f"{state_dir}: {exc.strerror or exc}") from None

    state_dir = state_dir.absolute()
    return {
        "state_dir": str(state_dir),
        "port": None,
        "ctrl_port": None,
        "tcti": None,
        "pid": None,
        "running": False,
        "answers": False,
        "log": str(state_dir / LOG_FILE),
    }


def _remembered_port(state_dir: Path) -> int:
    port = remembered_port(state_dir)
    return free_port_pair() if port is None else port


def run(argv: Sequence[str] | None = None) -> Any:
    """The ``tpm-simulator`` command, with errors shown as one line."""
    return edge.run(main, "tpm-simulator", argv)
