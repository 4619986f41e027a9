"""A campaign refuses a meaningless option in one line, before it starts."""

from __future__ import annotations

import subprocess
import sys

import pytest
from campaign_run import TOP

GROUPS = "chains,configs,cli,responses,requests"


@pytest.mark.parametrize(
    ("campaign", "args", "error"),
    [
        (
            "bad_input",
            ["--groups", "nope", "--fuzz", "0"],
            f"--groups takes a list from {GROUPS}",
        ),
        (
            "credscan",
            ["--top", "/nonexistent"],
            "--top /nonexistent: not the top of a git checkout",
        ),
        (
            "credscan",
            ["--top", "/"],
            "--top /: not the top of a git checkout",
        ),
        ("network", ["--cpu", "-1"], "--cpu must be positive"),
        ("network", ["--tight-queue", "0"], "--tight-queue must be positive"),
        ("network", ["--outage", "nan"], "--outage must be positive"),
        ("network", ["--tight-queue", "-1"], "--tight-queue must be positive"),
        ("soak", ["--minutes", "inf"], "--minutes must be positive"),
        (
            "soak",
            ["--rss-tolerance", "-1"],
            "--rss-tolerance must not be negative",
        ),
        (
            "soak",
            ["--fd-tolerance", "-1"],
            "--fd-tolerance must not be negative",
        ),
        ("crash", ["--kills", "0"], "--kills must be at least 1"),
    ],
)
def test_a_meaningless_option_is_one_usage_error(campaign, args, error):
    result = subprocess.run(
        [sys.executable, "-m", f"campaigns.{campaign}", *args],
        cwd=TOP,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"python -m campaigns.{campaign}: error: {error}"
