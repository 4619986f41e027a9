"""Crash campaign: SIGKILL the agent throughout renewals, then check it.

Run from the repository top::

    .venv/bin/python -m campaigns.crash [--kills 200] [--seed N]
                                        [--stores tpm,software]

Each kill stops a ``device-agent renew --now`` process, either at a
named step of the transaction (the agent kills itself there) or after a
random delay drawn from a seeded generator, so a run repeats with the
same ``--seed``. After every kill the device must still hold a
credential: ``status`` shows a valid operational or factory certificate,
and the operational key matches the leaf of a chain that builds to the
trust anchor. Every few kills the device also connects, and renews
cleanly, and at the end every device renews and connects, so that even
a short run checks both. The exit status is non-zero if any device was
left without a working credential, or if nothing was checked; Ctrl-C
stops a run with one line, ``interrupted``, and exit status 130.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from bench import report
from bench.stopping import stoppable
from bench.world import Device, World, world
from campaigns import common
from device_agent import chain, config, keys
from device_agent.credential import OPERATIONAL
from device_agent.renewal import KILL_AT_ENV, STEPS
from device_agent.store import CredentialStore

RANDOM = "random"
POINTS = (*STEPS, RANDOM)
DEFAULT_KILLS = 200
CONNECT_EVERY = 10
RENEW_EVERY = 10
# A renewal is over about 0.25 s after the process starts, and its
# transaction takes the second half of that; random kills are drawn over
# the whole span so that they hit the transaction too, not only startup.
MAX_DELAY = 0.3
LATE_RETRIES = 5
KILL_TIMEOUT = 60.0


class CheckError(Exception):
    """A device failed a check after a kill; the message says which."""


@dataclasses.dataclass
class Kill:
    """One kill: which device, where, and after what delay if random."""

    number: int
    store: str
    point: str
    delay: float | None = None


@dataclasses.dataclass
class Tally:
    """What the campaign counted."""

    kills: collections.Counter[tuple[str, str]] = dataclasses.field(
        default_factory=collections.Counter
    )
    survived: collections.Counter[tuple[str, str]] = dataclasses.field(
        default_factory=collections.Counter
    )
    failures: list[str] = dataclasses.field(default_factory=list)
    late: int = 0
    in_transaction: int = 0
    pending_left: int = 0
    pending_at_end: int = 0
    flushed: int = 0
    connects: int = 0
    renewals: int = 0


def plan(kills: int, stores: Sequence[str], seed: int) -> list[Kill]:
    """Kills spread evenly over the stores, then over the points."""
    # The generator is seeded on purpose: a run repeats with its seed.
    rng = random.Random(seed)  # noqa: S311
    planned = []
    for number in range(kills):
        store = stores[number % len(stores)]
        point = POINTS[(number // len(stores)) % len(POINTS)]
        delay = rng.uniform(0.0, MAX_DELAY) if point == RANDOM else None
        planned.append(Kill(number + 1, store, point, delay))
    return planned


class Target:
    """One device under the campaign, and what was last seen of it."""

    def __init__(self, here: World, device: Device, tpm: bool) -> None:
        self.here = here
        self.device = device
        self.tpm = tpm
        self.settings = config.load(device.config)
        self.store = CredentialStore(self.settings.state_dir, OPERATIONAL)
        self.anchors = chain.load_anchors(self.settings.require("anchor_file"))
        self.pending_seen: set[tuple[int, int, int]] = set()

    def kill(self, planned: Kill) -> int:
        """Kill one renewal; return how many renewals ended before it.

        A random delay can outlast the renewal; the kill is then tried
        again with half the delay, so that every planned kill lands.
        """
        command = self.device.command("renew", "--now")
        if planned.delay is None:
            env = {**os.environ, KILL_AT_ENV: planned.point}
            result = subprocess.run(
                command, env=env, capture_output=True, timeout=KILL_TIMEOUT,
                check=False,
            )  # fmt: skip
            if result.returncode != -signal.SIGKILL:
                raise CheckError(
                    f"renew exited {result.returncode} instead of being "
                    f"killed at {planned.point}: {result.stderr.decode()}"
                )
            return 0

        delay = planned.delay
        for late in range(LATE_RETRIES):
            process = subprocess.Popen(
                command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            try:
                time.sleep(delay)
                landed = process.poll() is None
            finally:
                # Also when the campaign itself is stopped: a renewal
                # left running would write into a directory being
                # removed.
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=KILL_TIMEOUT)
            if landed:
                return late
            delay /= 2
        raise CheckError(f"every renewal ended before a kill at {delay} s")

    def flush(self) -> int:
        """Flush what the killed process left in swtpm, as tpmrm would."""
        return self.here.swtpm.flush() if self.tpm else 0

    def note_pending(self) -> bool:
        """Remember a pending generation a kill left; True if new."""
        pending = self.store.pending()
        if pending is None:
            return False

        # Numbers are reused once a generation is discarded, so the
        # directory's inode and time tell one pending generation apart
        # from the next with the same number.
        made = pending.path.stat()
        seen = (pending.number, made.st_ino, made.st_mtime_ns)
        if seen in self.pending_seen:
            return False
        self.pending_seen.add(seen)
        return True

    def check(self) -> None:
        """The device still has a credential that matches and chains."""
        report_ = json.loads(self.device.run("status", "--json"))
        identities = report_["identities"]
        if not any(
            (identities[name].get("certificate") or {}).get("state") == "valid"
            for name in ("ldevid", "idevid")
        ):
            raise CheckError(f"no valid credential in status: {identities}")
        self.check_operational()

    def check_operational(self) -> None:
        current = self.store.current()
        if current is None or current.key_path() is None:
            raise CheckError("no operational generation with a key")
        key_path = current.key_path()
        assert key_path is not None
        public_key = keys.for_key(key_path, self.settings).public_key(key_path)
        bundle = chain.read_bundle(current.chain_path.read_bytes())
        ordered = chain.order_chain(bundle, public_key)
        chain.verify(ordered, self.anchors, self.settings.device_id)

    def connect(self) -> None:
        self.device.run("connect")

    def renew(self) -> None:
        """A clean renewal, after which no pending generation is left."""
        self.device.run("renew", "--now")
        if self.store.pending() is not None:
            raise CheckError("a pending generation survived a renewal")


def run_one(target: Target, planned: Kill, tally: Tally) -> None:
    """Kill once, then check; a failed check is recorded, not raised."""
    key = (planned.store, planned.point)
    before = target.store.current()
    try:
        tally.late += target.kill(planned)
        tally.kills[key] += 1
        tally.flushed += target.flush()
        if target.note_pending():
            tally.pending_left += 1
        if planned.point == RANDOM and (
            target.store.pending() is not None
            or target.store.current() != before
        ):
            tally.in_transaction += 1

        target.check()
        if planned.number % CONNECT_EVERY == 0:
            target.connect()
            tally.connects += 1
        if planned.number % RENEW_EVERY == 0:
            target.renew()
            tally.renewals += 1
    except (CheckError, RuntimeError, ValueError, OSError) as exc:
        detail = str(exc).strip().splitlines()
        tally.failures.append(
            f"kill {planned.number} ({planned.store}, {planned.point}): "
            f"{type(exc).__name__}: {detail[0] if detail else ''}"
        )
        return
    tally.survived[key] += 1


def finish(target: Target, name: str, tally: Tally) -> None:
    """The last word on a device: it renews, connects and is clean.

    These count as checked connects and renewals, so that even a run of
    a few kills shows every device renewing and connecting after them.
    """
    try:
        target.renew()
        tally.renewals += 1
        target.check()
        target.connect()
        tally.connects += 1
    except (CheckError, RuntimeError, ValueError, OSError) as exc:
        tally.failures.append(f"final check ({name}): {exc}")
    if target.store.pending() is not None:
        tally.pending_at_end += 1
    kept = [g.number for g in target.store.generations()]
    if len(kept) != 1:
        tally.failures.append(f"final check ({name}): generations {kept}")


def build_table(
    tally: Tally, stores: Sequence[str], seconds: float, seed: int
) -> report.Table:
    total = sum(tally.kills.values())
    table = report.Table(
        f"crash campaign: {total} SIGKILLs during renew --now, seed {seed}",
        ["kill point", *(f"{s} kills" for s in stores), "survived"],
    )
    common.add_point_rows(table, POINTS, stores, tally.kills, tally.survived)
    for label, value in (
        ("failed", len(tally.failures)),
        ("random kills inside the transaction", tally.in_transaction),
        ("random kills retried: renewal ended first", tally.late),
        ("pending generations left by kills", tally.pending_left),
        (
            "pending generations cleaned",
            tally.pending_left - tally.pending_at_end,
        ),
        ("pending generations left at the end", tally.pending_at_end),
        ("TPM objects flushed", tally.flushed),
        ("connects checked", tally.connects),
        ("clean renewals", tally.renewals),
    ):
        table.add(label, str(value))
    table.add("time", f"{seconds:.1f} s")
    return table


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    return common.seeded_arguments(
        "crash", __doc__, "--kills", DEFAULT_KILLS, argv
    )


@stoppable
def main(argv: Sequence[str] | None = None) -> int:
    options = arguments(argv)
    report.quiet_logging()
    started = time.monotonic()
    tally = Tally()
    names = {store: f"crash-{store}" for store in options.stores}

    with world(registered=list(names.values())) as here:
        targets = {}
        for store, name in names.items():
            device = common.enrolled(here, name, tpm=store == "tpm")
            targets[store] = Target(here, device, tpm=store == "tpm")

        for planned in plan(options.kills, options.stores, options.seed):
            run_one(targets[planned.store], planned, tally)
        for store, target in targets.items():
            finish(target, names[store], tally)
            tally.flushed += target.flush()

    common.check_exercised(tally.failures, tally.connects, tally.renewals)
    seconds = time.monotonic() - started
    build_table(tally, options.stores, seconds, options.seed).print()
    failed = common.failed(tally.failures)
    return 1 if failed or tally.pending_at_end else 0


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
