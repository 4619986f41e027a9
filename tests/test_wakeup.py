"""The agent's wake-up: signal handlers and threads end its sleep."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

from device_agent.agent import Wakeup

STRESS = """
import signal, sys, time
from device_agent.agent import Wakeup
wake = Wakeup()
signal.signal(signal.SIGALRM, lambda signum, frame: wake.set())
signal.setitimer(signal.ITIMER_REAL, 0.0002, 0.0002)
end = time.monotonic() + 2
while time.monotonic() < end:
    wake.wait(0.001)
signal.setitimer(signal.ITIMER_REAL, 0)
print("done")
"""


def test_a_signal_ends_the_sleep_at_once():
    wake = Wakeup()
    previous = signal.signal(signal.SIGALRM, lambda s, f: wake.set())
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        began = time.monotonic()
        wake.wait(10)
        assert time.monotonic() - began < 2
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_a_thread_ends_the_sleep_and_the_wake_up_is_used_once():
    wake = Wakeup()
    threading.Timer(0.1, wake.set).start()
    began = time.monotonic()
    wake.wait(10)
    assert time.monotonic() - began < 2
    for _ in range(5000):  # more than a pipe holds: never blocks
        wake.set()
    wake.wait(0)
    began = time.monotonic()
    wake.wait(0.3)  # nothing pending any more
    assert time.monotonic() - began >= 0.25


def test_signals_in_the_middle_of_every_wait_never_deadlock():
    """Thousands of handlers land inside wait(); the loop ends on time.

    threading.Event deadlocked here: its set() takes a lock the main
    thread holds inside its wait().
    """
    result = subprocess.run(
        [sys.executable, "-c", STRESS],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert result.stdout.strip() == "done", result.stderr
