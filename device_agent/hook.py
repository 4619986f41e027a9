"""The renewal hook: a command the agent runs after each renewal.

A hook runs beside the agent, never in its way: heartbeats, the next
renewal and a stop do not wait for it. Each runs in a process group of
its own, so that stopping it also stops what it started (a shell
script's children), and the agent stops every hook still running when
it stops itself: none outlives it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import signal
import subprocess
import threading
import time

logger = logging.getLogger(__name__)

# How long a hook may run before it is stopped.
TIMEOUT = 60.0
# How long a hook may take to end after SIGTERM when the agent stops.
GRACE = 2.0


class HookRunner:
    """Starts the renewal hook and keeps track of the ones still running."""

    def __init__(self, timeout: float = TIMEOUT) -> None:
        self.timeout = timeout
        self._running: set[subprocess.Popen[bytes]] = set()
        self._lock = threading.Lock()
        self._stopping = False

    def start(self, command: str, variables: dict[str, str]) -> None:
        """Run ``command`` with ``variables`` added to its environment."""
        try:
            hook = subprocess.Popen(
                shlex.split(command),
                env=dict(os.environ, **variables),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
        except (OSError, ValueError) as exc:
            logger.warning("renewal hook failed to start: %s", exc)
            return
        with self._lock:
            self._running.add(hook)
        threading.Thread(
            target=self._await, args=(hook,), name="renewal-hook", daemon=True
        ).start()

    def running(self) -> int:
        """How many hooks have not ended yet."""
        with self._lock:
            return len(self._running)

    def stop_all(self) -> None:
        """Stop every hook still running: SIGTERM, then SIGKILL."""
        with self._lock:
            self._stopping = True
            hooks = list(self._running)
        if not hooks:
            return
        for hook in hooks:
            _signal_group(hook, signal.SIGTERM)
        deadline = time.monotonic() + GRACE
        for hook in hooks:
            try:
                hook.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(hook, signal.SIGKILL)
                hook.wait()
        logger.warning(
            "%d renewal hook(s) still running were stopped with the agent",
            len(hooks),
        )

    def _await(self, hook: subprocess.Popen[bytes]) -> None:
        err: bytes | None
        try:
            _, err = hook.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            _signal_group(hook, signal.SIGKILL)
            hook.communicate()
            err = None
            logger.warning(
                "renewal hook stopped after %g s without finishing",
                self.timeout,
            )
        with self._lock:
            self._running.discard(hook)
            stopping = self._stopping
        if err is None or stopping or not hook.returncode:
            return
        said = err.decode(errors="replace").strip().splitlines()[-3:]
        logger.warning(
            "renewal hook exited %d%s",
            hook.returncode,
            f": {' / '.join(said)}" if said else "",
        )


def _signal_group(hook: subprocess.Popen[bytes], signum: int) -> None:
    # The hook leads its own process group (start_new_session).
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(hook.pid, signum)
