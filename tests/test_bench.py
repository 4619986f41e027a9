"""The benchmarks under bench/ still run end to end against the agent.

Only that they finish and print their table is checked here: speed and
memory are judged by reading the ratios they print, never by a test.
"""

from __future__ import annotations

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
    assert "RSS |" in result.stdout
    assert "CPU |" in result.stdout
    assert "!! objects left loaded" not in result.stdout
