"""The ``firmware-sim ca`` commands: create the CA, issue, revoke."""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import re
import stat
from collections.abc import Callable, Sequence
from pathlib import Path

import click
from cryptography import x509

from firmware_sim.ca import (
    CA_DAYS,
    CA_FILES,
    ISSUED,
    MAX_DAYS,
    REVOKED,
    CertificateAuthority,
    chain_pem,
    check_serial,
    check_server_names,
    key_pem,
    read_small_file,
    write_files,
)
from firmware_sim.errors import CAError
from firmware_sim.params import (
    NonEmptyPath,
    ca_name,
    directory_option,
)

logger = logging.getLogger(__name__)


_CA_DIR = directory_option(
    "--dir",
    "directory",
    default="ca",
    help="Directory of the CA's certificates and keys.",
    envvar="FIRMWARE_SIM_CA_DIR",
)
_DAYS = click.IntRange(1, MAX_DAYS)
_OUT = NonEmptyPath(path_type=Path, dir_okay=False)

# mosquitto refuses every leaf of an issuer whose CRL is past its next
# update; a month leaves time to notice that a new one is due.
CRL_DAYS = 30

_PEM_BEGIN = b"-----BEGIN "
_PEM_BLOCK = re.compile(
    rb"-----BEGIN [^\n]*?-----.*?-----END [^\n]*?-----", re.DOTALL
)


def server_names(
    ctx: click.Context, param: click.Parameter, value: Sequence[str]
) -> list[str]:
    """Click callback: names a server certificate can carry, checked."""
    if not value:
        return []
    try:
        return check_server_names(value)
    except CAError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


def _serials(
    ctx: click.Context, param: click.Parameter, value: Sequence[str]
) -> list[int]:
    return [_serial(text, ctx, param) for text in value]


def _serial(text: str, ctx: click.Context, param: click.Parameter) -> int:
    # As 'ca sign' prints it, or as openssl does: 0x-prefixed, with colons.
    digits = text.strip().lower().removeprefix("0x").replace(":", "")
    not_hex = click.BadParameter(
        f"{text!r} is not a serial in hex", ctx, param
    )
    if not (digits.isascii() and digits.isalnum()):
        raise not_hex
    try:
        return check_serial(int(digits, 16))
    except ValueError:
        raise not_hex from None
    except CAError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@click.group()
def ca() -> None:
    """The manufacturing CA (P-256 root and intermediate)."""


@ca.command()
@_CA_DIR
@click.option(
    "--name", default="Device Factory", show_default=True, callback=ca_name
)
@click.option("--days", type=_DAYS, default=CA_DAYS, show_default=True)
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
    help="Where to write the leaf and the intermediate, as PEM; a file "
    "that exists is replaced only if it holds a leaf certificate or "
    "chain and nothing else.",
)
@click.option("--days", type=_DAYS, default=365, show_default=True)
@_CA_DIR
def sign(csr_file: Path, out: Path, days: int, directory: Path) -> None:
    """Sign a CSR (PEM or DER) as a client certificate.

    The CSR's subject must be one CN, a device id. Refuses to replace
    a file that holds anything but a leaf certificate or chain (a
    config, a key, a CA certificate, notes beside the chain).
    """
    _check_out(
        out, directory, inputs={csr_file: "the CSR file"}, holding=_CHAIN
    )

    authority = CertificateAuthority.load(directory)
    chain = authority.sign_csr(_read_csr(csr_file), days)
    write_files([(out, chain_pem(chain), 0o644)], replace=True)
    click.echo(f"serial {chain[0].serial_number:x} -> {out}")


@ca.command(name="server-cert")
@_CA_DIR
@click.option(
    "--name",
    "names",
    multiple=True,
    required=True,
    callback=server_names,
    metavar="HOST",
    help="DNS name or IP address clients reach the server by; repeat "
    "for more. The first is also the common name.",
)
@click.option(
    "--out-cert",
    type=_OUT,
    required=True,
    help="Where to write the leaf and the intermediate, as PEM.",
)
@click.option(
    "--out-key",
    type=_OUT,
    required=True,
    help="Where to write the new P-256 key (mode 0600).",
)
@click.option("--days", type=_DAYS, default=365, show_default=True)
@click.option(
    "--force", is_flag=True, help="Replace --out-cert and --out-key."
)
def server_cert(
    directory: Path,
    names: list[str],
    out_cert: Path,
    out_key: Path,
    days: int,
    force: bool,
) -> None:
    """Issue a serverAuth certificate and a new key, for a broker.

    Refuses to replace files that exist, unless --force.
    """
    _check_out(out_cert, directory, "--out-cert", force=force)
    _check_out(out_key, directory, "--out-key", force=force)
    if _real(out_cert) == _real(out_key):
        raise click.BadParameter(
            f"{out_key} is --out-cert too; the key needs a file of its own",
            param_hint="--out-key",
        )

    authority = CertificateAuthority.load(directory)
    chain, key = authority.issue_server_cert(names, days)
    write_files(
        [(out_key, key_pem(key), 0o600), (out_cert, chain_pem(chain), 0o644)],
        replace=force,
    )

    leaf = chain[0]
    click.echo(
        f"serial {leaf.serial_number:x} for {', '.join(names)}, valid "
        f"until {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC"
    )
    click.echo(f"certificate and intermediate: {out_cert}")
    click.echo(f"key (mode 0600): {out_key}")


