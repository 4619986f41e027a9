"""Errors of the firmware simulator, rooted in the agent's AgentError."""

from __future__ import annotations

from device_agent.errors import AgentError


class SimError(AgentError):
    """Something in the simulated world around a device went wrong."""


class CAError(SimError):
    """The manufacturing CA cannot be created, loaded, or refuses to sign."""


class BrokerError(SimError):
    """The MQTT broker cannot be configured, started, or reloaded."""
