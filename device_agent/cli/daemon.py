"""``device-agent run``, ``renew`` and ``reset``: the operational identity."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import click

from device_agent import credential
from device_agent.cli.main import App, pass_app
from device_agent.config import Settings
from device_agent.errors import RenewalError, StoreError


@click.command()
@pass_app
def run(app: App) -> None:
    """Run the agent: stay connected, send heartbeats, renew on time.

    SIGTERM stops it, SIGHUP reloads the config, SIGUSR1 renews now.
    """
    from device_agent.agent import Agent

    Agent(app.load_settings).run()


@click.command()
@click.option("--now", "now", is_flag=True, required=True, help="Renew now.")
@pass_app
def renew(app: App, now: bool) -> None:
    """Renew the operational certificate now.

    Asks the running agent when there is one; otherwise runs the renewal
    here, over a session of its own.
    """
    from device_agent.agent import running_pid

    settings = app.settings()
    pid = running_pid(settings.state_dir)
    if pid is not None:
        before = _last_result(settings.status_file)
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            raise StoreError(f"the agent (pid {pid}) is gone") from None
        click.echo(f"asked the running agent (pid {pid}) to renew now")
        result = _wait_for_result(settings, before)
        click.echo(f"agent: {result}")
        if not result.startswith(("renewed", "enrolled")):
            raise RenewalError("agent", result)
        return
    leaf = credential.renew_once(settings)
    click.echo(
        f"renewed: certificate {leaf.serial_number:x} "
        f"valid until {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z"
    )


def _last_result(path: Path) -> str | None:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    result = report.get("last_result") if isinstance(report, dict) else None
    return str(result) if result is not None else None


def _wait_for_result(settings: Settings, before: str | None) -> str:
    """The agent's next result after ``before``, as it writes status."""
    deadline = time.monotonic() + settings.enroll_timeout + 30
    while time.monotonic() < deadline:
        result = _last_result(settings.status_file)
        changed = result is not None and result != before
        if changed and not str(result).startswith("link down"):
            return str(result)
        time.sleep(0.2)
    return "no result yet; see 'device-agent status'"


@click.command()
@click.option("--yes", is_flag=True, help="Confirm: destroy the keys.")
@pass_app
def reset(app: App, yes: bool) -> None:
    """Destroy the operational keys and certificates; keep the factory ones.

    The device then enrolls a new operational identity with its factory
    identity, as on its first boot.
    """
    from device_agent.agent import running_pid

    settings = app.settings()
    if not yes:
        raise click.UsageError(
            "reset destroys the operational keys; add --yes"
        )
    pid = running_pid(settings.state_dir)
    if pid is not None:
        raise StoreError(f"stop the running agent (pid {pid}) first")
    destroyed = credential.reset(settings)
    plural = "" if destroyed == 1 else "s"
    click.echo(
        f"operational identity destroyed ({destroyed} generation{plural}); "
        "factory identity kept"
    )


COMMANDS = [run, renew, reset]
