"""The crash campaign, short: every kill point, both key stores."""

from __future__ import annotations

import contextlib
import re
import sys

import pytest
from campaign_run import TOP, run_campaign

from device_agent.renewal import STEPS

# The campaigns are scripts run from the repository top, not an installed
# package; the Ctrl-C tests import them from there.
sys.path.insert(0, str(TOP))

from campaigns import common, crash, powercut

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
    # One check on the way (kill 10) and, at the end, one per device.
    checked = KILLS // crash.CONNECT_EVERY + 2
    assert re.search(
        rf"^connects checked\s+\|\s+{checked}\s", summary, re.MULTILINE
    ), summary
    checked = KILLS // crash.RENEW_EVERY + 2
    assert re.search(
        rf"^clean renewals\s+\|\s+{checked}\s", summary, re.MULTILINE
    ), summary


@contextlib.contextmanager
def _ctrl_c(*args, **kwargs):
    raise KeyboardInterrupt
    yield


@pytest.mark.parametrize("campaign", [crash, powercut])
def test_ctrl_c_ends_a_campaign_with_one_line(campaign, monkeypatch, capsys):
    monkeypatch.setattr(campaign, "world", _ctrl_c)
    assert campaign.main(["--seed", "1"]) == 130
    captured = capsys.readouterr()
    assert captured.err == "error: interrupted\n"
    assert captured.out == ""


def test_a_run_that_checked_nothing_fails():
    failures: list[str] = []
    common.check_exercised(failures, connects=0, renewals=0)
    assert failures == [
        "no connect was checked",
        "no clean renewal was checked",
    ]
    failures = []
    common.check_exercised(failures, connects=1, renewals=1)
    assert failures == []
