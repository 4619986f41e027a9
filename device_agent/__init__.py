"""device-agent: TPM-held device identity and mutual-TLS MQTT."""
