"""Run the tpm-simulator command with ``python -m tpm_simulator``."""

from tpm_simulator.cli import run

run()
