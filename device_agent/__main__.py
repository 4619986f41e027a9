"""Run the agent as ``python -m device_agent``."""

from device_agent.cli import device_agent

device_agent()
