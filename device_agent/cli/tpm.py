"""``device-agent tpm info``: what the TPM says about itself."""

from __future__ import annotations

import json

import click

from device_agent.cli.main import App, pass_app


@click.group()
def tpm() -> None:
    """Inspect the TPM."""


@tpm.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--tcti", help="TPM to ask [default: the config's tcti].")
@pass_app
def info(app: App, as_json: bool, tcti: str | None) -> None:
    """Show the TPM's maker, firmware and loaded handles."""
    from device_agent.keys.tpm import TPMKeyStore

    report = TPMKeyStore(tcti or app.settings(need_state=False).tcti).info()
    if as_json:
        click.echo(json.dumps(report, indent=2, sort_keys=True))
        return
    for name, value in report.items():
        shown = (
            ", ".join(value) or "none" if isinstance(value, list) else value
        )
        click.echo(f"{name + ':':20}{shown}")


COMMANDS = [tpm]
