"""The ``firmware-sim registrar`` commands: set up, run, manage devices."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path
from types import FrameType

import click

from firmware_sim.registrar import Layout, Registrar, prepare
from firmware_sim.registry import (
    DECOMMISSIONED,
    REVOKED,
    Device,
    Issuance,
    Registry,
)

logger = logging.getLogger(__name__)

_DIR = click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("registrar"),
    show_default=True,
    envvar="FIRMWARE_SIM_REGISTRAR_DIR",
    help="Directory of the operational CA, credential and registry.",
)
_SECONDS = click.IntRange(min=1)


@click.group()
def registrar() -> None:
    """The registrar: issues operational certificates over MQTT."""


@registrar.command()
@_DIR
@click.option("--name", default="Device Operations", show_default=True)
def init(directory: Path, name: str) -> None:
    """Create the operational CA, registrar credential and registry.

    Whatever exists already is kept, so running it again is harmless.
    """
    layout = prepare(directory, ca_name=name)
    click.echo(f"operational trust anchor: {layout.root_path}")
    click.echo(f"registrar credential: {layout.chain_path}")
    click.echo(f"registry: {layout.registry_path}")


@registrar.command()
@_DIR
@click.option(
    "--broker",
    required=True,
    metavar="HOST:PORT",
    help="The MQTT broker, reached with mutual TLS.",
)
@click.option(
    "--ca-file",
    type=click.Path(path_type=Path, dir_okay=False, exists=True),
    required=True,
    help="Trust anchor of the broker's certificate.",
)
@click.option(
    "--lifetime",
    type=_SECONDS,
    default=86400,
    show_default=True,
    help="Seconds an issued certificate is valid.",
)
@click.option(
    "--backdate",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Seconds notBefore lies in the past.",
)
@click.option(
    "--max-lifetime",
    type=_SECONDS,
    help="Cap on the lifetime, in seconds.",
)
def run(
    directory: Path,
    broker: str,
    ca_file: Path,
    lifetime: int,
    backdate: int,
    max_lifetime: int | None,
) -> None:
    """Answer enrollment requests until SIGINT or SIGTERM."""
    host, port = _host_port(broker)
    service = Registrar.from_directory(
        directory,
        host,
        port,
        ca_file,
        lifetime=lifetime,
        backdate=backdate,
        max_lifetime=max_lifetime,
    )

    # One line per request is what this command shows, even without -v.
    service_logger = logging.getLogger("firmware_sim.registrar")
    if service_logger.getEffectiveLevel() > logging.INFO:
        service_logger.setLevel(logging.INFO)

    stopping = threading.Event()

    def stop(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous = {
        number: signal.signal(number, stop)
        for number in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        with service:
            click.echo(f"registrar serving on {host}:{port}", err=True)
            while not stopping.wait(0.5):
                pass
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
    click.echo("registrar stopped", err=True)


@registrar.command()
@click.argument("device_id")
@click.option("--serial", help="The board's serial number.")
@_DIR
def add(device_id: str, serial: str | None, directory: Path) -> None:
    """Register a device so that the registrar serves it."""
    with _registry(directory) as registry:
        device = registry.add(device_id, serial)
    click.echo(f"{device.device_id} {device.status}")


@registrar.command()
@click.argument("device_id")
@_DIR
def revoke(device_id: str, directory: Path) -> None:
    """Refuse the device from now on (compromised, stolen)."""
    with _registry(directory) as registry:
        device = registry.set_status(device_id, REVOKED)
    click.echo(f"{device.device_id} {device.status}")


@registrar.command()
@click.argument("device_id")
@_DIR
def decommission(device_id: str, directory: Path) -> None:
    """Refuse the device from now on (retired from service)."""
    with _registry(directory) as registry:
        device = registry.set_status(device_id, DECOMMISSIONED)
    click.echo(f"{device.device_id} {device.status}")


@registrar.command(name="list")
@_DIR
def list_devices(directory: Path) -> None:
    """One line per device: id, status, serial, certificates issued."""
    with _registry(directory) as registry:
        devices = registry.devices()
        issued = registry.issuances()

    for device in devices:
        mine = [i for i in issued if i.device_id == device.device_id]
        click.echo(_device_line(device, mine))


def _device_line(device: Device, issued: list[Issuance]) -> str:
    line = (
        f"{device.device_id}\t{device.status}\t"
        f"serial={device.serial or '-'}\tissued={len(issued)}"
    )
    if issued:
        line += f"\tvalid_until={issued[-1].not_after:%Y-%m-%dT%H:%M:%SZ}"
    return line


def _registry(directory: Path) -> Registry:
    layout = Layout(directory)
    layout.check()
    return Registry(layout.registry_path)


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise click.BadParameter(
            f"{value!r} is not HOST:PORT", param_hint="--broker"
        )
    return host, int(port)
