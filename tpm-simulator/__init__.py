"""A software TPM (swtpm) on loopback for bring-up and tests."""
