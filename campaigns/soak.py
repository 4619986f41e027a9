"""Soak campaign: a daemon renewing every few seconds, watched for leaks.

Run from the repository top::

    .venv/bin/python -m campaigns.soak [--minutes 60] [--lifetime 6]
                                       [--stores tpm,software]

The registrar issues certificates of ``--lifetime`` seconds, and each
device runs ``device-agent run`` renewing at half of that, so an hour
holds well over 1,000 renewals per device, each with a new key (in
swtpm for a TPM device), a second session, the switch and the old
key's destruction. After ``--warmup`` renewals, and again at the end,
the campaign samples each daemon: resident memory, open file
descriptors, threads, and the TPM's transient objects. A sample is the
smallest value seen over one second, so a renewal caught in flight
does not count as growth. The figures are flat when the end is within
``--rss-tolerance`` MB and ``--fd-tolerance`` descriptors of the start,
the thread count is unchanged, and the TPM holds no more objects than
at the start. The exit status is non-zero otherwise, or if a renewal
failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from bench import report
from bench.stopping import stoppable
from bench.world import Device, World, world
from campaigns import common
from campaigns.common import STORES
from firmware_sim.process import stop_process
from firmware_sim.registrar import Policy

SAMPLE_SPAN = 1.0
SAMPLE_EVERY = 0.1
RENEWED = re.compile(r"renewed: generation \d+")
FAILED = re.compile(r"renewal failed at|^ERROR ")


@dataclasses.dataclass
class Sample:
    """One daemon's figures, each the smallest seen over a second."""

    renewals: int
    rss_kb: int
    fds: int
    threads: int
    tpm_objects: int | None


class Daemon:
    """A device's ``device-agent run`` process, and how to measure it."""

    def __init__(
        self,
        here: World,
        device: Device,
        tpm: bool,
        options: argparse.Namespace,
    ) -> None:
        self.here = here
        self.device = device
        self.tpm = tpm
        self.options = options
        self.log_path = device.dir / "agent.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        lifetime = self.options.lifetime
        settings = {
            "renew_fraction": 0.5,
            "renew_jitter": 0.05,
            "renew_floor": 0,
            "retry_base": 1,
            "retry_cap": max(1.0, lifetime / 4),
            "enroll_timeout": max(1.0, lifetime / 3),
            "heartbeat_interval": max(1.0, lifetime / 2),
        }
        overrides = [f"--set={k}={v}" for k, v in settings.items()]
        command = self.device.command("-v", *overrides, "run")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=log, start_new_session=True
            )

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, timeout=30)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def renewals(self) -> int:
        return len(RENEWED.findall(self.log_text()))

    def failures(self) -> list[str]:
        return [
            line
            for line in self.log_text().splitlines()
            if FAILED.search(line)
        ]

    def sample(self) -> Sample:
        """The smallest figures over ``SAMPLE_SPAN`` seconds."""
        assert self.process is not None
        proc = Path(f"/proc/{self.process.pid}")
        seen: list[tuple[int, int, int, int | None]] = []
        deadline = time.monotonic() + SAMPLE_SPAN
        while time.monotonic() < deadline:
            status = _fields((proc / "status").read_text())
            rss, threads = int(status["VmRSS"]), int(status["Threads"])
            fds = len(os.listdir(proc / "fd"))
            objects = (
                len(self.here.swtpm.transient_handles()) if self.tpm else None
            )
            seen.append((rss, fds, threads, objects))
            time.sleep(SAMPLE_EVERY)
        objects_seen = [s[3] for s in seen if s[3] is not None]
        return Sample(
            self.renewals(),
            min(s[0] for s in seen),
            min(s[1] for s in seen),
            min(s[2] for s in seen),
            min(objects_seen) if objects_seen else None,
        )


def _fields(status: str) -> dict[str, str]:
    """``/proc/PID/status`` as a dict of first words: kB for sizes."""
    fields = {}
    for line in status.splitlines():
        name, _, value = line.partition(":")
        if value.split():
            fields[name] = value.split()[0]
    return fields


