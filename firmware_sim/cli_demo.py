"""The ``firmware-sim demo`` command: the quick start's main job."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import click

from firmware_sim.demo import Demo, workspace
from firmware_sim.errors import SimError
from firmware_sim.params import DirectoryPath
from firmware_sim.registry import RegistryError, check_device_id

# Signals that end the demo the way Ctrl-C does, stopping what it started.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class DemoStoppedError(SimError):
    """A signal ended the demo; it exits as the signal would have."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum
        self.exit_code = 128 + signum


class _StopSignal(BaseException):
    """Raised by a stop signal; like KeyboardInterrupt, no Exception."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


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
    try:
        with _stopped_by_signals(), workspace(keep) as directory:
            Demo(directory, click.echo, key_store, device_id).run()
    except _StopSignal as stop:
        raise DemoStoppedError(stop.signum) from None
    if keep is not None:
        click.echo(f"files kept in {keep}")


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into an exception while inside.

    Without this, such a signal ends the process at once and leaves
    swtpm, mosquitto and the demo's directories behind; as an exception
    it unwinds through the demo's cleanups like Ctrl-C does.
    """

    def interrupt(signum: int, frame: FrameType | None) -> None:
        # Cleanup takes a few seconds; a second signal must not cut it
        # short, so the rest are ignored until it is done.
        for number in previous:
            signal.signal(number, signal.SIG_IGN)
        raise _StopSignal(signum)

    # A signal ignored on purpose, as nohup does with SIGHUP, stays so.
    previous: dict[signal.Signals, Any] = {}
    for number in _STOP_SIGNALS:
        if signal.getsignal(number) is not signal.SIG_IGN:
            previous[number] = signal.signal(number, interrupt)

    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
