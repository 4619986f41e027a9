"""``device-agent init``: write a config file for this device."""

from __future__ import annotations

from pathlib import Path

import click

from device_agent import config
from device_agent.cli.main import App, pass_app
from device_agent.errors import ChainError, ConfigError
from device_agent.store import CredentialStore, write_atomic


def _broker(value: str) -> tuple[str, int | None]:
    """HOST, HOST:PORT, an IPv6 address, or [IPv6]:PORT."""
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError("broker", f"{value!r} is not [ADDRESS]:PORT")
        port = rest[1:]
        if rest and not port:
            raise ConfigError("broker", f"{value!r}: no port after ':'")
    elif value.count(":") > 1:
        return value, None  # a bare IPv6 address
    else:
        host, colon, port = value.partition(":")
        if colon and not port:
            raise ConfigError("broker", f"{value!r}: no port after ':'")
    if not port:
        return host, None
    if not (port.isascii() and port.isdigit()):
        raise ConfigError("broker", f"{value!r} is not HOST:PORT")
    return host, int(port)


@click.command()
@click.option("--device-id", required=True, help="Unique id (the CN).")
@click.option("--serial", help="Hardware serial number.")
@click.option(
    "--key-store",
    type=click.Choice(config.KEY_STORES),
    default="auto",
    show_default=True,
)
@click.option("--tcti", default="device:/dev/tpmrm0", show_default=True)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False),
    default="/var/lib/device-agent",
    show_default=True,
)
@click.option("--broker", metavar="HOST[:PORT]", required=True)
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="CA bundle the broker's certificate must chain to.",
)
@click.option(
    "--trust-anchor",
    type=click.Path(dir_okay=False, path_type=Path),
    help="CA bundle our own chain must build to [default: --ca-file].",
)
@click.option("--server-name", help="Name in the broker's certificate.")
@click.option("--force", is_flag=True, help="Replace an existing config.")
@pass_app
def init(
    app: App,
    device_id: str,
    serial: str | None,
    key_store: str,
    tcti: str,
    state_dir: str,
    broker: str,
    ca_file: Path,
    trust_anchor: Path | None,
    server_name: str | None,
    force: bool,
) -> None:
    """Write the config file for this device."""
    if not state_dir.strip():
        raise click.BadParameter("must not be empty", param_hint="--state-dir")
    if not broker.strip():
        raise click.BadParameter("must not be empty", param_hint="--broker")
    host, port = _broker(broker)
    values = {
        "device_id": device_id,
        "serial": serial,
        "key_store": key_store,
        "tcti": tcti,
        "state_dir": str(Path(state_dir).absolute()),
        "broker_host": host,
        "broker_port": port,
        "ca_file": str(ca_file.absolute()),
        "trust_anchor": str(trust_anchor.absolute()) if trust_anchor else None,
        "server_name": server_name,
    }
    config.build(values)
    for field, path in (("ca_file", ca_file), ("trust_anchor", trust_anchor)):
        if path is not None and not path.is_file():
            raise ConfigError(field, f"{path}: no such file")
        if path is not None:
            _check_bundle(field, path)

    target = app.config_path
    if target.exists() and not force:
        raise ConfigError(
            str(target), "exists already; use --force to replace it"
        )
    if target.exists() and not target.is_file():
        raise ConfigError(str(target), "is not a regular file")
    CredentialStore(Path(state_dir)).prepare()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(target, config.to_toml(values).encode(), mode=0o644)
    except OSError as exc:
        raise ConfigError(
            str(exc.filename or target), exc.strerror or str(exc)
        ) from None
    click.echo(f"wrote {target}")


def _check_bundle(field: str, path: Path) -> None:
    """Refuse a CA file without a certificate now, not at first connect.

    Found later, an empty or garbled bundle shows only as a TLS failure
    far from the command that named it.
    """
    from device_agent.chain import load_anchors

    try:
        load_anchors(path)
    except ChainError as exc:
        why = exc.detail.removeprefix(f"trust anchor {path}: ")
        raise ConfigError(
            field, f"{path}: not a CA certificate bundle: {why}"
        ) from None


COMMANDS = [init]
