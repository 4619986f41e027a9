"""The ``firmware-sim ca`` commands: create the factory CA, sign CSRs."""

from __future__ import annotations

import contextlib
import logging
import os
import stat
import tempfile
from pathlib import Path

import click
from cryptography import x509

from firmware_sim.ca import (
    CA_FILES,
    MAX_DAYS,
    CertificateAuthority,
    chain_pem,
    read_small_file,
)
from firmware_sim.errors import CAError
from firmware_sim.params import (
    DirectoryPath,
    NonEmptyPath,
    ca_name,
)

logger = logging.getLogger(__name__)


_CA_DIR = click.option(
    "--dir",
    "directory",
    type=DirectoryPath(),
    default=Path("ca"),
    show_default=True,
    envvar="FIRMWARE_SIM_CA_DIR",
    help="Directory of the CA's certificates and keys.",
)
_DAYS = click.IntRange(1, MAX_DAYS)


@click.group()
def ca() -> None:
    """The manufacturing CA (P-256 root and intermediate)."""


@ca.command()
@_CA_DIR
@click.option(
    "--name", default="Device Factory", show_default=True, callback=ca_name
)
@click.option("--days", type=_DAYS, default=3650, show_default=True)
def init(directory: Path, name: str, days: int) -> None:
    """Create a new CA; refuses a directory that already holds one."""
    authority = CertificateAuthority.create(directory, name, days)
    click.echo(f"trust anchor: {authority.root_path}")


@ca.command()
@click.argument("csr_file", type=NonEmptyPath(path_type=Path, dir_okay=False))
@click.option(
    "--out",
    type=NonEmptyPath(path_type=Path, dir_okay=False),
    required=True,
    help="Where to write the leaf and the intermediate, as PEM.",
)
@click.option("--days", type=_DAYS, default=365, show_default=True)
@_CA_DIR
def sign(csr_file: Path, out: Path, days: int, directory: Path) -> None:
    """Sign a CSR (PEM or DER) as a client certificate."""
    _check_out(out, csr_file, directory)

    authority = CertificateAuthority.load(directory)
    chain = authority.sign_csr(_read_csr(csr_file), days)
    _write_replacing(out, chain_pem(chain))
    click.echo(f"serial {chain[0].serial_number:x} -> {out}")


def _read_csr(path: Path) -> x509.CertificateSigningRequest:
    try:
        data = read_small_file(path, "a CSR")
    except FileNotFoundError:
        raise CAError(f"{path}: no such file") from None

    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError:
        raise CAError(f"{path}: not a PEM or DER CSR") from None


def _check_out(out: Path, csr_file: Path, directory: Path) -> None:
    """Refuse an --out that cannot be written or must not be replaced."""

    def refuse(problem: str) -> click.BadParameter:
        return click.BadParameter(problem, param_hint="--out")

    parent = out.parent
    if not os.path.lexists(parent):
        raise refuse(f"{parent}: no such directory")
    if not parent.is_dir():
        raise refuse(f"{parent} is not a directory")

    try:
        info = out.lstat()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise refuse(f"{out}: {exc.strerror}") from None

    # Only a file of our own kind is replaced: a device, a FIFO or a
    # symlink stays what it is.
    if not stat.S_ISREG(info.st_mode):
        raise refuse(f"{out} is not a regular file; it is left alone")
    if _same_file(out, csr_file):
        raise refuse(f"{out} is the CSR file; the chain would replace it")
    for name in CA_FILES:
        if _same_file(out, directory / name):
            raise refuse(f"{out} is the CA's {name}; it is left alone")


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _write_replacing(path: Path, data: bytes) -> None:
    # Readers see the old chain or the new one, never half of either.
    # mkstemp makes a new file of its own, so nothing it meets on the
    # way is written through.
    try:
        fd, partial = tempfile.mkstemp(
            prefix=f".{path.name}.", suffix=".partial", dir=path.parent
        )
    except OSError as exc:
        raise CAError(f"{path}: {exc.strerror or exc}") from None

    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            os.fchmod(file.fileno(), 0o644)
        os.replace(partial, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise CAError(f"{path}: {exc.strerror or exc}") from None
