"""The TPM fault campaign, short: every scenario, fewer handshakes."""

from __future__ import annotations

import re

from campaign_run import run_campaign

HANDSHAKES = 30
RENEWALS = 3


def test_short_tpm_fault_campaign_recovers_and_leaks_no_handle():
    result = run_campaign(
        "tpm_faults",
        "--handshakes", str(HANDSHAKES), "--renewals", str(RENEWALS),
    )  # fmt: skip
    summary = result.stdout

    assert "Traceback" not in result.stderr
    assert re.search(r"^failed\s+\|\s+0\s", summary, re.MULTILINE)
    for scenario in (
        "swtpm absent at start",
        "swtpm restarted under the agent",
        "dictionary-attack lockout",
        "out of object memory",
        f"{HANDSHAKES} handshakes, {RENEWALS} renewals",
    ):
        assert re.search(rf"^{scenario}\s+\| ok\s", summary, re.MULTILINE)
    # A TPM without free slots is named as such, not as a PEM error.
    assert "(TPM rc 0x902)" in summary
    assert "after 0" in summary
