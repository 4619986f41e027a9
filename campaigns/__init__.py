"""Reliability campaigns, each rerunnable as ``python -m campaigns.NAME``."""
