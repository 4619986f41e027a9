"""``firmware-sim evidence``: CRA authentication evidence for a fleet."""

from __future__ import annotations

import logging
from pathlib import Path

import click

from firmware_sim import evidence as evidence_module
from firmware_sim.params import DirectoryPath

logger = logging.getLogger(__name__)


@click.command()
@click.argument(
    "directory",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
)
@click.option(
    "--out",
    type=DirectoryPath(),
    help="Where evidence.md and evidence.json go [default: DIRECTORY].",
)
def evidence(directory: Path, out: Path | None) -> None:
    """Check each authentication requirement over a fleet run or a line.

    DIRECTORY is a fleet run (its --out/run) or a factory line (its
    --dir). Exits non-zero when a device fails a requirement.
    """
    requirements = evidence_module.assess(directory)
    refused = {d for r in requirements for d in r.notes}
    json_path, md_path = evidence_module.write(requirements, out or directory)
    for requirement in requirements:
        click.echo(requirement.summary)
    if refused:
        click.echo(
            f"refused at the factory (not fleet devices): "
            f"{', '.join(sorted(refused))}"
        )
    click.echo(f"evidence: {md_path} and {json_path}")
    failing = evidence_module.failing_devices(requirements)
    if failing:
        first, names = next(iter(failing.items()))
        why = next(
            r.failures[first] for r in requirements if r.name == names[0]
        )
        raise evidence_module.EvidenceError(
            f"{len(failing)} device(s) fail a requirement, first {first}: "
            f"{names[0]} ({why}); see {md_path}"
        )
