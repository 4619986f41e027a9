"""Run the simulator as ``python -m firmware_sim``."""

from firmware_sim import main

main()
