"""The world around a device: factory, registrar, broker and fleets."""

from __future__ import annotations

from typing import Any


def main() -> Any:
    """The ``firmware-sim`` command."""
    from device_agent.cli import start

    return start("firmware_sim.cli:run")
