"""``firmware-sim fleet``: a fleet of simulated devices through a scenario."""

from __future__ import annotations

import logging
from pathlib import Path

import click
from rich.console import Console

from firmware_sim import fleet as fleet_module
from firmware_sim.params import DirectoryPath
from firmware_sim.signals import stopped_by_signals

logger = logging.getLogger(__name__)


@click.command()
@click.option(
    "--devices", "count", type=click.IntRange(1, 5000), required=True
)
@click.option(
    "--scenario",
    type=click.Choice(fleet_module.SCENARIOS),
    required=True,
    help="lifecycle (at least 5 devices), storm (identical lifetimes, "
    "started at once; at least 2, and "
    f"{fleet_module.STORM_JUDGED_FROM} for its spread to be judged), "
    "outage (broker and registrar down during renewals; at least 2), "
    "clone (at least 2).",
)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option(
    "--software-keys",
    is_flag=True,
    help="Software keys instead of one swtpm per device (NOT "
    "hardware-protected); agents then share processes, 50 a process.",
)
@click.option(
    "--lifetime",
    type=click.IntRange(8, 3600),
    help="Seconds an operational certificate lives [default: per "
    "scenario, 20 to 40].",
)
@click.option(
    "--out",
    type=DirectoryPath(),
    default=Path("fleet-report"),
    show_default=True,
    help="Where the report and the run's files go; a previous run's "
    "files in OUT/run are replaced (said on stderr). One run at a time "
    "may use it.",
)
def fleet(
    count: int,
    scenario: str,
    seed: int,
    software_keys: bool,
    lifetime: int | None,
    out: Path,
) -> None:
    """Run simulated devices through a scenario and write a report."""
    # The report draws with matplotlib: slow to import, so only here.
    from firmware_sim import report

    minimum = fleet_module.MINIMUM_DEVICES[scenario]
    if count < minimum:
        raise click.BadParameter(
            f"the {scenario} scenario needs at least {minimum} devices, "
            f"not {count}",
            param_hint="--devices",
        )
    # Refuse a scenario it cannot run before saying anything else.
    the_plan = fleet_module.plan(
        scenario, count, seed, software_keys, lifetime
    )
    console = Console(stderr=True)
    with stopped_by_signals(), fleet_module.OutDir(out) as held:
        if held.run_dir.exists():
            click.echo(
                f"replacing the previous run in {out / 'run'}", err=True
            )
        outcome, _ = held.run(the_plan, console)
        paths = report.write(outcome, out)
    for name in sorted(outcome.checks):
        why = outcome.unjudged.get(name)
        click.echo(
            f"{outcome.verdict(name)}: {name}" + (f"; {why}" if why else "")
        )
    click.echo(f"report: {paths['markdown']} and {paths['json']}")
    failed = outcome.failed
    if failed:
        raise fleet_module.FleetError(
            f"{len(failed)} check(s) failed, first: {failed[0]}; see "
            f"{paths['markdown']}"
        )
