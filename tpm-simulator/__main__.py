"""Run the tpm-simulator command with ``python -m tpm_simulator``."""

from tpm_simulator import main

main()
