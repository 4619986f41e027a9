"""``device-agent run``, ``renew`` and ``reset``: the operational identity."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import click

from device_agent import credential
from device_agent.cli.main import App, pass_app
from device_agent.config import Settings
from device_agent.errors import AgentError, RenewalError, StoreError


@click.command()
@pass_app
def run(app: App) -> None:
    """Run the agent: stay connected, send heartbeats, renew on time.

    SIGTERM stops it, SIGHUP reloads the config, SIGUSR1 renews now.
    """
    from device_agent import keys
    from device_agent.agent import Agent
    from device_agent.keys import tpmproc

    app.settings()  # refuses a missing state_dir before anything runs
    keys.serve_tpm_from_child()
    try:
        Agent(app.load_settings).run()
    finally:
        tpmproc.close_all()


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
        before = _answered(_read_status(settings.status_file))
        try:
            os.kill(pid, signal.SIGUSR1)
        except ProcessLookupError:
            raise StoreError(f"the agent (pid {pid}) is gone") from None
        click.echo(f"asked the running agent (pid {pid}) to renew now")
        answer = _wait_for_answer(settings, pid, before)
        if not answer.startswith(("renewed", "enrolled")):
            raise AgentAnswerError(pid, answer)
        click.echo(f"agent: {answer}")
        return
    leaf = credential.renew_once(settings)
    click.echo(
        f"renewed: certificate {leaf.serial_number:x} "
        f"valid until {leaf.not_valid_after_utc:%Y-%m-%d %H:%M:%S}Z"
    )


class AgentAnswerError(RenewalError):
    """The running agent answered a renew request with a failure."""

    def __init__(self, pid: int, answer: str) -> None:
        AgentError.__init__(self, f"the agent (pid {pid}): {answer}")
        self.step = "agent"
        self.detail = answer


def _read_status(path: Path) -> dict[str, Any]:
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return report if isinstance(report, dict) else {}


def _answered(report: dict[str, Any]) -> int | None:
    """How many renew requests the agent answered, per its status file.

    The count, not the result, tells an answer to this request: a second
    refusal for the same reason reads exactly like the first.
    """
    answers = report.get("renew_now")
    count = answers.get("answered") if isinstance(answers, dict) else None
    return count if type(count) is int else None


def _wait_for_answer(settings: Settings, pid: int, before: int | None) -> str:
    """The agent's answer to our request, as soon as status.json has it."""
    waited = settings.enroll_timeout + 30
    deadline = time.monotonic() + waited
    report: dict[str, Any] = {}
    while time.monotonic() < deadline:
        report = _read_status(settings.status_file)
        count = _answered(report)
        if count is not None and count > (before or 0):
            answers = report["renew_now"]
            return str(answers.get("answer") or report.get("last_result"))
        if not _alive(pid):
            return "it stopped before answering"
        time.sleep(0.1)
    state = report.get("state", "unknown")
    return (
        f"no answer in {waited:g} s (agent state: {state}; it renews once "
        "connected); see 'device-agent status'"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
