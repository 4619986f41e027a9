"""Running a campaign's short version from a test, as a person would.

The campaigns are scripts run from the repository top with ``python -m
campaigns.NAME``; the short tests run them the same way, in a child, so
that what is tested is what a person runs.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

TOP = Path(__file__).resolve().parent.parent
TIMEOUT = 120


def run_campaign(name: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run one campaign; it must exit 0, or the test shows what it said."""
    result = subprocess.run(
        [sys.executable, "-m", f"campaigns.{name}", *args],
        cwd=TOP,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result
