"""The ``firmware-sim registrar`` commands: set up, run, manage devices."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import re
import signal
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

import click
from click.core import ParameterSource
from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from firmware_sim.ca import (
    CA_FILES,
    MAX_DAYS,
    CertificateAuthority,
    check_serial,
    read_small_file,
)
from firmware_sim.cli_ca import CRL_FILE, holds
from firmware_sim.errors import CAError, SimError
from firmware_sim.params import (
    CertificateFile,
    DirectoryPath,
    ca_name,
    directory_option,
)
from firmware_sim.registrar import (
    Layout,
    Registrar,
    hold_directory,
    prepare,
)
from firmware_sim.registry import (
    DECOMMISSIONED,
    DEVICE_ID,
    REVOKED,
    SERIAL,
    SERIAL_RULE,
    Device,
    Issuance,
    Registry,
    is_service_name,
)
from firmware_sim.revocation import (
    check_broker_pid,
    combined_crl,
    revoke_device,
    signal_reload,
    write_crl,
)

logger = logging.getLogger(__name__)

_DIR = directory_option(
    "--dir",
    "directory",
    default="registrar",
    help="Directory of the operational CA, credential and registry.",
    envvar="FIRMWARE_SIM_REGISTRAR_DIR",
)

# Lifetimes and backdating stop where the CA's days do: beyond them lie
# typing mistakes and dates X.509 cannot express.
MAX_SECONDS = MAX_DAYS * 86400
_SECONDS = click.IntRange(1, MAX_SECONDS)

# One label of a DNS name, as IDNA encodes it.
_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _serial(
    ctx: click.Context, param: click.Parameter, value: str | None
) -> str | None:
    # The agent's own rule: a serial it would refuse in its config
    # could never be the one a device reports.
    if value is None or SERIAL.fullmatch(value):
        return value
    raise click.BadParameter(
        f"{shorten(value)} is not {SERIAL_RULE}", ctx, param
    )


# How much of a refused value an error message repeats.
ECHO = 40


def shorten(value: str, limit: int = ECHO) -> str:
    """``value`` as a repr cut to ``limit`` characters, for messages."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def _device_id(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """A device id the agent would accept (its config's pattern)."""
    if not DEVICE_ID.fullmatch(value):
        problem = (
            f"{shorten(value)} is not 1 to 64 letters, digits, '.', '_' "
            "or '-' starting with a letter or digit"
        )
    elif is_service_name(value):
        problem = f"{value!r} is reserved for a broker service"
    else:
        return value
    raise click.BadParameter(problem, ctx, param)


def _hex_serials(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> list[int]:
    serials = []
    for value in values:
        try:
            serials.append(check_serial(int(value.removeprefix("0x"), 16)))
        except (ValueError, CAError):
            raise click.BadParameter(
                f"{value!r} is not a certificate serial in hex", ctx, param
            ) from None
    return serials


@click.group()
def registrar() -> None:
    """The registrar: issues operational certificates over MQTT."""


@registrar.command()
@_DIR
@click.option(
    "--name",
    default="Device Operations",
    show_default=True,
    callback=ca_name,
)
@click.pass_context
def init(ctx: click.Context, directory: Path, name: str) -> None:
    """Create the operational CA, registrar credential and registry.

    Whatever exists already is kept, so running it again is harmless;
    a --name other than that of the CA kept is refused.
    """
    layout = Layout(directory)
    _check_kept_files(layout)
    kept = _kept_ca(layout)
    if kept is not None:
        _check_kept_name(ctx, name, kept)

    try:
        prepare(directory, ca_name=name)
    except OSError as exc:
        where = exc.filename or directory
        raise SimError(f"{where}: {exc.strerror or exc}") from None

    if kept is not None:
        click.echo(
            f"operational CA {kept.name!r} exists in {layout.ca_dir} and "
            "is kept"
        )
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
    type=CertificateFile(),
    required=True,
    help="Trust anchor of the broker's certificate (PEM).",
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
    type=click.IntRange(0, MAX_SECONDS),
    default=0,
    show_default=True,
    help="Seconds notBefore lies in the past.",
)
@click.option(
    "--max-lifetime",
    type=_SECONDS,
    help="Cap on the lifetime, in seconds.",
)
@click.option(
    "--mqtt-version",
    type=click.Choice(["5", "3.1.1"]),
    default="5",
    show_default=True,
    help="MQTT protocol to speak (RabbitMQ 3.10 knows 3.1.1 only).",
)
def run(
    directory: Path,
    broker: str,
    ca_file: Path,
    lifetime: int,
    backdate: int,
    max_lifetime: int | None,
    mqtt_version: str,
) -> None:
    """Answer enrollment requests until SIGINT or SIGTERM."""
    host, port = _host_port(broker)
    layout = Layout(directory)
    layout.check()
    _check_credential(layout)
    with hold_directory(directory):
        service = Registrar.from_directory(
            directory,
            host,
            port,
            ca_file,
            lifetime=lifetime,
            backdate=backdate,
            max_lifetime=max_lifetime,
            mqtt_version=mqtt_version,
        )
        _serve(service, host, port)


def _check_credential(layout: Layout) -> None:
    """Refuse a registrar credential that TLS could not load, naming it.

    Found out by TLS, an empty or mangled file only says "pem lib" and
    names neither file.
    """
    try:
        chain = x509.load_pem_x509_certificates(
            read_small_file(layout.chain_path, "registrar certificate")
        )
    except ValueError:
        chain = []
    if not chain:
        raise SimError(f"{layout.chain_path} holds no PEM certificate")
    try:
        serialization.load_pem_private_key(
            read_small_file(layout.key_path, "registrar key"), None
        )
    except TypeError:
        pass  # encrypted: a key all the same, TLS asks for its password
    except (ValueError, UnsupportedAlgorithm):
        raise SimError(f"{layout.key_path} holds no PEM private key") from None


def _serve(service: Registrar, host: str, port: int) -> None:
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
@click.argument("device_id", callback=_device_id)
@click.option(
    "--serial",
    callback=_serial,
    help="The board's serial number.",
)
@_DIR
def add(device_id: str, serial: str | None, directory: Path) -> None:
    """Register a device so that the registrar serves it."""
    with _registry(directory) as registry:
        device = registry.add(device_id, serial)
    click.echo(f"{device.device_id} {device.status}")


_FACTORY_CA = click.option(
    "--factory-ca",
    type=DirectoryPath(),
    help="Directory of the factory CA; needed for --crl-out and "
    "--idevid-serial.",
)
_CRL_OUT = click.option(
    "--crl-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the broker's new CRL file here: a CRL of each CA's "
    "intermediate, with every revocation recorded.",
)
_CRL_DAYS = click.option(
    "--crl-days",
    type=click.IntRange(1, MAX_DAYS),
    default=1,
    show_default=True,
    help="Days until the written CRLs' next update.",
)
_BROKER_PID = click.option(
    "--broker-pid",
    type=click.IntRange(1),
    help="Send this mosquitto SIGHUP after --crl-out, so that it reads "
    "the new CRL; sessions already open stay open.",
)


@registrar.command()
@click.argument("device_id", callback=_device_id)
@_DIR
@_FACTORY_CA
@_CRL_OUT
@_CRL_DAYS
@_BROKER_PID
def revoke(
    device_id: str,
    directory: Path,
    factory_ca: Path | None,
    crl_out: Path | None,
    crl_days: int,
    broker_pid: int | None,
) -> None:
    """Refuse the device from now on (compromised, stolen).

    Every operational certificate issued to it is revoked; its factory
    certificate stays valid, so it can still report that it needs
    service.
    """
    put_out_of_service(
        device_id,
        REVOKED,
        directory,
        factory_ca,
        (),
        crl_out,
        crl_days,
        broker_pid,
    )


@registrar.command()
@click.argument("device_id", callback=_device_id)
@_DIR
@_FACTORY_CA
@click.option(
    "--idevid-serial",
    "idevid_serials",
    multiple=True,
    callback=_hex_serials,
    metavar="HEX",
    help="Serial of the device's factory certificate, to revoke too; "
    "repeat for more. Needs --factory-ca.",
)
@_CRL_OUT
@_CRL_DAYS
@_BROKER_PID
def decommission(
    device_id: str,
    directory: Path,
    factory_ca: Path | None,
    idevid_serials: list[int],
    crl_out: Path | None,
    crl_days: int,
    broker_pid: int | None,
) -> None:
    """Refuse the device from now on (retired from service).

    Every operational certificate issued to it is revoked, and its
    factory certificate too when --idevid-serial names it.
    """
    put_out_of_service(
        device_id,
        DECOMMISSIONED,
        directory,
        factory_ca,
        idevid_serials,
        crl_out,
        crl_days,
        broker_pid,
    )
    if not idevid_serials:
        click.echo(
            "its factory certificate stays valid: --idevid-serial with "
            "--factory-ca revokes it",
            err=True,
        )


def check_outputs(crl_out: Path, broker_pid: int | None) -> None:
    """Refuse a CRL path or broker pid that cannot work, before any change.

    The registry is changed first and the CRL written after: found out
    only then, a bad path or pid would leave a device revoked in the
    records but still accepted by the broker.
    """
    if crl_out.is_dir():
        raise SimError(f"--crl-out {crl_out} is a directory")
    resolved = crl_out.resolve()
    # Kernel and device trees look writable to root and some of their
    # entries pass for regular files (/proc/version): none is a crlfile.
    if resolved.parts[1:2] in (("proc",), ("sys",), ("dev",)):
        raise SimError(
            f"--crl-out {crl_out} is under /{resolved.parts[1]}, not a "
            "file the broker can read a CRL from"
        )
    if crl_out.exists() and not resolved.is_file():
        raise SimError(f"--crl-out {crl_out} exists and is not a regular file")
    # A mistyped path must not cost a CA its key or a device its config:
    # only a crlfile is replaced, as 'ca crl --out' replaces only a CRL.
    if crl_out.exists() and not holds(crl_out, CRL_FILE):
        raise SimError(
            f"--crl-out {crl_out} exists and holds something other than "
            "CRLs; it is left alone"
        )
    parent = crl_out.absolute().parent
    if not parent.is_dir():
        raise SimError(f"--crl-out {crl_out}: no directory {parent}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SimError(f"--crl-out {crl_out}: {parent} is not writable")
    if broker_pid is not None:
        check_broker_pid(broker_pid)


def put_out_of_service(
    device_id: str,
    status: str,
    directory: Path,
    factory_dir: Path | None,
    idevid_serials: Sequence[int],
    crl_out: Path | None,
    crl_days: int,
    broker_pid: int | None,
) -> None:
    if (crl_out is not None or idevid_serials) and factory_dir is None:
        raise click.UsageError(
            "--crl-out and --idevid-serial need --factory-ca"
        )
    if broker_pid is not None and crl_out is None:
        raise click.UsageError("--broker-pid needs --crl-out")
    if crl_out is not None:
        check_outputs(crl_out, broker_pid)

    layout = Layout(directory)
    operational = CertificateAuthority.load(layout.ca_dir)
    factory = None
    if factory_dir is not None:
        factory = CertificateAuthority.load(factory_dir)
    with _registry(directory) as registry:
        before = registry.get(device_id)
        revoked = revoke_device(
            registry,
            operational,
            device_id,
            factory,
            status,
            idevid_serials=idevid_serials,
        )
    again = before is not None and before.status == status
    click.echo(_status_change(device_id, status, before))
    for serial in revoked:
        click.echo(f"revoked serial {serial:x}")

    if crl_out is None or factory is None:
        return
    next_update = datetime.timedelta(days=crl_days)
    write_crl(crl_out, combined_crl(factory, operational, next_update))
    # Published again on purpose: the earlier run may have failed to
    # write or signal, and a repeat is how an operator retries.
    if again:
        click.echo(f"wrote {crl_out} again, with every recorded revocation")
    else:
        click.echo(f"wrote {crl_out}")
    if broker_pid is None:
        click.echo("reload a running mosquitto: kill -HUP <its pid>")
        return
    signal_reload(broker_pid)
    click.echo(f"sent SIGHUP to {broker_pid}")


def _status_change(device_id: str, status: str, before: Device | None) -> str:
    """The line saying a device's new status, or since when it had it."""
    if before is None or before.status != status:
        return f"{device_id} {status}"
    since = f"{before.changed_at:%Y-%m-%dT%H:%M:%SZ}"
    return f"{device_id} is already {status} (since {since})"


@registrar.command(name="list")
@_DIR
def list_devices(directory: Path) -> None:
    """One line per device: id, status, serial, certificates issued."""
    with _registry(directory, read_only=True) as registry:
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


def _kept_ca(layout: Layout) -> CertificateAuthority | None:
    """The operational CA an earlier init made, if there is one."""
    if not layout.root_path.exists():
        return None
    return CertificateAuthority.load(layout.ca_dir)


def _check_kept_name(
    ctx: click.Context, name: str, kept: CertificateAuthority
) -> None:
    """Refuse a --name given for a directory whose CA has another name.

    Left out, --name means whatever the kept CA is called.
    """
    given = ctx.get_parameter_source("name") != ParameterSource.DEFAULT
    if given and name != kept.name:
        raise SimError(
            f"--name {shorten(name)}: {kept.directory} already holds the "
            f"operational CA {kept.name!r}; nothing changed"
        )


def _check_kept_files(layout: Layout) -> None:
    """Refuse a layout whose files are not files, before making any."""
    paths = [
        layout.registry_path,
        layout.chain_path,
        layout.key_path,
        *(layout.ca_dir / name for name in CA_FILES),
    ]
    for path in paths:
        # A directory or a device in the place of a file would fail only
        # after part of the layout was made.
        if os.path.lexists(path) and not path.is_file():
            raise SimError(f"{path} is not a regular file")


def _registry(directory: Path, read_only: bool = False) -> Registry:
    layout = Layout(directory)
    layout.check()
    return Registry(layout.registry_path, read_only)


def _host_port(value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    # isdigit() alone would take digits of other scripts, such as "٣".
    digits = port.isascii() and port.isdigit()
    if not host or not digits or not 0 < int(port) < 65536:
        raise click.BadParameter(
            f"{value!r} is not HOST:PORT", param_hint="--broker"
        )
    if not _is_host(host):
        raise click.BadParameter(
            f"{host!r} is not a host name or IP address",
            param_hint="--broker",
        )
    return host, int(port)


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        return True

    try:
        name = host.encode("idna").decode("ascii")
    except UnicodeError:
        return False
    labels = name.removesuffix(".").split(".")
    # A name ending in a number reads as a (bad) IPv4 address, 999.1.1.1.
    if labels[-1].isdigit():
        return False
    return len(name) <= 253 and all(_LABEL.fullmatch(x) for x in labels)
