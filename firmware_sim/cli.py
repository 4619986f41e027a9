"""The firmware-sim command: the world around a device, one group a verb."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import click

from device_agent.cli import edge
from firmware_sim.cli_broker import broker
from firmware_sim.cli_ca import ca
from firmware_sim.cli_demo import demo
from firmware_sim.cli_evidence import evidence
from firmware_sim.cli_factory import factory
from firmware_sim.cli_fleet import fleet
from firmware_sim.cli_registrar import registrar
from firmware_sim.cli_revocation import crl_check, decommission, revoke

logger = logging.getLogger(__name__)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log state changes.")
@click.option("--debug", is_flag=True, help="Log everything, show tracebacks.")
def main(verbose: bool, debug: bool) -> None:
    """Simulate the factory, registrar and broker around devices."""
    level = logging.INFO if verbose else logging.WARNING
    edge.configure_logging(logging.DEBUG if debug else level)


main.add_command(broker)
main.add_command(ca)
main.add_command(demo)
main.add_command(evidence)
main.add_command(factory)
main.add_command(fleet)
main.add_command(registrar)
main.add_command(revoke)
main.add_command(decommission)
main.add_command(crl_check)


def run(argv: Sequence[str] | None = None) -> Any:
    """The ``firmware-sim`` command, with errors shown as one line."""
    return edge.run(main, "firmware-sim", argv)
