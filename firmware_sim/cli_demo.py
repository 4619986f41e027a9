"""The ``firmware-sim demo`` command: the quick start's main job."""

from __future__ import annotations

from pathlib import Path

import click

from firmware_sim.demo import Demo, workspace


@click.command()
@click.option(
    "--key-store",
    type=click.Choice(["tpm", "software"]),
    default="tpm",
    show_default=True,
    help="Where the device key is made.",
)
@click.option("--device-id", default="demo-device-0001", show_default=True)
@click.option(
    "--keep",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the device, CA and TPM files in this new directory.",
)
def demo(key_store: str, device_id: str, keep: Path | None) -> None:
    """Bring one device from no key to a live mutual-TLS MQTT session.

    Starts a TPM simulator, a factory CA and mosquitto on 127.0.0.1, runs
    the device-agent bring-up commands, and stops everything it started.
    """
    if keep is not None and keep.exists():
        raise click.BadParameter(f"{keep} exists already", param_hint="--keep")
    with workspace(keep) as directory:
        Demo(directory, click.echo, key_store, device_id).run()
    if keep is not None:
        click.echo(f"files kept in {keep}")
