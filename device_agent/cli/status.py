"""``device-agent status``: identity, key and certificate at a glance."""

from __future__ import annotations

import json
from typing import Any

import click

from device_agent import credential
from device_agent.cli.edge import printable
from device_agent.cli.main import App, pass_app
from device_agent.errors import StoreError


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def status(app: App, as_json: bool) -> None:
    """Show the device's identity, key store and certificate."""
    report = credential.status(app.settings())
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
    else:
        for line in _lines(report):
            click.echo(printable(line))
    errors = [p for p in report["problems"] if p["level"] == credential.ERROR]
    if errors:
        # Everything was shown; the exit code tells a script or a
        # monitor that the credential cannot work as it is.
        count = (
            "1 problem stands"
            if len(errors) == 1
            else f"{len(errors)} problems stand"
        )
        raise StoreError(f"{count} in the credential's way (see above)")


def _lines(report: dict[str, Any]) -> list[str]:
    lines = [f"device:          {report['device_id']}"]
    if report["serial"]:
        lines.append(f"serial:          {report['serial']}")
    names = {"idevid": "factory", "ldevid": "operational"}
    for lineage, identity in report["identities"].items():
        lines += _identity_lines(names.get(lineage, lineage), identity)
    agent = report.get("agent")
    if agent:
        if agent.get("running"):
            head = f"{agent.get('state')} (running)"
            renewal = agent.get("next_renewal") or "not scheduled"
        else:
            seen = agent.get("updated")
            head = f"not running (last seen {agent.get('state')}" + (
                f" at {seen})" if isinstance(seen, str) else ")"
            )
            renewal = "none (the agent is not running)"
        lines += [
            f"agent:           {head}",
            f"  clock:         {agent.get('clock')} "
            f"{agent.get('clock_reason') or ''}".rstrip(),
            f"  next renewal:  {renewal}",
            f"  last result:   {agent.get('last_result')}",
            f"  failures:      {agent.get('failures_in_row')} renewals "
            f"in a row",
        ]
        if agent.get("connect_failures_in_row"):
            lines.append(
                f"                 {agent['connect_failures_in_row']} "
                f"connection rounds in a row"
            )
    tpm = report["tpm"]
    if tpm["checked"]:
        answer = "present" if tpm["present"] else "not answering"
        lines.append(f"TPM:             {answer} at {tpm['tcti']}")
    else:
        lines.append("TPM:             not checked (no key in it)")
    for problem in report["problems"]:
        label = "PROBLEM:" if problem["level"] == "error" else "warning:"
        lines.append(f"{label:17}{problem['problem']}")
    return lines


def _identity_lines(name: str, identity: dict[str, Any]) -> list[str]:
    key = identity["key"]
    if key is None:
        return [f"{name + ':':17}no key"]
    where = (
        "TPM"
        if key["hardware_protected"]
        else "software, NOT hardware-protected"
    )
    lines = [f"{name + ':':17}key in {where} (generation {key['generation']})"]
    if identity["pending_generation"] is not None:
        lines.append(
            f"  pending key:   generation {identity['pending_generation']} "
            "awaits its certificate"
        )
    cert = identity["certificate"]
    if cert is None:
        lines.append("  certificate:   none installed")
        return lines
    if cert["state"] == "unreadable":
        lines.append(f"  certificate:   UNREADABLE: {cert['detail']}")
        return lines
    return [
        *lines,
        f"  certificate:   {cert['serial']} ({cert['state']})",
        f"  subject:       {cert['subject']}",
        f"  issuer:        {cert['issuer']}",
        f"  not after:     {cert['not_after']}",
        f"  days left:     {cert['days_left']}",
    ]


COMMANDS = [status]
