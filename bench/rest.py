"""The daemon at rest: RSS and CPU while it holds a session; status start.

Run from the repository top::

    .venv/bin/python -m bench.rest [--runs N]

``device-agent run`` with a TPM key enrolls its operational identity, then
holds its session with a heartbeat every 10 s for ``3 * N`` seconds (60 s
by default); its CPU time comes from /proc before and after, its memory
from VmRSS and VmHWM at the end. Baselines, in the same run: a Python
process that only imports the libraries the agent uses and sleeps (the
floor a Python agent cannot go under), and for ``device-agent status``
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
from bench.world import Device, world

SAMPLE_SECONDS = 3.0
HEARTBEAT = 10.0
TARGET_RSS_MB = 40.0
TARGET_CPU_PERCENT = 0.5
TARGET_STATUS_SECONDS = 0.3
LIBRARIES = (
    "import paho.mqtt.client, cryptography.x509, tpm2_pytss, click, time; "
    "print('ready', flush=True); time.sleep(3600)"
)


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
        baseline = _start_baseline()
        try:
            _wait_enrolled(device)
            agent_cpu, base_cpu = _cpu_over(hold, agent.pid, baseline.pid)
            agent_mem = _memory(agent.pid)
            base_mem = _memory(baseline.pid)
        finally:
            for process in (agent, baseline):
                process.terminate()
                process.wait(timeout=15)
        status_times = [_timed(device.command("status")) for _ in range(5)]
        python_times = [
            _timed([sys.executable, "-c", "pass"]) for _ in range(5)
        ]
        handles = len(made.swtpm.transient_handles())

    _print(hold, agent_cpu, base_cpu, agent_mem, base_mem)
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


def _start_agent(device: Device) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*device.command("run")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def _start_baseline() -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", LIBRARIES],
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


def _memory(pid: int) -> tuple[float, float]:
    """VmRSS and VmHWM in MB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


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
        f"RSS | {rss:.1f} MB (peak {peak:.1f}) | {base_mem[0]:.1f} MB, "
        f"ratio {report.ratio(rss, base_mem[0])} | target <= "
        f"{TARGET_RSS_MB:g} MB: {report.verdict(rss, TARGET_RSS_MB)}"
    )
    print(
        f"CPU | {agent_cpu:.3f} % of a core | {base_cpu:.3f} % | "
        f"target < {TARGET_CPU_PERCENT} %: "
        f"{report.verdict(agent_cpu, TARGET_CPU_PERCENT)}"
    )


if __name__ == "__main__":
    main()
