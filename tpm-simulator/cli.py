"""The tpm-simulator command: start, stop, status and flush a swtpm."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from device_agent.cli import edge
from device_agent.errors import AgentError
from tpm_simulator.ports import free_port_pair
from tpm_simulator.swtpm import Swtpm

logger = logging.getLogger(__name__)

_STATE_DIR = click.option(
    "--state-dir",
    type=click.Path(path_type=Path, file_okay=False),
    required=True,
    help="Directory holding the TPM state, pid, port and log files.",
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Log everything, show tracebacks.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Run a software TPM 2.0 (swtpm) on loopback."""
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )


@main.command()
@_STATE_DIR
@click.option(
    "--port",
    type=click.IntRange(1, 65534),
    help="TPM port; the control channel takes the next one. "
    "Default: the port used last in this state dir, else a free one.",
)
@click.option("--timeout", default=5.0, show_default=True)
def start(state_dir: Path, port: int | None, timeout: float) -> None:
    """Start swtpm and print its TCTI string."""
    tpm = Swtpm(state_dir, port or _remembered_port(state_dir))
    tpm.start(timeout)
    click.echo(tpm.tcti)


@main.command()
@_STATE_DIR
def stop(state_dir: Path) -> None:
    """Stop the swtpm of a state dir."""
    Swtpm.from_state_dir(state_dir).stop()


@main.command()
@_STATE_DIR
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def status(state_dir: Path, as_json: bool) -> None:
    """Show whether swtpm runs and answers; exit 3 if it does not."""
    facts = Swtpm.from_state_dir(state_dir).status()

    if as_json:
        click.echo(json.dumps(facts, indent=2))
    else:
        for name, value in facts.items():
            click.echo(f"{name}: {value}")

    if not facts["answers"]:
        sys.exit(3)


@main.command()
@_STATE_DIR
def flush(state_dir: Path) -> None:
    """Flush every transient object (keys left by killed clients)."""
    count = Swtpm.from_state_dir(state_dir).flush()
    click.echo(f"flushed {count}")


def _remembered_port(state_dir: Path) -> int:
    try:
        return Swtpm.from_state_dir(state_dir).port
    except AgentError:
        return free_port_pair()


def run(argv: Sequence[str] | None = None) -> Any:
    """The ``tpm-simulator`` command, with errors shown as one line."""
    return edge.run(main, "tpm-simulator", argv)
