"""The crash campaign, short: every kill point, both key stores."""

from __future__ import annotations

import re

from campaign_run import run_campaign

from device_agent.renewal import STEPS

KILLS = 16


def test_short_crash_campaign_leaves_every_device_with_a_credential():
    summary = run_campaign(
        "crash",
        "--kills", str(KILLS), "--seed", "7",
        "--stores", "tpm,software",
    ).stdout  # fmt: skip

    assert f"{KILLS} SIGKILLs" in summary
    assert re.search(r"^failed\s+\|\s+0\s", summary, re.MULTILINE)
    assert re.search(
        rf"^total\s+\|\s+{KILLS // 2}\s+\|\s+{KILLS // 2}\s+\|\s+{KILLS}\s",
        summary,
        re.MULTILINE,
    )
    for point in (*STEPS, "random"):
        assert re.search(
            rf"^{point}\s+\|\s+1\s+\|\s+1\s+\|\s+2\s", summary, re.MULTILINE
        )
