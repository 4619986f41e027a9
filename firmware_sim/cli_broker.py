"""The ``firmware-sim broker`` commands: files for mosquitto, and run it."""

from __future__ import annotations

import datetime
import errno
import ipaddress
import logging
import os
import shutil
import socket
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import click
from cryptography import x509

from firmware_sim import registrar, revocation
from firmware_sim.broker import (
    ACL,
    CONF,
    CRL,
    RUN_AS,
    SERVER_CERT,
    SERVER_KEY,
    render_acl,
    render_config,
    run_as_group,
    unreachable_dir,
)
from firmware_sim.ca import (
    MAX_DAYS,
    CertificateAuthority,
    chain_pem,
    check_server_name,
    check_server_names,
    key_pem,
    write_files,
)
from firmware_sim.cli_ca import CRL_DAYS, CRL_FILE, holds, server_names
from firmware_sim.errors import BrokerError, CAError
from firmware_sim.params import directory_option

logger = logging.getLogger(__name__)

CA_BUNDLE = "ca-bundle.pem"
FILES = (CA_BUNDLE, SERVER_CERT, SERVER_KEY, CRL, ACL, CONF)

# Names a broker on this machine is reached by, besides those given.
LOCAL_NAMES = ("localhost", "127.0.0.1")

# Where Debian and others install mosquitto, off the PATH of most users.
_SBIN = ("/usr/sbin", "/usr/local/sbin")

_DIR = directory_option(
    "--dir",
    "directory",
    default="broker",
    help="Directory of the broker's config, certificates and CRLs.",
    envvar="FIRMWARE_SIM_BROKER_DIR",
)
_FACTORY_CA = directory_option(
    "--factory-ca",
    default="ca",
    help="Directory of the factory CA ('ca init'); it signs the broker.",
    envvar="FIRMWARE_SIM_CA_DIR",
)
_REGISTRAR_DIR = directory_option(
    "--registrar-dir",
    default="registrar",
    help="Directory of the registrar ('registrar init').",
    envvar="FIRMWARE_SIM_REGISTRAR_DIR",
)
_CRL_DAYS = click.option(
    "--crl-days",
    type=click.IntRange(1, MAX_DAYS),
    default=CRL_DAYS,
    show_default=True,
    help="Days until the CRLs' next update.",
)


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _host(ctx: click.Context, param: click.Parameter, value: str) -> str:
    try:
        host = check_server_name(value)
    except CAError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    if host.startswith("*"):
        raise click.BadParameter(f"{value!r} is a wildcard", ctx, param)
    # Resolvers read a name ending in a number as an IPv4 address, so
    # 999.1.1.1 is no host name either: no top-level domain is numeric.
    if host.rpartition(".")[2].isdigit() and not _is_address(host):
        raise click.BadParameter(
            f"{value!r} is not a host name or IP address", ctx, param
        )
    return host


@click.group()
def broker() -> None:
    """mosquitto for the devices and the registrar, set up by hand."""


@broker.command()
@_DIR
@_FACTORY_CA
@_REGISTRAR_DIR
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=8883,
    show_default=True,
)
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    callback=_host,
    help="Address mosquitto listens on; 0.0.0.0 for every IPv4 one.",
)
@click.option(
    "--name",
    "names",
    multiple=True,
    callback=server_names,
    metavar="HOST",
    help="DNS name or IP address devices reach the broker by, for its "
    "certificate; repeat for more. localhost, 127.0.0.1 and --host "
    "are always in.",
)
@click.option(
    "--days",
    type=click.IntRange(1, MAX_DAYS),
    default=365,
    show_default=True,
    help="Days the server certificate is valid.",
)
@_CRL_DAYS
@click.option(
    "--force", is_flag=True, help="Replace files an earlier run wrote."
)
def files(
    directory: Path,
    factory_ca: Path,
    registrar_dir: Path,
    port: int,
    host: str,
    names: list[str],
    days: int,
    crl_days: int,
    force: bool,
) -> None:
    """Write what mosquitto needs for the devices and the registrar.

    That is ca-bundle.pem (factory and operational roots), server.pem
    and server.key (from the factory CA), crl.pem (a CRL of each
    intermediate), acl and mosquitto.conf. Refuses to replace them
    unless --force.
    """
    out = directory.absolute()
    _check_out_dir(out, force)
    factory, operational = _load_cas(factory_ca, registrar_dir)
    all_names = check_server_names([*names, *_host_names(host), *LOCAL_NAMES])

    chain, key = factory.issue_server_cert(all_names, days)
    crls = revocation.crls(
        factory, operational, next_update=datetime.timedelta(days=crl_days)
    )
    group = _group()
    contents = [
        (CA_BUNDLE, chain_pem([factory.root, operational.root]), 0o644),
        (SERVER_CERT, chain_pem(chain), 0o644),
        (SERVER_KEY, key_pem(key), 0o600 if group is None else 0o640),
        (CRL, b"".join(crls), 0o644),
        (ACL, _acl(), 0o644),
        (CONF, _config(out, host, port), 0o644),
    ]
    _write_into(out, contents, force, group)

    click.echo(f"wrote {', '.join(FILES)} to {out}")
    click.echo(
        f"server certificate for {', '.join(all_names)}, valid until "
        f"{chain[0].not_valid_after_utc:%Y-%m-%d} UTC"
    )
    _echo_crl_due(crls, out, factory_ca, registrar_dir)
    click.echo(f"start it: mosquitto -c {out / CONF}")
    if group is not None:
        click.echo(
            f"as root, mosquitto drops to user {RUN_AS}, which reads "
            "these files through its group"
        )
    else:
        click.echo(
            "these files are yours alone: start mosquitto as yourself; "
            f"as root it would drop to user {RUN_AS}, which cannot read "
            f"{SERVER_KEY}"
        )


