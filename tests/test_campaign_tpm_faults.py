"""The TPM fault campaign, short: every scenario, fewer handshakes."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
HANDSHAKES = 30
RENEWALS = 3


def test_short_tpm_fault_campaign_recovers_and_leaks_no_handle():
    result = subprocess.run(
        [
            sys.executable, "-m", "campaigns.tpm_faults",
            "--handshakes", str(HANDSHAKES), "--renewals", str(RENEWALS),
        ],
        cwd=TOP, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    summary = result.stdout

    assert result.returncode == 0, summary + result.stderr
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
