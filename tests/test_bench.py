"""The benchmarks under bench/ still run end to end against the agent.

Only that they finish and print their table is checked here: speed and
memory are judged by reading the ratios they print, never by a test.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("module", "title"),
    [("bench.connect", "connect: "), ("bench.renewal", "renewal: ")],
)
def test_a_benchmark_runs_and_prints_its_table(module, title):
    result = subprocess.run(
        [sys.executable, "-m", module, "--runs", "2"],
        cwd=TOP,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(title), result.stdout
    assert "TPM2_" in result.stdout
    assert "!! objects left loaded" not in result.stdout


def _run(module, *args, summary=None):
    env = dict(os.environ)
    if summary is not None:
        env["BENCH_SUMMARY"] = str(summary)
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=TOP,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
        env=env,
    )


def test_the_registrar_benchmark_compares_with_raw_signing(tmp_path):
    rows = tmp_path / "rows.jsonl"

    result = _run("bench.registrar", "--runs", "2", summary=rows)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("registrar: "), result.stdout
    assert "cryptography alone" in result.stdout
    (row,) = [json.loads(line) for line in rows.read_text().splitlines()]
    assert row["value"].endswith("/s")
    assert float(row["value"].removesuffix("/s")) > 0
    assert "ratio" in row["note"]


def test_the_fleet_benchmark_makes_connects_and_frees_every_device(
    tmp_path,
):
    """Each device is made through the agent's code and gets a CONNACK;
    the run ends with every session closed (a worker that failed to
    connect one makes the benchmark fail)."""
    rows = tmp_path / "rows.jsonl"

    result = _run(
        "bench.fleet", "--devices", "12", "--runs", "2", summary=rows
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("fleet: 12 software-key devices")
    assert "memory, mosquitto" in result.stdout
    whats = [
        json.loads(line)["what"] for line in rows.read_text().splitlines()
    ]
    assert whats == [
        "fleet: 12 software-key devices manufactured",
        "fleet: 12 devices connected to one mosquitto, all held",
    ]


def test_the_summary_names_the_commit_and_prints_every_row(tmp_path):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(
        json.dumps(
            {"what": "a row", "value": "1 ms", "baseline": "b", "note": "n"}
        )
        + "\n"
    )

    result = _run("bench.summary", str(rows))

    assert result.returncode == 0, result.stderr
    title = result.stdout.splitlines()[0]
    assert title.startswith("device-agent benchmarks, commit ")
    assert "unknown" not in title
    assert "a row | 1 ms" in result.stdout


def test_the_daemon_at_rest_benchmark_runs():
    result = subprocess.run(
        [sys.executable, "-m", "bench.rest", "--runs", "1"],
        cwd=TOP,
        capture_output=True,
        text=True,
        timeout=110,
        check=False,
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("rest: "), result.stdout
    assert "RSS, key made by the helper |" in result.stdout
    assert "helper processes left at rest | 0 |" in result.stdout
    assert "RSS, restarted" in result.stdout
    assert "CPU |" in result.stdout
    assert "!! objects left loaded" not in result.stdout


def _bench_run(*args):
    return subprocess.run(
        [str(TOP / "bench" / "run"), *args],
        cwd=TOP,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_bench_run_refuses_a_bad_option_once_and_runs_nothing():
    result = _bench_run("--runs", "abc")

    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "usage: bench/run [-h] [--runs RUNS]",
        "bench/run: error: argument --runs: invalid int value: 'abc'",
    ]


@pytest.mark.parametrize("option", ["--help", "-h"])
def test_bench_run_help_says_what_it_does_and_runs_nothing(option):
    result = _bench_run(option)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: bench/run ")
    assert "Run every benchmark" in result.stdout
    assert "--runs RUNS" in result.stdout
    assert "## bench." not in result.stdout
    assert result.stderr == ""


def test_a_stop_signal_to_bench_run_stops_the_benchmark_and_the_run():
    """SIGTERM to bench/run alone reaches the running benchmark, which
    stops what it started; no later benchmark starts."""
    import signal
    import time

    run = subprocess.Popen(
        [str(TOP / "bench" / "run"), "--runs", "50"],
        cwd=TOP,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert run.stdout is not None
        assert run.stdout.readline().startswith("## bench.")
        time.sleep(3)  # inside the first benchmark's world
        run.send_signal(signal.SIGTERM)
        out, err = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 128 + signal.SIGTERM, err
    assert "error: stopped by SIGTERM" in err
    assert "Traceback" not in err
    assert "## bench." not in out  # nothing after the first


def test_a_stopped_fleet_ends_workers_caught_mid_conversation():
    """Stopped while a worker's 'connected' is unread: it still ends."""
    sys.path.insert(0, str(TOP))
    from bench import fleet

    script = (
        "import sys\n"
        "print('ready', flush=True)\n"
        "print('connected', flush=True)\n"
        "for line in sys.stdin:\n"
        "    if line.strip() == 'close':\n"
        "        print('closed', flush=True)\n"
        "        break\n"
    )
    worker = fleet.Worker.__new__(fleet.Worker)
    worker.process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.process.stdout is not None
    assert worker.process.stdout.readline() == "ready\n"
    stopping = fleet.Fleet.__new__(fleet.Fleet)
    stopping.workers = [worker]

    stopping.abandon()

    assert worker.process.returncode == 0
