"""The daemon at rest: RSS and CPU while it holds a session; status start.

Run from the repository top::

    .venv/bin/python -m bench.rest [--runs N]

``device-agent run`` with a TPM key enrolls its operational identity, then
holds its session with a heartbeat every 10 s for ``3 * N`` seconds (60 s
by default); its CPU time comes from /proc before and after, its memory
from VmRSS and VmHWM at the end, and the helper process that made its
key must have ended by then. Then the daemon starts again with the
operational identity it holds and its memory is taken once more.
Baselines, in the same run: Python processes that only import the
libraries the daemon uses (tpm2-pytss is only ever loaded by the helper
process) and sleep, the floor a Python agent cannot go under; for
reference, the same with tpm2-pytss, which the daemon held before its
TPM operations moved to the helper; and for ``device-agent status``
from a cold start, ``python -c pass``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench import report
from bench.stopping import stoppable
from bench.world import Device, world
from device_agent.keys import tpmproc
from firmware_sim.process import stop_process

SAMPLE_SECONDS = 3.0
HEARTBEAT = 10.0
TARGET_RSS_MB = 40.0
TARGET_CPU_PERCENT = 0.5
TARGET_STATUS_SECONDS = 0.3
SLEEP = "; print('ready', flush=True); time.sleep(3600)"
# What the daemon loads: the TLS provider talks to the TPM, and the
# helper process, not the daemon, loads tpm2-pytss.
LIBRARIES = "import paho.mqtt.client, cryptography.x509, click, time"
LIBRARIES_WITH_PYTSS = (
    "import paho.mqtt.client, cryptography.x509, tpm2_pytss, click, time"
)


@stoppable
def main() -> None:
    options = report.arguments("bench.rest", __doc__ or "")
    report.quiet_logging()
    hold = SAMPLE_SECONDS * options.runs

    with world(registered=["rest-1"]) as made:
        device = made.device(
            "rest-1", tpm=True, trust_anchor=made.client_ca_file
        )
        device.configure(heartbeat_interval=HEARTBEAT)
        agent = _start_agent(device)
        baseline = _start_baseline(LIBRARIES)
        heavy = _start_baseline(LIBRARIES_WITH_PYTSS)
        try:
            _wait_enrolled(device)
            _wait_helper_ended(agent.pid)
            agent_cpu, base_cpu = _cpu_over(hold, agent.pid, baseline.pid)
            agent_mem = report.memory(agent.pid)
            base_mem = report.memory(baseline.pid)
            heavy_mem = report.memory(heavy.pid)
            helpers = _children(agent.pid)
        finally:
            for process in (agent, baseline, heavy):
                stop_process(process, timeout=15)
        restarted_mem = _restarted_memory(device)
        status_times = [_timed(device.command("status")) for _ in range(5)]
        python_times = [
            _timed([sys.executable, "-c", "pass"]) for _ in range(5)
        ]
        handles = len(made.swtpm.transient_handles())

    _print(hold, agent_cpu, base_cpu, agent_mem, base_mem)
    rss = restarted_mem[0]
    print(
        f"RSS, restarted (no key made) | {rss:.1f} MB | "
        f"{base_mem[0]:.1f} MB, ratio "
        f"{report.ratio(rss, base_mem[0])} | target <= {TARGET_RSS_MB:g} "
        f"MB: {report.verdict(rss, TARGET_RSS_MB)}"
    )
    print(
        f"helper processes left at rest | {helpers} | "
        f"libraries with tpm2_pytss {heavy_mem[0]:.1f} MB | "
        + ("ok" if helpers == 0 else "!! the helper did not end")
    )
    status = report.median(status_times)
    python = report.median(python_times)
    print(
        f"device-agent status, cold | {report.ms(status)} | python -c pass "
        f"{report.ms(python)}, ratio {report.ratio(status, python)} | "
        f"target < {TARGET_STATUS_SECONDS} s: "
        f"{report.verdict(status, TARGET_STATUS_SECONDS)}"
    )
    if handles:
        print(f"!! objects left loaded in swtpm: {handles}")
    report.summarize(
        "device-agent run at rest, RSS, after enrolling a new TPM key",
        f"{agent_mem[0]:.1f} MB",
        f"its libraries imported {base_mem[0]:.1f} MB "
        f"(with tpm2_pytss {heavy_mem[0]:.1f} MB)",
        f"target <= {TARGET_RSS_MB:g} MB: "
        + report.verdict(agent_mem[0], TARGET_RSS_MB),
    )
    report.summarize(
        "device-agent run at rest, RSS, restarted (no key made)",
        f"{restarted_mem[0]:.1f} MB",
        f"its libraries imported {base_mem[0]:.1f} MB",
        f"target <= {TARGET_RSS_MB:g} MB: "
        + report.verdict(restarted_mem[0], TARGET_RSS_MB),
    )
    report.summarize(
        f"device-agent run at rest, CPU, heartbeat {HEARTBEAT:g} s",
        f"{agent_cpu:.3f} %",
        f"libraries asleep {base_cpu:.3f} %",
        f"target < {TARGET_CPU_PERCENT} %: "
        + report.verdict(agent_cpu, TARGET_CPU_PERCENT),
    )
    report.summarize(
        "device-agent status, cold start",
        report.ms(status),
        f"python -c pass {report.ms(python)}",
        f"target < {TARGET_STATUS_SECONDS} s: "
        + report.verdict(status, TARGET_STATUS_SECONDS),
    )


def _start_agent(device: Device) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*device.command("run")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _restarted_memory(device: Device) -> tuple[float, float]:
    """The daemon's memory when it starts with its operational identity."""
    (device.state / "status.json").unlink(missing_ok=True)
    agent = _start_agent(device)
    try:
        _wait_enrolled(device)
        time.sleep(SAMPLE_SECONDS)
        return report.memory(agent.pid)
    finally:
        stop_process(agent, timeout=15)


