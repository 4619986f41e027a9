"""``device-agent keygen`` and ``csr``: a key and a request for it."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from device_agent import credential
from device_agent.cli.main import App, pass_app
from device_agent.errors import CSRError
from device_agent.store import write_atomic

IDENTITY = click.option(
    "--identity",
    type=click.Choice(sorted(credential.IDENTITIES)),
    default="factory",
    show_default=True,
    help="The factory identity (bring-up) or the operational one (which "
    "the agent renews; by file for a CA it cannot reach over MQTT).",
)


@click.command()
@click.option(
    "--force", is_flag=True, help="Make a new key even if one exists."
)
@IDENTITY
@pass_app
def keygen(app: App, force: bool, identity: str) -> None:
    """Make the device key (in the TPM when there is one)."""
    result = credential.keygen(
        app.settings(), force=force, lineage=credential.IDENTITIES[identity]
    )
    protection = (
        "in the TPM"
        if result["hardware_protected"]
        else "in software: NOT hardware-protected"
    )
    click.echo(
        f"key {result['generation']} made {protection}; "
        f"public key sha256 {result['fingerprint']}"
    )
    if result["replaced_pending"] is not None:
        click.echo(
            f"pending key {result['replaced_pending']} was destroyed; a CSR "
            "made with it can no longer be installed",
            err=True,
        )


@click.command()
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    help="Write the CSR here instead of to stdout.",
)
@IDENTITY
@pass_app
def csr(app: App, out: str | None, identity: str) -> None:
    """Print a CSR signed by the device key."""
    target = _output_path(out) if out is not None else None
    pem = credential.make_csr(app.settings(), credential.IDENTITIES[identity])
    if target is None:
        sys.stdout.write(pem.decode())
        return
    try:
        write_atomic(target, pem, mode=0o644)
    except OSError as exc:
        raise CSRError(f"{target}: {exc.strerror or exc}") from None
    click.echo(f"wrote {target}", err=True)


def _output_path(out: str) -> Path:
    """A path we may replace with a new regular file.

    Devices, pipes and links are refused: replacing them with a file
    would break whatever they were for.
    """
    if not out.strip():
        raise click.BadParameter("must not be empty", param_hint="--out")
    path = Path(out)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise CSRError(f"{path}: not a regular file; refusing to replace it")
    if not path.parent.is_dir():
        raise CSRError(f"{path.parent}: no such directory")
    return path


COMMANDS = [keygen, csr]
