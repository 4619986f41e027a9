"""``device-agent status``: identity, key and certificate at a glance."""

from __future__ import annotations

import json
from typing import Any

import click

from device_agent import credential
from device_agent.cli.main import App, pass_app


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_app
def status(app: App, as_json: bool) -> None:
    """Show the device's identity, key store and certificate."""
    report = credential.status(app.settings())
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    for line in _lines(report):
        click.echo(line)


def _lines(report: dict[str, Any]) -> list[str]:
    lines = [f"device:        {report['device_id']}"]
    if report["serial"]:
        lines.append(f"serial:        {report['serial']}")
    key = report["key"]
    if key is None:
        lines.append("key:           none (run 'device-agent keygen')")
    elif key["hardware_protected"]:
        lines.append(f"key:           TPM (generation {key['generation']})")
    else:
        lines.append(
            f"key:           software, NOT hardware-protected "
            f"(generation {key['generation']})"
        )
    if report["pending_generation"] is not None:
        lines.append(
            f"pending key:   generation {report['pending_generation']} "
            "awaits its certificate"
        )
    cert = report["certificate"]
    if cert is None:
        lines.append("certificate:   none installed")
    else:
        lines += [
            f"certificate:   {cert['serial']} ({cert['state']})",
            f"subject:       {cert['subject']}",
            f"issuer:        {cert['issuer']}",
            f"not after:     {cert['not_after']}",
            f"days left:     {cert['days_left']}",
        ]
    tpm = report["tpm"]
    if tpm["checked"]:
        answer = "present" if tpm["present"] else "not answering"
        lines.append(f"TPM:           {answer} at {tpm['tcti']}")
    else:
        lines.append("TPM:           not checked (key_store = software)")
    return lines


COMMANDS = [status]
