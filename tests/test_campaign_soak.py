"""The soak campaign, short: renewals every few seconds stay flat."""

from __future__ import annotations

import re

from campaign_run import run_campaign


def test_short_soak_renews_often_and_stays_flat():
    summary = run_campaign(
        "soak",
        "--minutes", "0.15", "--lifetime", "3", "--warmup", "2",
        "--stores", "tpm",
    ).stdout  # fmt: skip

    assert re.search(r"^failed checks\s+\|\s+0\s", summary, re.MULTILINE)
    renewals = re.search(
        r"^soak-tpm\s+\|\s+renewals\s+\|\s+(\d+)\s+\|\s+(\d+)",
        summary,
        re.MULTILINE,
    )
    assert renewals is not None, summary
    start, end = (int(n) for n in renewals.groups())
    # Certificates of 3 s renewed at half their lifetime: 9 s hold a
    # few renewals, each with a new TPM key and a session switch.
    assert start >= 2 and end - start >= 3
    for figure in ("open fds", "threads", "TPM transient objects"):
        row = re.search(
            rf"^soak-tpm\s+\|\s+{figure}\s+\|\s+(\d+)\s+\|\s+(\d+)",
            summary,
            re.MULTILINE,
        )
        assert row is not None, figure
        assert int(row.group(2)) <= int(row.group(1)), row.group(0)
