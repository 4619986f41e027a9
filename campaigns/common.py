"""What the campaigns share: their options, devices, scratch and ending.

Each campaign is its own script with its own checks; only the plumbing
around them lives here, so that every campaign parses ``--stores`` and
``--seed`` the same way and ends the same way.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import random
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from bench import report
from bench.world import Device, World

STORES = ("tpm", "software")


def argument_parser(module: str, doc: str | None) -> argparse.ArgumentParser:
    """A parser whose help is the campaign's docstring, layout kept."""
    return argparse.ArgumentParser(
        prog=f"python -m campaigns.{module}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def choose(
    parser: argparse.ArgumentParser,
    option: str,
    text: str,
    choices: Sequence[str],
) -> list[str]:
    """A comma-separated list of ``choices``, or a usage error."""
    chosen = [item for item in text.split(",") if item]
    if not chosen or set(chosen) - set(choices):
        parser.error(f"{option} takes a list from {','.join(choices)}")
    return chosen


def positive(
    parser: argparse.ArgumentParser,
    options: argparse.Namespace,
    *names: str,
    zero: bool = False,
) -> None:
    """A usage error unless each option is a finite number above zero.

    With ``zero``, zero is allowed too. ``names`` are attribute names,
    ``tight_queue`` for ``--tight-queue``.
    """
    for name in names:
        value = getattr(options, name)
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            least = "must not be negative" if zero else "must be positive"
            parser.error(f"--{name.replace('_', '-')} {least}")


def seed(given: int | None) -> int:
    """The seed asked for, or a fresh one that the table will show."""
    if given is None:
        return random.SystemRandom().randrange(2**32)
    return given


def seeded_arguments(
    module: str,
    doc: str | None,
    count: str,
    default: int,
    argv: Sequence[str] | None,
) -> argparse.Namespace:
    """Options of a campaign of ``count`` seeded blows over key stores.

    ``count`` is the option that says how many (``--kills``); the plan
    spreads them over ``--stores`` and draws its chances from ``--seed``.
    """
    parser = argument_parser(module, doc)
    parser.add_argument(count, type=int, default=default)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stores", default=",".join(STORES))
    options = parser.parse_args(argv)
    if getattr(options, count.removeprefix("--")) < 1:
        parser.error(f"{count} must be at least 1")
    options.stores = choose(parser, "--stores", options.stores, STORES)
    options.seed = seed(options.seed)
    return options


def add_point_rows(
    table: report.Table,
    points: Iterable[str],
    stores: Sequence[str],
    blows: collections.Counter[tuple[str, str]],
    survived: collections.Counter[tuple[str, str]],
) -> None:
    """A row per point and a total: blows per store, devices that lived.

    Both counters are keyed by (store, point).
    """
    for point in points:
        counts = [str(blows[(s, point)]) for s in stores]
        lived = sum(survived[(s, point)] for s in stores)
        table.add(point, *counts, str(lived))
    table.rule()
    counts = [
        str(sum(n for (s, _), n in blows.items() if s == store))
        for store in stores
    ]
    table.add("total", *counts, str(sum(survived.values())))
    table.rule()


def enrolled(here: World, name: str, tpm: bool) -> Device:
    """A device of ``here`` that has already renewed once.

    The first renewal enrolls the operational identity over the factory
    one, so the campaign then works on renewals of that identity.
    """
    device = here.device(name, tpm=tpm, trust_anchor=here.client_ca_file)
    device.run("renew", "--now")
    return device


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A directory for logs, gone afterwards whatever happened."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def failed(failures: Sequence[str]) -> bool:
    """Print every failure to stderr; True if there was any."""
    for failure in failures:
        print(f"!! {failure}", file=sys.stderr)
    return bool(failures)


def check_exercised(failures: list[str], connects: int, renewals: int) -> None:
    """Record a failure if the run never connected or renewed cleanly.

    A table that says every device survived means little if no device
    was ever asked to use its credential afterwards.
    """
    if connects < 1:
        failures.append("no connect was checked")
    if renewals < 1:
        failures.append("no clean renewal was checked")