def _children(pid: int) -> int:
    """How many child processes ``pid`` has (its TPM helper, if running)."""
    found = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += len((task / "children").read_text().split())
    return found


def _wait_helper_ended(pid: int) -> None:
    """Wait out the helper's idle time: at rest the daemon has no child."""
    deadline = time.monotonic() + tpmproc.IDLE_SECONDS + 10
    while _children(pid) and time.monotonic() < deadline:
        time.sleep(0.2)


def _start_baseline(imports: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", imports + SLEEP],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    process.stdout.readline()
    return process


def _wait_enrolled(device: Device, timeout: float = 60.0) -> None:
    status_file = device.state / "status.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.loads(status_file.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("identity") == "ldevid" and state.get("state") == (
            "connected"
        ):
            return
        time.sleep(0.2)
    raise SystemExit("the agent did not enroll in time")


def _cpu_over(seconds: float, *pids: int) -> list[float]:
    """Percent of one core each process used over ``seconds``."""
    before = [_cpu_seconds(pid) for pid in pids]
    started = time.monotonic()
    time.sleep(seconds)
    elapsed = time.monotonic() - started
    after = [_cpu_seconds(pid) for pid in pids]
    return [
        100 * (b - a) / elapsed for a, b in zip(before, after, strict=True)
    ]


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _timed(command: list[str]) -> float:
    started = time.monotonic()
    subprocess.run(command, capture_output=True, check=True)
    return time.monotonic() - started


def _print(
    hold: float,
    agent_cpu: float,
    base_cpu: float,
    agent_mem: tuple[float, float],
    base_mem: tuple[float, float],
) -> None:
    print(
        f"rest: device-agent run, TPM key, heartbeat every {HEARTBEAT:g} s, "
        f"held {hold:g} s after enrolling"
    )
    print("measure | agent | baseline: libraries imported, asleep | verdict")
    rss, peak = agent_mem
    print(
        f"RSS, key made by the helper | {rss:.1f} MB (peak {peak:.1f}) | "
        f"{base_mem[0]:.1f} MB, "
        f"ratio {report.ratio(rss, base_mem[0])} | target <= "
        f"{TARGET_RSS_MB:g} MB: {report.verdict(rss, TARGET_RSS_MB)}"
    )
    print(
        f"CPU | {agent_cpu:.3f} % of a core | {base_cpu:.3f} % | "
        f"target < {TARGET_CPU_PERCENT} %: "
        f"{report.verdict(agent_cpu, TARGET_CPU_PERCENT)}"
    )


if __name__ == "__main__":
    sys.exit(main())
