"""The ``firmware-sim demo`` command: the quick start's main job."""

from __future__ import annotations

import os
from pathlib import Path

import click

from firmware_sim.demo import Demo, workspace
from firmware_sim.params import DirectoryPath
from firmware_sim.registry import RegistryError, check_device_id
from firmware_sim.signals import stopped_by_signals


def _device_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        return check_device_id(value)
    except RegistryError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@click.command()
@click.option(
    "--key-store",
    type=click.Choice(["tpm", "software"]),
    default="tpm",
    show_default=True,
    help="Where the device key is made.",
)
@click.option(
    "--device-id",
    default="demo-device-0001",
    show_default=True,
    callback=_device_id,
)
@click.option(
    "--keep",
    type=DirectoryPath(),
    help="Keep the device, CA and TPM files in this new directory.",
)
def demo(key_store: str, device_id: str, keep: Path | None) -> None:
    """Bring one device from no key to a live mutual-TLS MQTT session.

    Starts a TPM simulator, a factory CA and mosquitto on 127.0.0.1, runs
    the device-agent bring-up commands, and stops everything it started.
    """
    if keep is not None and os.path.lexists(keep):
        raise click.BadParameter(f"{keep} exists already", param_hint="--keep")
    if keep is not None and key_store == "tpm" and "," in str(keep.absolute()):
        # swtpm keeps its state under it, and takes no path with a comma.
        raise click.BadParameter(
            f"{keep}: swtpm cannot use a path with a comma",
            param_hint="--keep",
        )
    with stopped_by_signals(), workspace(keep) as directory:
        Demo(directory, click.echo, key_store, device_id).run()
    if keep is not None:
        click.echo(f"files kept in {keep}")
