"""The ``device-agent`` entry point: settings, logging and the error edge."""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from device_agent import config, store
from device_agent.cli import edge
from device_agent.errors import ConfigError, StoreError

logger = logging.getLogger(__name__)


class App:
    """What every command gets: where the config is, and the settings."""

    def __init__(self, config_flag: Path | None, overrides: dict[str, str]):
        self.config_path = config.config_path(config_flag, os.environ)
        self.overrides = overrides
        self._settings: config.Settings | None = None

    def settings(self, need_state: bool = True) -> config.Settings:
        """The settings; with ``need_state``, refuse a missing state_dir.

        Only ``init`` makes the state directory. Any other verb that made
        it (through a lock file, say) would leave an empty store behind
        and report success on a device that was never set up.
        """
        if self._settings is None:
            self._settings = self.load_settings()
        if need_state:
            _check_state_dir(self._settings.state_dir)
        return self._settings

    def load_settings(self) -> config.Settings:
        """Read the settings afresh, as a reload does."""
        return config.load(self.config_path, self.overrides)


pass_app = click.make_pass_decorator(App)


def _check_state_dir(state_dir: Path) -> None:
    try:
        mode = state_dir.stat().st_mode
    except FileNotFoundError:
        raise StoreError(
            f"state_dir {state_dir} does not exist (run init first)"
        ) from None
    except OSError as exc:
        raise StoreError(
            f"cannot reach state_dir {state_dir} ({exc.strerror})"
        ) from None
    if not stat.S_ISDIR(mode):
        raise StoreError(f"state_dir {state_dir}: not a directory")
    store.check_access(state_dir)


def _parse_overrides(values: Sequence[str]) -> dict[str, str]:
    overrides = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(item, "--set takes FIELD=VALUE")
        overrides[name.strip()] = value
    return overrides


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_flag",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Config file [default: $DEVICE_AGENT_CONFIG, else "
    "/etc/device-agent/agent.toml].",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Override one setting (repeatable).",
)
@click.option("-v", "--verbose", is_flag=True, help="Log state changes.")
@click.option("--debug", is_flag=True, help="Log everything; tracebacks.")
@click.version_option(package_name="device-agent")
@click.pass_context
def cli(
    ctx: click.Context,
    config_flag: Path | None,
    overrides: tuple[str, ...],
    verbose: bool,
    debug: bool,
) -> None:
    """Identity agent: a device key in the TPM, its certificate, and a
    mutual-TLS MQTT session made with it."""
    level = logging.DEBUG if debug else logging.INFO if verbose else None
    edge.configure_logging(level or logging.WARNING)
    if not debug:
        # The TSS libraries print their own errors to stderr; the agent
        # reports TPM failures itself, one line each.
        os.environ.setdefault("TSS2_LOG", "all+NONE")
    ctx.obj = App(config_flag, _parse_overrides(overrides))


def _register() -> None:
    from device_agent.cli import (
        chain,
        connect,
        daemon,
        keys,
        setup,
        status,
        tpm,
    )

    for module in (setup, keys, chain, status, connect, daemon, tpm):
        for command in module.COMMANDS:
            cli.add_command(command)


_register()


def main(argv: Sequence[str] | None = None) -> Any:
    """The ``device-agent`` command."""
    return edge.run(cli, "device-agent", argv)
