"""Run the simulator as ``python -m firmware_sim``."""

from firmware_sim.cli import run

run()