@broker.command()
@_DIR
@_FACTORY_CA
@_REGISTRAR_DIR
@_CRL_DAYS
def crl(
    directory: Path, factory_ca: Path, registrar_dir: Path, crl_days: int
) -> None:
    """Renew crl.pem: a CRL of each intermediate, with every revocation.

    Revoke with 'firmware-sim ca crl --revoke'; then this, then SIGHUP
    makes a running mosquitto read the new CRLs.
    """
    out = directory.absolute()
    if not (out / CRL).is_file():
        raise BrokerError(
            f"{out / CRL}: no such file; run 'firmware-sim broker files "
            f"--dir {directory}' first"
        )
    if not holds(out / CRL, CRL_FILE):
        raise BrokerError(
            f"{out / CRL} holds something other than CRLs; it is left alone"
        )

    factory, operational = _load_cas(factory_ca, registrar_dir)
    crls = revocation.crls(
        factory, operational, next_update=datetime.timedelta(days=crl_days)
    )
    write_files(
        [(out / CRL, b"".join(crls), 0o644)], replace=True, group=_group()
    )

    _echo_crl_due(crls, out, factory_ca, registrar_dir)
    click.echo("reload a running mosquitto: kill -HUP <its pid>")


@broker.command()
@_DIR
def run(directory: Path) -> None:
    """Run mosquitto in the foreground with the files of 'broker files'.

    It stops on Ctrl-C or SIGTERM; SIGHUP makes it read crl.pem again.
    """
    conf = directory.absolute() / CONF
    if not conf.is_file():
        raise BrokerError(
            f"{conf}: no such file; run 'firmware-sim broker files "
            f"--dir {directory}' first"
        )
    _check_reachable(conf.parent)
    mosquitto = _mosquitto()
    _check_listeners(conf)

    click.echo(f"{mosquitto} -c {conf}", err=True)
    sys.stdout.flush()
    sys.stderr.flush()
    # mosquitto takes this process over: signals reach it directly, and
    # nothing is left running when it ends.
    os.execv(mosquitto, [mosquitto, "-c", str(conf)])  # noqa: S606


def _check_listeners(conf: Path) -> None:
    """Refuse to start mosquitto on an address something listens on.

    mosquitto would say so in five log lines of its own and no summary.
    A port taken in the moment between this probe and mosquitto's own
    bind still ends it that way: only the bind itself can tell.
    """
    for host, port in _listeners(conf):
        if _in_use(host, port):
            raise BrokerError(
                f"mosquitto cannot listen on {host}:{port}: address "
                "already in use"
            )


def _listeners(conf: Path) -> Iterator[tuple[str, int]]:
    """The (address, port) of each ``listener`` line of a config."""
    for line in conf.read_text(errors="replace").splitlines():
        words = line.split()
        if len(words) < 2 or words[0] != "listener":
            continue
        try:
            port = int(words[1])
        except ValueError:
            continue  # mosquitto itself names what it cannot read
        # Without an address mosquitto listens on every one.
        yield (words[2] if len(words) > 2 else "0.0.0.0"), port  # noqa: S104


