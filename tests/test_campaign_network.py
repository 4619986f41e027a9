"""The network campaign, short; and the offline queue it relies on."""

from __future__ import annotations

import re

import pytest
from campaign_run import run_campaign
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode

from device_agent.errors import SessionError
from device_agent.session import Outbox


def test_short_network_campaign_reconnects_and_loses_no_heartbeat():
    summary = run_campaign(
        "network",
        "--outage", "2", "--stall", "1.5", "--cap", "2",
        "--heartbeat", "0.2", "--tight-queue", "5",
        "--stores", "software",
    ).stdout  # fmt: skip

    assert re.search(r"^failed\s+\|\s+0\s", summary, re.MULTILINE)
    for fault in (
        "broker restart",
        "broker killed 2 s",
        "3 handshakes cut",
        "reset mid-session",
        "closed mid-session",
        "stalled 1.5 s",
    ):
        rows = re.findall(rf"^{fault}\s+\|.*$", summary, re.MULTILINE)
        assert len(rows) == 2, fault
        assert all("never" not in row for row in rows), rows

    rows = {
        m.group(1): [int(n) for n in m.group(2).split("|")]
        for m in re.finditer(
            r"^(net-\w+)\s+\|\s+([\d |]+)$", summary, re.MULTILINE
        )
    }
    queue, sent, delivered, dropped, queued, _, lost = rows["net-software"]
    assert (queue, dropped, lost) == (1000, 0, 0)
    assert sent > 50 and delivered == sent - queued
    # The tight queue holds 5 messages; a 2 s outage at 5 heartbeats a
    # second overflows it, and what it refused is counted, not lost.
    queue, sent, delivered, dropped, queued, _, lost = rows["net-tight"]
    assert (queue, lost) == (5, 0)
    assert dropped > 0 and delivered + dropped + queued == sent


def test_outbox_refuses_past_its_limit_and_counts_what_it_refused():
    outbox = Outbox(limit=2)
    outbox.put("t", b"1", 1)
    outbox.put("t", b"2", 1)

    for _ in range(3):
        with pytest.raises(SessionError) as refused:
            outbox.put("t", b"3", 1)
        assert refused.value.reason == "queue_full"

    assert outbox.dropped == 3
    assert len(outbox) == 2


def test_outbox_counts_messages_in_flight_against_its_limit():
    outbox = Outbox(limit=2)
    first = outbox.put("t", b"1", 1)
    taken = outbox.take()
    assert taken is first
    outbox.sent(token=1, mid=7, message=first)
    outbox.put("t", b"2", 1)

    with pytest.raises(SessionError):
        outbox.put("t", b"3", 1)
    outbox.acked(token=1, mid=7, code=None)

    assert first.done.is_set() and first.refused is None
    outbox.put("t", b"3", 1)
    assert len(outbox) == 2


def test_messages_lost_with_a_connection_are_queued_again_in_order():
    outbox = Outbox(limit=10)
    messages = [outbox.put("t", str(n).encode(), 1) for n in range(4)]
    for mid, message in enumerate([outbox.take(), outbox.take()], 1):
        assert message is not None
        outbox.sent(token=5, mid=mid, message=message)

    assert outbox.put_back(token=5) == 2
    again = [outbox.take() for _ in range(4)]

    assert again == messages
    assert outbox.take() is None


def test_an_acknowledgement_before_sent_is_not_missed():
    outbox = Outbox(limit=10)
    message = outbox.put("t", b"x", 1)
    outbox.take()
    refused = ReasonCode(PacketTypes.PUBACK, "Not authorized")

    outbox.acked(token=3, mid=9, code=refused)
    outbox.sent(token=3, mid=9, message=message)

    assert message.done.is_set()
    assert message.refused == refused
    assert len(outbox) == 0
