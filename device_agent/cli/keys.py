"""``device-agent keygen`` and ``csr``: a key and a request for it."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from cryptography import x509

from device_agent import credential
from device_agent.cli.edge import terminate_as_interrupt
from device_agent.cli.main import App, pass_app
from device_agent.config import Settings
from device_agent.errors import CSRError, StoreError
from device_agent.store import write_atomic

# What a file must begin with to be one we may replace with a new CSR.
_CSR_PEM = b"-----BEGIN CERTIFICATE REQUEST-----"
_MAX_CSR = 64 * 1024

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
    """Make the device key (in the TPM when there is one).

    An operational key that never got its certificate is replaced by the
    agent's next renewal, so it is made only while the agent is stopped.
    """
    from device_agent.agent import running_pid

    terminate_as_interrupt()
    settings = app.settings()
    lineage = credential.IDENTITIES[identity]
    pid = running_pid(settings.state_dir)
    if lineage == credential.OPERATIONAL and pid is not None:
        raise StoreError(
            f"stop the running agent (pid {pid}) first: its next renewal "
            "would replace an operational key made now"
        )
    result = credential.keygen(settings, force=force, lineage=lineage)
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
    terminate_as_interrupt()
    settings = app.settings()
    target = None
    if out is not None:
        target = _output_path(out, settings, app.config_path)
    pem = credential.make_csr(settings, credential.IDENTITIES[identity])
    if target is None:
        sys.stdout.write(pem.decode())
        return
    try:
        write_atomic(target, pem, mode=0o644)
    except OSError as exc:
        raise CSRError(f"{target}: {exc.strerror or exc}") from None
    click.echo(f"wrote {target}", err=True)


def _output_path(out: str, settings: Settings, config_path: Path) -> Path:
    """A path we may replace with a new regular file.

    Devices, pipes and links are refused: replacing them with a file
    would break whatever they were for. So are the agent's own files and
    any file that holds something other than a CSR: a mistyped path must
    not cost the device its key or its config.
    """
    if not out.strip():
        raise click.BadParameter("must not be empty", param_hint="--out")
    path = Path(out)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise CSRError(f"{path}: not a regular file; refusing to replace it")
    if not path.parent.is_dir():
        raise CSRError(f"{path.parent}: no such directory")
    resolved = path.resolve()
    if resolved.is_relative_to(settings.state_dir.resolve()):
        raise CSRError(
            f"{path}: inside state_dir {settings.state_dir}; refusing to "
            "write there"
        )
    if resolved == config_path.resolve():
        raise CSRError(f"{path}: the config file; refusing to replace it")
    if path.exists() and not _holds_csr(path):
        raise CSRError(
            f"{path}: exists and holds no CSR; refusing to replace it"
        )
    return path


def _holds_csr(path: Path) -> bool:
    """Whether ``path`` holds a CSR (PEM or DER), which we may replace."""
    try:
        with path.open("rb") as stream:
            data = stream.read(_MAX_CSR + 1)
    except OSError as exc:
        raise CSRError(f"{path}: {exc.strerror or exc}") from None
    if len(data) > _MAX_CSR:
        return False
    if data.lstrip().startswith(_CSR_PEM):
        return True
    try:
        x509.load_der_x509_csr(data)
    except ValueError:
        return False
    return True


COMMANDS = [keygen, csr]