def _in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        # As mosquitto does: connections of an earlier broker left in
        # TIME_WAIT do not hold the port.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def _check_out_dir(out: Path, force: bool) -> None:
    """Refuse a directory mosquitto cannot read or whose files we'd lose."""
    for name in FILES:
        path = out / name
        if not os.path.lexists(path):
            continue
        if not stat.S_ISREG(path.lstat().st_mode):
            raise BrokerError(
                f"{path} is not a regular file; it is left alone"
            )
        if not force:
            raise BrokerError(f"{path} exists; --force replaces it")

    existing = out
    while not existing.exists():
        existing = existing.parent
    _check_reachable(existing)


def _check_reachable(directory: Path) -> None:
    blocking = unreachable_dir(directory)
    if blocking is not None:
        raise BrokerError(
            f"mosquitto runs as user {RUN_AS} and cannot enter {blocking}; "
            "use a directory it can reach"
        )


def _load_cas(
    factory_dir: Path, registrar_dir: Path
) -> tuple[CertificateAuthority, CertificateAuthority]:
    layout = registrar.Layout(registrar_dir)
    layout.check()
    factory = CertificateAuthority.load(factory_dir)
    operational = CertificateAuthority.load(layout.ca_dir)
    if factory.root == operational.root:
        raise BrokerError(
            f"{factory_dir} is the registrar's CA; the factory CA signs the "
            "devices' first certificates and the broker's"
        )
    return factory, operational


def _host_names(host: str) -> list[str]:
    # A wildcard address names no host that a device could reach.
    try:
        if ipaddress.ip_address(host).is_unspecified:
            return []
    except ValueError:
        pass
    return [host]


def _acl() -> bytes:
    service_users = {registrar.NAME: registrar.ACL_TOPICS}
    return render_acl(service_users).encode()


def _config(out: Path, host: str, port: int) -> bytes:
    header = (
        "# Written by 'firmware-sim broker files'. cafile holds the roots\n"
        "# of both CAs that sign devices; crlfile a CRL of each issuing\n"
        "# intermediate, without which that issuer's devices are refused.\n"
        "# 'firmware-sim broker crl' renews it; SIGHUP makes mosquitto\n"
        "# read it again.\n\n"
    )
    text = render_config(
        port=port,
        host=host,
        ca_file=out / CA_BUNDLE,
        cert_file=out / SERVER_CERT,
        key_file=out / SERVER_KEY,
        crl_file=out / CRL,
        acl_file=out / ACL,
    )
    return (header + text).encode()


def _write_into(
    out: Path,
    contents: list[tuple[str, bytes, int]],
    force: bool,
    group: int | None,
) -> None:
    made = _make_dir(out, group)
    try:
        write_files(
            [(out / name, data, mode) for name, data, mode in contents],
            replace=force,
            group=group,
        )
    except BaseException:
        if made:
            out.rmdir()
        raise


def _make_dir(out: Path, group: int | None) -> bool:
    """Make ``out`` for mosquitto's group if missing; whether we made it.

    A directory that exists is left as it is: it may be shared.
    """
    if out.exists():
        return False

    out.mkdir(mode=0o700 if group is None else 0o750, parents=True)
    if group is not None:
        os.chown(out, -1, group)
    return True


def _group() -> int | None:
    # Only root hands files to mosquitto's group; mosquitto started by
    # anyone else keeps that user, who owns the files already.
    if os.geteuid() != 0:
        return None
    return run_as_group()


def _echo_crl_due(
    crls: list[bytes], out: Path, factory_ca: Path, registrar_dir: Path
) -> None:
    due = min(_next_update(crl) for crl in crls)
    click.echo(
        f"CRLs valid until {due:%Y-%m-%d %H:%M} UTC; renew them before "
        f"then, or mosquitto refuses every device: firmware-sim broker crl "
        f"--dir {out} --factory-ca {factory_ca.absolute()} "
        f"--registrar-dir {registrar_dir.absolute()}"
    )


def _next_update(pem: bytes) -> datetime.datetime:
    # Every CRL of ours has a next update; the type allows for none.
    crl = x509.load_pem_x509_crl(pem)
    return crl.next_update_utc or datetime.datetime.max.replace(
        tzinfo=datetime.UTC
    )


def _mosquitto() -> str:
    path = os.pathsep.join([os.environ.get("PATH", os.defpath), *_SBIN])
    found = shutil.which("mosquitto", path=path)
    if found is None:
        raise BrokerError(
            "mosquitto is not installed (Debian: apt-get install mosquitto)"
        )
    return found
