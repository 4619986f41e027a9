"""``device-agent install-chain``: store the chain the CA sent back."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from device_agent import credential
from device_agent.cli.keys import IDENTITY
from device_agent.cli.main import App, pass_app
from device_agent.errors import ChainError

MAX_READ = 4 * 1024 * 1024


@click.command("install-chain")
@click.argument("source", metavar="FILE")
@IDENTITY
@pass_app
def install_chain(app: App, source: str, identity: str) -> None:
    """Check a certificate chain (PEM, DER or PKCS#7; '-' for stdin) and
    make it the current credential."""
    settings = app.settings()
    data = _read(source)
    leaf = credential.install_chain(
        settings, data, lineage=credential.IDENTITIES[identity]
    )
    click.echo(
        f"installed certificate {leaf.serial_number:x} "
        f"valid until {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z"
    )


def _read(source: str) -> bytes:
    if source != "-" and not Path(source).is_file():
        what = (
            "no such file"
            if not Path(source).exists()
            else ("not a regular file")
        )
        raise ChainError("unreadable", f"{source}: {what}")
    try:
        if source == "-":
            return sys.stdin.buffer.read(MAX_READ + 1)
        with open(source, "rb") as stream:
            return stream.read(MAX_READ + 1)
    except OSError as exc:
        raise ChainError(
            "unreadable", f"{source}: {exc.strerror or exc}"
        ) from None


COMMANDS = [install_chain]
