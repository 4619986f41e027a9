"""A campaign or benchmark stopped by a signal leaves nothing behind.

Each runs as a person runs it, from the repository top, with its
temporary directories in a directory of the test's own, so that every
process it started (swtpm, mosquitto, agents) can be told from any
other by its command line, and every file it made can be found.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from campaign_run import TOP

READY_TIMEOUT = 90
STOP_TIMEOUT = 60


def _processes_under(directory: Path) -> dict[int, str]:
    """Processes whose command line names a path in ``directory``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            words = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        line = " ".join(w.decode(errors="replace") for w in words if w)
        if str(directory) in line:
            found[int(entry.name)] = line
    return found


def _agent_runs(line: str) -> bool:
    return "device_agent" in line and line.endswith(" run")


def _broker_runs(line: str) -> bool:
    return line.startswith("mosquitto ")


@contextlib.contextmanager
def _shared_tmp() -> Iterator[Path]:
    """A TMPDIR that mosquitto, working as its own user, can enter."""
    path = Path(tempfile.mkdtemp(prefix="signal-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        # Whatever the run under test left is the test's to end.
        for pid in _processes_under(path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", str(path)], check=False)


def _started_and_stopped(
    module: str,
    args: list[str],
    ready: Callable[[str], bool],
    signum: int,
) -> tuple[subprocess.CompletedProcess[str], dict[int, str], list[str]]:
    """Run ``module`` until ``ready`` names a process, then signal it.

    Returns how it ended, what processes of its own were left, and the
    names left in its temporary directory.
    """
    with _shared_tmp() as tmp:
        process = subprocess.Popen(
            [sys.executable, "-m", module, *args],
            cwd=TOP,
            env={**os.environ, "TMPDIR": str(tmp)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while not any(map(ready, _processes_under(tmp).values())):
                assert process.poll() is None, process.communicate()
                assert time.monotonic() < deadline, f"{module} never ready"
                time.sleep(0.2)

            # Only the campaign gets the signal, not its children: it
            # is what must stop them.
            process.send_signal(signum)
            stdout, stderr = process.communicate(timeout=STOP_TIMEOUT)
        finally:
            if process.poll() is None:
                process.kill()
                process.communicate()
        ended = subprocess.CompletedProcess(
            process.args, process.returncode, stdout, stderr
        )
        return ended, _processes_under(tmp), sorted(os.listdir(tmp))


@pytest.mark.parametrize(
    ("module", "args", "ready", "signum"),
    [
        (
            "campaigns.soak",
            ["--minutes", "1", "--stores", "software"],
            _agent_runs,
            signal.SIGTERM,
        ),
        (
            "campaigns.soak",
            ["--minutes", "1", "--stores", "software"],
            _agent_runs,
            signal.SIGINT,
        ),
        (
            "campaigns.network",
            ["--stores", "software"],
            _agent_runs,
            signal.SIGTERM,
        ),
        (
            "campaigns.crash",
            ["--kills", "50", "--stores", "software"],
            _broker_runs,
            signal.SIGHUP,
        ),
        ("bench.renewal", ["--runs", "2"], _broker_runs, signal.SIGINT),
    ],
    ids=["soak-term", "soak-int", "network-term", "crash-hup", "bench-int"],
)
def test_a_stop_signal_ends_the_run_with_one_line_and_nothing_left(
    module, args, ready, signum
):
    ended, left, files = _started_and_stopped(module, args, ready, signum)

    assert ended.returncode == 128 + signum, ended.stderr
    assert "Traceback" not in ended.stderr, ended.stderr
    said = ended.stderr.strip().splitlines()
    if signum == signal.SIGINT:
        assert said[-1:] == ["error: interrupted"], ended.stderr
    else:
        name = signal.Signals(signum).name
        assert said[-1:] == [f"error: stopped by {name}"], ended.stderr
    assert left == {}
    assert files == []
