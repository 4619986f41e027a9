"""Run the agent as ``python -m device_agent``."""

from device_agent.cli.main import main

main()
