"""Errors of the simulators, rooted in the agent's AgentError."""

from __future__ import annotations

from device_agent.errors import AgentError


class SimulatorError(AgentError):
    """A simulator could not be started, reached, or stopped."""


class PortInUseError(SimulatorError):
    """A server could not bind its port because another process holds it.

    Ports are picked free but bound later by another process, so a caller
    that picked the port can pick another one and try again.
    """

    def __init__(self, port: int, what: str) -> None:
        super().__init__(f"{what}: port {port} is in use")
        self.port = port