def wait_for_renewals(
    daemons: list[Daemon], count: int, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(d.renewals() >= count for d in daemons):
            return
        if not all(d.alive() for d in daemons):
            return
        time.sleep(0.2)


def _progress(name: str, minutes: float, sample: Sample) -> str:
    objects = (
        ""
        if sample.tpm_objects is None
        else (f", TPM objects {sample.tpm_objects}")
    )
    return (
        f"{minutes:5.1f} min {name}: {sample.renewals} renewals, RSS "
        f"{sample.rss_kb / 1024:.1f} MB, fds {sample.fds}, threads "
        f"{sample.threads}{objects}"
    )


def judge(
    name: str, start: Sample, end: Sample, options: argparse.Namespace
) -> list[str]:
    problems = []
    grown = (end.rss_kb - start.rss_kb) / 1024
    if grown > options.rss_tolerance:
        problems.append(
            f"{name}: RSS grew {grown:.1f} MB (tolerance "
            f"{options.rss_tolerance:g} MB)"
        )
    if end.fds - start.fds > options.fd_tolerance:
        problems.append(f"{name}: open files {start.fds} -> {end.fds}")
    if end.threads > start.threads:
        problems.append(f"{name}: threads {start.threads} -> {end.threads}")
    if (
        start.tpm_objects is not None
        and end.tpm_objects is not None
        and end.tpm_objects > start.tpm_objects
    ):
        problems.append(
            f"{name}: TPM objects {start.tpm_objects} -> {end.tpm_objects}"
        )
    return problems


def build_table(
    rows: list[tuple[str, Sample, Sample, int]],
    options: argparse.Namespace,
    seconds: float,
    failures: int,
) -> report.Table:
    table = report.Table(
        f"soak campaign: {options.minutes:g} min, certificates of "
        f"{options.lifetime:g} s",
        ["device", "figure", "start", "end", "change"],
    )
    for name, start, end, failed in rows:
        hours = max(options.minutes / 60, 1e-9)
        rate = f"{(end.renewals - start.renewals) / hours:.0f}/h"
        figures = [
            ("renewals", start.renewals, end.renewals, rate),
            ("failed renewals", "", failed, ""),
            (
                "RSS",
                f"{start.rss_kb / 1024:.1f} MB",
                f"{end.rss_kb / 1024:.1f} MB",
                f"{(end.rss_kb - start.rss_kb) / 1024:+.1f} MB",
            ),
            ("open fds", start.fds, end.fds, f"{end.fds - start.fds:+d}"),
            ("threads", start.threads, end.threads,
             f"{end.threads - start.threads:+d}"),
        ]  # fmt: skip
        if start.tpm_objects is not None and end.tpm_objects is not None:
            figures.append(
                (
                    "TPM transient objects",
                    start.tpm_objects,
                    end.tpm_objects,
                    f"{end.tpm_objects - start.tpm_objects:+d}",
                )
            )
        for label, first, last, change in figures:
            table.add(name, label, str(first), str(last), change)
        table.rule()
    table.add("failed checks", str(failures), "", "", "")
    table.add(
        "tolerance",
        f"RSS +{options.rss_tolerance:g} MB, fds +{options.fd_tolerance}",
        "",
        "",
        "",
    )
    table.add("time", f"{seconds:.1f} s", "", "", "")
    return table


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = common.argument_parser("soak", __doc__)
    parser.add_argument(
        "--minutes", type=float, default=60.0,
        help="how long the daemons run after the warm-up (default 60)",
    )  # fmt: skip
    parser.add_argument(
        "--lifetime", type=int, default=6,
        help="certificate lifetime in seconds (default 6)",
    )  # fmt: skip
    parser.add_argument(
        "--warmup", type=int, default=20,
        help="renewals before the first sample (default 20)",
    )  # fmt: skip
    parser.add_argument(
        "--rss-tolerance", type=float, default=4.0,
        help="MB of RSS growth still called flat (default 4)",
    )  # fmt: skip
    parser.add_argument(
        "--fd-tolerance", type=int, default=0,
        help="open descriptors of growth still called flat (default 0)",
    )  # fmt: skip
    parser.add_argument(
        "--every", type=float, default=5.0,
        help="minutes between progress lines (default 5)",
    )  # fmt: skip
    parser.add_argument("--stores", default="tpm")
    options = parser.parse_args(argv)
    options.stores = common.choose(parser, "--stores", options.stores, STORES)
    common.positive(parser, options, "minutes", "every", "warmup")
    common.positive(
        parser, options, "rss_tolerance", "fd_tolerance", zero=True
    )
    if options.lifetime < 2:
        parser.error("--lifetime must be at least 2 seconds")
    return options


@stoppable
def main(argv: Sequence[str] | None = None) -> int:
    options = arguments(argv)
    report.quiet_logging()
    started = time.monotonic()
    names = {store: f"soak-{store}" for store in options.stores}
    failures: list[str] = []
    rows = []

    with world(registered=list(names.values())) as here:
        here.registrar.policy = Policy(lifetime=options.lifetime)
        daemons = {}
        for store, name in names.items():
            device = common.enrolled(here, name, tpm=store == "tpm")
            daemons[name] = Daemon(here, device, store == "tpm", options)
        try:
            for daemon in daemons.values():
                daemon.start()
            warmup_time = options.warmup * options.lifetime + 60
            wait_for_renewals(
                list(daemons.values()), options.warmup, warmup_time
            )
            starts = {n: d.sample() for n, d in daemons.items() if d.alive()}
            soak_started = time.monotonic()
            end = soak_started + options.minutes * 60
            next_report = soak_started + options.every * 60
            while time.monotonic() < end:
                if not all(d.alive() for d in daemons.values()):
                    break
                if time.monotonic() >= next_report:
                    minutes = (time.monotonic() - soak_started) / 60
                    for name, daemon in daemons.items():
                        print(_progress(name, minutes, daemon.sample()))
                    sys.stdout.flush()
                    next_report += options.every * 60
                time.sleep(min(1.0, max(end - time.monotonic(), 0.0)))
            ends = {n: d.sample() for n, d in daemons.items() if d.alive()}
        finally:
            for daemon in daemons.values():
                daemon.stop()
        for name, daemon in daemons.items():
            if name not in starts or name not in ends:
                failures.append(f"{name}: the daemon exited early")
                continue
            failed = daemon.failures()
            failures += [f"{name}: {line}" for line in failed[:5]]
            failures += judge(name, starts[name], ends[name], options)
            if ends[name].renewals <= starts[name].renewals:
                failures.append(f"{name}: no renewal during the soak")
            rows.append((name, starts[name], ends[name], len(failed)))

    seconds = time.monotonic() - started
    build_table(rows, options, seconds, len(failures)).print()
    return 1 if common.failed(failures) else 0


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
