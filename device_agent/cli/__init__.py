"""The ``device-agent`` command line: one module per group of verbs."""
