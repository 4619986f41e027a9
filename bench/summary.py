"""The one table ``bench/run`` prints: each benchmark's headline rows.

Each benchmark, run by ``bench/run``, appends its rows to the file named
by $BENCH_SUMMARY (see :func:`bench.report.summarize`); this prints them
with the commit the tree was at, and whether it had changes not yet
committed, since a figure means little without the code it measured.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench import report

TOP = Path(__file__).resolve().parent.parent


def commit() -> str:
    """The short hash of HEAD, marked when the tree differs from it."""
    try:
        head = _git("rev-parse", "--short", "HEAD")
        changes = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"{head} with uncommitted changes" if changes else head


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=TOP, capture_output=True, text=True, check=True
    ).stdout.strip()


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m bench.summary ROWS_FILE", file=sys.stderr)
        return 2
    try:
        lines = Path(argv[1]).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        lines = []
    table = report.Table(
        f"device-agent benchmarks, commit {commit()}",
        ["what", "median", "baseline, same run", "ratio, target"],
    )
    for line in lines:
        row = json.loads(line)
        table.add(row["what"], row["value"], row["baseline"], row["note"])
    table.print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
