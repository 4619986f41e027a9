"""The ``firmware-sim ca`` commands: create the factory CA, sign CSRs."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click
from cryptography import x509

from firmware_sim.ca import CertificateAuthority, chain_pem
from firmware_sim.errors import CAError

logger = logging.getLogger(__name__)

_CA_DIR = click.option(
    "--dir",
    "directory",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("ca"),
    show_default=True,
    envvar="FIRMWARE_SIM_CA_DIR",
    help="Directory of the CA's certificates and keys.",
)


@click.group()
def ca() -> None:
    """The manufacturing CA (P-256 root and intermediate)."""


@ca.command()
@_CA_DIR
@click.option("--name", default="Device Factory", show_default=True)
@click.option("--days", default=3650, show_default=True)
def init(directory: Path, name: str, days: int) -> None:
    """Create a new CA; refuses a directory that already holds one."""
    authority = CertificateAuthority.create(directory, name, days)
    click.echo(f"trust anchor: {authority.root_path}")


@ca.command()
@click.argument("csr_file", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--out",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Where to write the leaf and the intermediate, as PEM.",
)
@click.option("--days", default=365, show_default=True)
@_CA_DIR
def sign(csr_file: Path, out: Path, days: int, directory: Path) -> None:
    """Sign a CSR (PEM or DER) as a client certificate."""
    authority = CertificateAuthority.load(directory)
    chain = authority.sign_csr(_read_csr(csr_file), days)
    _write_replacing(out, chain_pem(chain))
    click.echo(f"serial {chain[0].serial_number:x} -> {out}")


def _read_csr(path: Path) -> x509.CertificateSigningRequest:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CAError(f"{path}: {exc.strerror}") from None

    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_csr(data)
        return x509.load_der_x509_csr(data)
    except ValueError:
        raise CAError(f"{path}: not a PEM or DER CSR") from None


def _write_replacing(path: Path, data: bytes) -> None:
    # Readers see the old chain or the new one, never half of either.
    partial = path.with_name(f".{path.name}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)