@ca.command()
@_CA_DIR
@click.option(
    "--out",
    type=_OUT,
    required=True,
    help="Where to write the CRL, as PEM; a file that exists is replaced "
    "only if it holds a single CRL and nothing else.",
)
@click.option(
    "--revoke",
    "serials",
    multiple=True,
    callback=_serials,
    metavar="SERIAL_HEX",
    help="Revoke the certificate of this serial; repeat for more.",
)
@click.option(
    "--days",
    type=_DAYS,
    default=CRL_DAYS,
    show_default=True,
    help="Days until the CRL's next update.",
)
def crl(directory: Path, out: Path, serials: list[int], days: int) -> None:
    """Write the intermediate's CRL, with every serial revoked so far.

    Revocations are recorded in the CA directory (revoked.txt), so every
    later CRL lists them too. Past its next update the CRL makes
    mosquitto refuse every certificate of this CA: write a new one
    before then. mosquitto's crlfile needs the CRL of every CA whose
    certificates it accepts; 'firmware-sim broker files' and 'broker
    crl' write that file. A file that holds anything but a single CRL
    is not replaced.
    """
    _check_out(out, directory, holding=_CRL)

    authority = CertificateAuthority.load(directory)
    authority.revoke(serials)
    pem = authority.recorded_crl(datetime.timedelta(days=days))
    write_files([(out, pem, 0o644)], replace=True)

    made = x509.load_pem_x509_crl(pem)
    click.echo(
        f"{len(made)} revoked, next update "
        f"{made.next_update_utc:%Y-%m-%d %H:%M} UTC -> {out}"
    )


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


@dataclasses.dataclass(frozen=True)
class _Holding:
    """What an output holds when a command may replace it."""

    what: str
    holds: Callable[[bytes], bool]


def _only_pem_blocks(data: bytes) -> bool:
    # The loaders skip text around PEM blocks, such as notes kept with
    # a certificate; replacing the file would lose them.
    return not _PEM_BLOCK.sub(b"", data).strip()


def _holds_leaf_chain(data: bytes) -> bool:
    # Every PEM block must be a certificate: a key kept in the same
    # file is skipped by the loader, and would be lost on replacing.
    try:
        if _PEM_BEGIN in data:
            if not _only_pem_blocks(data):
                return False
            certs = x509.load_pem_x509_certificates(data)
            if data.count(_PEM_BEGIN) != len(certs):
                return False
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError:
        return False
    return not _is_ca(certs[0])


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        constraints = cert.extensions.get_extension_for_class(
            x509.BasicConstraints
        )
    except x509.ExtensionNotFound:
        return False
    return constraints.value.ca


def _holds_one_crl(data: bytes) -> bool:
    # A file of several CRLs is a broker's crlfile: replaced by one CRL
    # it would make the broker refuse the other issuers' devices.
    return _crl_count(data) == 1


def _holds_crls(data: bytes) -> bool:
    # A broker's crlfile holds a CRL of each CA it trusts; what replaces
    # it holds them all again.
    return _crl_count(data) > 0


def _crl_count(data: bytes) -> int:
    """How many CRLs ``data`` holds, PEM or DER; 0 if it holds more."""
    try:
        if _PEM_BEGIN not in data:
            x509.load_der_x509_crl(data)
            return 1
        if not _only_pem_blocks(data):
            return 0
        blocks = _PEM_BLOCK.findall(data)
        for block in blocks:
            x509.load_pem_x509_crl(block)
    except ValueError:
        return 0
    return len(blocks)


# A mistyped --out must not cost a device its config or its key: as
# 'device-agent csr --out' replaces only a CSR, these commands replace
# only what they write themselves.
_CHAIN = _Holding("a leaf certificate or chain", _holds_leaf_chain)
_CRL = _Holding("a single CRL", _holds_one_crl)
CRL_FILE = _Holding("nothing but CRLs", _holds_crls)


def _check_out(
    out: Path,
    directory: Path,
    option: str = "--out",
    *,
    inputs: dict[Path, str] | None = None,
    holding: _Holding | None = None,
    force: bool = False,
) -> None:
    """Refuse an output that cannot be written or must not be replaced.

    ``inputs`` maps the command's input files to how to name them. A
    file that exists is replaced with ``force``, or if it holds what
    ``holding`` describes; any other is refused.
    """

    def refuse(problem: str) -> click.BadParameter:
        return click.BadParameter(problem, param_hint=option)

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
    for path, what in (inputs or {}).items():
        if _same_file(out, path):
            raise refuse(f"{out} is {what}; the output would replace it")
    for name in (*CA_FILES, ISSUED, REVOKED):
        if _same_file(out, directory / name):
            raise refuse(f"{out} is the CA's {name}; it is left alone")
    if force:
        return
    if holding is None:
        raise refuse(f"{out} exists; --force replaces it")
    if not holds(out, holding):
        raise refuse(
            f"{out} exists and is not {holding.what}; it is left alone"
        )


def holds(path: Path, holding: _Holding) -> bool:
    """Whether the file at ``path`` holds what ``holding`` describes."""
    try:
        data = read_small_file(path, holding.what)
    except FileNotFoundError:
        return True  # gone since it was looked at: nothing to lose
    return holding.holds(data)


def _same_file(first: Path, second: Path) -> bool:
    try:
        return os.path.samefile(first, second)
    except OSError:
        return False


def _real(path: Path) -> Path:
    return path.parent.resolve() / path.name
