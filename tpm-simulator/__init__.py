"""A software TPM (swtpm) on loopback for bring-up and tests."""

from __future__ import annotations

from typing import Any


def main() -> Any:
    """The ``tpm-simulator`` command."""
    from device_agent.cli import start

    return start("tpm_simulator.cli:run")
