"""Stopping the child processes the simulator, benches and campaigns run.

Every daemon they start (mosquitto, agents, workers) is stopped the same
way: asked first, so that it can write its last log lines and close its
connections, and killed only if it does not go in time, so that a stop
never hangs a test run.
"""

from __future__ import annotations

import subprocess
from typing import Any


def reap_process(
    process: subprocess.Popen[Any], timeout: float | None
) -> bool:
    """Wait for ``process`` to exit, SIGKILL it after ``timeout``.

    True if it exited by itself, False if it had to be killed.
    """
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False
    return True


def stop_process(
    process: subprocess.Popen[Any], timeout: float | None
) -> bool:
    """SIGTERM ``process`` if it runs, then :func:`reap_process` it.

    True if it exited by itself (or had already), False if killed.
    """
    if process.poll() is not None:
        return True
    process.terminate()
    return reap_process(process, timeout)
