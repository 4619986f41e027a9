"""The bad-input campaign, short: one case in five of every group, and
a few hundred fuzz inputs per parser."""

from __future__ import annotations

import re

import pytest
from campaign_run import run_campaign

from device_agent.errors import SessionError
from device_agent.session import check_topic

EVERY = 5
FUZZ = 150
GROUPS = (
    "chain files",
    "config files",
    "CLI arguments",
    "enrollment responses",
    "registrar requests",
)
PARSERS = (
    "chain reader",
    "config loader",
    "config text",
    "enrollment response decode",
    "registrar request decode",
    "clock decode",
    "registrar CSR checks",
)


def test_short_bad_input_campaign_refuses_each_case_cleanly():
    summary = run_campaign(
        "bad_input",
        "--every", str(EVERY), "--fuzz", str(FUZZ),
    ).stdout  # fmt: skip

    assert re.search(r"^failed\s+\|\s+0\s", summary, re.MULTILINE)
    for group in GROUPS:
        row = re.search(
            rf"^{group}\s+\|\s+(\d+)\s+\|\s+(\d+)", summary, re.MULTILINE
        )
        assert row, f"{group} missing:\n{summary}"
        assert int(row[1]) >= 3
        assert row[1] == row[2]
    total = re.search(r"^total\s+\|\s+(\d+)\s+\|\s+(\d+)", summary, re.M)
    assert total and total[1] == total[2] and int(total[1]) >= 35
    for parser in PARSERS:
        assert re.search(
            rf"^fuzz: {parser}\s+\|\s+{FUZZ}\s", summary, re.MULTILINE
        ), parser


@pytest.mark.parametrize(
    "topic", ["a\x7fb", "devices/x/\x1b[2J", "a\x85b", "tab\there"]
)
def test_a_topic_with_a_control_character_is_refused_before_sending(topic):
    """mosquitto would drop the whole connection over it."""
    with pytest.raises(SessionError) as info:
        check_topic(topic, wildcards=True)
    assert "control character" in str(info.value)
    check_topic("devices/x/\u2028ok", wildcards=False)
