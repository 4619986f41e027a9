"""Medians, percentiles, ratios and the table a benchmark prints."""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

DEFAULT_RUNS = 20


RUN_DESCRIPTION = """\
Run every benchmark under bench/ with the project's venv, each against a
baseline measured in the same run; print each one's table, then one
table of the headline figures and the commit they were measured on.
Exits non-zero if any benchmark failed. The options go to every
benchmark; they are checked once, here, before any of them runs.
"""


def parser(
    prog: str,
    description: str,
    more: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.ArgumentParser:
    """The parser of the options every benchmark takes, and ``more``."""
    made = argparse.ArgumentParser(
        prog=prog,
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    made.add_argument(
        "--runs",
        type=int,
        default=DEFAULT_RUNS,
        help=f"repetitions of each measurement (default {DEFAULT_RUNS})",
    )
    if more is not None:
        more(made)
    return made


def parse(
    made: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """``argv`` parsed and checked, or a usage error (exit status 2)."""
    options = made.parse_args(argv)
    if options.runs < 1:
        made.error("--runs must be at least 1")
    return options


def arguments(
    module: str,
    description: str,
    more: Callable[[argparse.ArgumentParser], None] | None = None,
) -> argparse.Namespace:
    """The options every benchmark takes, ``--runs N``, and ``more``."""
    return parse(parser(f"python -m {module}", description, more))


def quiet_logging() -> None:
    """Warnings and errors to stderr; benchmarks add their own handlers.

    The TSS libraries' own error lines are silenced too: a run stopped
    midway flushes keys of a TPM already stopped, which they would
    report after the run's one line.
    """
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(
        logging.Formatter("%(levelname)s %(name)s: %(message)s")
    )
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def memory(pid: int | str) -> tuple[float, float]:
    """VmRSS and VmHWM (the peak) of a process, in MB; pid may be "self"."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0]) / 1024
    return values["VmRSS"], values["VmHWM"]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def p90(values: Sequence[float]) -> float:
    """The 90th percentile by nearest rank: a value that was measured."""
    ordered = sorted(values)
    return ordered[max(math.ceil(0.9 * len(ordered)) - 1, 0)]


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def ratio(numerator: float, denominator: float) -> str:
    return f"{numerator / denominator:.2f}" if denominator else "n/a"


def verdict(value: float, target: float) -> str:
    return "ok" if value <= target else "OVER TARGET"


class Table:
    """Rows of cells, printed with columns aligned to their widest cell."""

    def __init__(self, title: str, header: Sequence[str]) -> None:
        self.title = title
        self.rows: list[list[str]] = [list(header)]
        self._rules: set[int] = {1}

    def add(self, *cells: str) -> None:
        self.rows.append(list(cells))

    def rule(self) -> None:
        """A line between the rows above and the rows to come."""
        self._rules.add(len(self.rows))

    def render(self) -> str:
        count = max(len(row) for row in self.rows)
        rows = [row + [""] * (count - len(row)) for row in self.rows]
        widths = [max(len(row[i]) for row in rows) for i in range(count)]
        line = "-+-".join("-" * width for width in widths)
        out = [self.title, "=" * len(self.title)]
        for index, row in enumerate(rows):
            if index in self._rules:
                out.append(line)
            cells = [
                cell.ljust(width)
                for cell, width in zip(row, widths, strict=True)
            ]
            out.append(" | ".join(cells).rstrip())
        return "\n".join(out)

    def print(self) -> None:
        print(self.render(), flush=True)


SUMMARY_ENV = "BENCH_SUMMARY"


def summarize(
    what: str, value: str, baseline: str = "", note: str = ""
) -> None:
    """A row for the one table ``bench/run`` prints after every benchmark.

    The rows go, as JSON lines, to the file named by $BENCH_SUMMARY; a
    benchmark run on its own, without it, prints only its own table.
    """
    path = os.environ.get(SUMMARY_ENV)
    if not path:
        return
    row = {"what": what, "value": value, "baseline": baseline, "note": note}
    with open(path, "a", encoding="utf-8") as stream:
        stream.write(json.dumps(row) + "\n")


def check_run_arguments(argv: Sequence[str]) -> int:
    """Check the arguments ``bench/run`` passes to every benchmark.

    A usage error is said once and ends with status 2; ``--help`` prints
    what ``bench/run`` does, to stdout, which is how the script knows to
    run nothing.
    """
    parse(parser("bench/run", RUN_DESCRIPTION), argv)
    return 0


if __name__ == "__main__":
    sys.exit(check_run_arguments(sys.argv[1:]))
