"""The renewal hook runner, with real processes."""

from __future__ import annotations

import logging

from device_cli import wait_for
from test_renewal import _alive

from device_agent.hook import HookRunner


def test_a_hook_past_its_time_is_stopped_with_what_it_started(
    tmp_path, caplog
):
    child = tmp_path / "child.pid"
    runner = HookRunner(timeout=0.5)
    with caplog.at_level(logging.WARNING):
        runner.start(f"sh -c 'sleep 30 & echo $! > {child}; wait'", {"A": "1"})
        wait_for(child.exists, 5, "the hook to start its child")
        wait_for(lambda: runner.running() == 0, 5, "the hook to be stopped")
    assert "renewal hook stopped after 0.5 s without finishing" in caplog.text
    assert "exited" not in caplog.text
    pid = int(child.read_text())
    wait_for(lambda: not _alive(pid), 5, "the hook's child to end")


def test_a_hook_gets_its_variables_and_a_missing_one_is_one_line(
    tmp_path, caplog
):
    out = tmp_path / "said"
    runner = HookRunner()
    runner.start(
        f"sh -c 'echo $RENEWED_SERIAL > {out}'", {"RENEWED_SERIAL": "ab"}
    )
    wait_for(lambda: runner.running() == 0, 5, "the hook to end")
    assert out.read_text() == "ab\n"

    runner.start(str(tmp_path / "no-such-hook"), {})
    assert runner.running() == 0
    assert "renewal hook failed to start" in caplog.text
