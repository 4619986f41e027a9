"""Power-cut campaign: kill renewals, then lose what the disk had not kept.

Run from the repository top::

    .venv/bin/python -m campaigns.powercut [--cuts 200] [--seed N]
                                           [--stores tpm,software]

Each cut stops a ``device-agent renew --now`` process with SIGKILL. The
process runs under a tracer that logs, before it happens, every change
it makes under the state directory (files opened for writing,
creations, renames, removals) and, once done, every fsync. A cut lands
at a named step of the transaction, or after a random delay, as in the
crash campaign, or at one entry of that log: the tracer kills the
process right after writing entry number N, so that over a run every
write, pointer switch and fsync of a renewal is cut in turn. After the
kill the campaign plays a power cut on the log, as a journaling
filesystem (ext4, data=ordered) could leave things:

* a directory entry change (a new file, a rename such as a pointer
  switch, a removal) survives only if its directory was fsynced after
  it; of the changes that were not, each directory keeps an ordered
  prefix of random length and loses the rest, which are undone;
* a file whose data was not fsynced after it was written is left whole,
  empty, or cut short at a random length.

Nothing that was made durable is touched. Then the device restarts as
a board does after power returns: its TPM loses every loaded object,
the agent's start-up recovery runs, and the device must hold a working
credential: ``status`` answers and shows a valid certificate, the
operational key matches a chain that builds to the trust anchor, the
device connects, and every few cuts it renews; at the end every device
renews and connects. The exit status is non-zero if any device was
left without a working credential, or if nothing was checked; Ctrl-C
stops a run with one line, ``interrupted``, and exit status 130.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ClassVar

from bench import report
from bench.stopping import stoppable
from bench.world import Device, world
from campaigns import common
from campaigns.crash import KILL_TIMEOUT, CheckError, Kill, Target
from device_agent.credential import FACTORY, OPERATIONAL
from device_agent.renewal import STEPS
from device_agent.store import CredentialStore

RANDOM = "random"
WRITE = "write"
ENTRY_ENV = "POWERCUT_KILL_AT_ENTRY"
DEFAULT_CUTS = 200
# Named steps end right after an fsync, so most of the damage a power
# cut can do falls between them: half the cuts land at log entries, a
# quarter at random moments, a quarter at the named steps.
ROTATION = ("step", WRITE, RANDOM, WRITE)
# The tracer slows a renewal a little; random cuts are drawn over the
# whole run of the process so that they land in the transaction too.
MAX_DELAY = 0.45
CHECK_RENEW_EVERY = 5
TRACE_BOOT = "from campaigns.powercut import traced; traced()"
FAILURES = (CheckError, RuntimeError, ValueError, OSError)


# -- the tracer, inside the killed process ---------------------------------


class _Tracer:
    """Logs changes under ``root`` before they happen, and fsyncs after.

    Each line is written with one ``os.write`` to a file opened with
    O_APPEND, so a SIGKILL loses at most the line being written, and the
    kernel keeps what was written (the process dies, not the machine).
    What a change overwrites or removes is copied aside first, so that
    the power cut can put it back.
    """

    def __init__(self, log: Path, root: Path) -> None:
        self.root = str(root.resolve())
        self.stash = log.with_suffix(".stash")
        self.stash.mkdir(exist_ok=True)
        self.fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.busy = threading.local()
        self.count = 0
        self.entries = 0
        self.kill_at = int(os.environ.get(ENTRY_ENV) or 0)

    def install(self) -> None:
        real_fsync = os.fsync

        def fsync(fd: Any) -> None:
            number = fd if isinstance(fd, int) else fd.fileno()
            # Logged before and after: a cut between the two finds the
            # data written and not yet on the disk.
            self._guarded(self._fsynced, number, "syncing")
            real_fsync(fd)
            self._guarded(self._fsynced, number, "fsync")

        os.fsync = fsync
        sys.addaudithook(self._audit)

    def _audit(self, event: str, args: tuple[Any, ...]) -> None:
        handler = self._HANDLERS.get(event)
        if handler is not None:
            self._guarded(handler, self, *args)

    def _guarded(self, work: Callable[..., None], *args: Any) -> None:
        # The tracer's own file work raises audit events too.
        if getattr(self.busy, "on", False):
            return
        self.busy.on = True
        # Tracing must never change what it traces, so its own failures
        # are swallowed.
        try:
            with contextlib.suppress(Exception):
                work(*args)
        finally:
            self.busy.on = False

    def _mine(self, path: Any, dir_fd: Any = None) -> str | None:
        if dir_fd not in (None, -1) or isinstance(path, int):
            return None  # rmtree's own steps, covered by its entry
        full = os.path.abspath(os.fsdecode(path))
        if full == self.root or full.startswith(self.root + os.sep):
            return full
        return None

    def _write(self, **entry: Any) -> None:
        os.write(self.fd, (json.dumps(entry) + "\n").encode())
        self.entries += 1
        if self.entries == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    def _old(self, path: str) -> dict[str, Any] | None:
        """What is at ``path`` now, kept so that it can come back."""
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(info.st_mode):
            return {"kind": "symlink", "target": os.readlink(path)}
        self.count += 1
        copy = self.stash / str(self.count)
        if stat.S_ISDIR(info.st_mode):
            shutil.copytree(path, copy, symlinks=True)
            return {"kind": "dir", "copy": str(copy)}
        shutil.copy2(path, copy)
        return {"kind": "file", "copy": str(copy)}

    def _open(self, path: Any, mode: Any, flags: Any) -> None:
        full = self._mine(path)
        if full is None or not isinstance(flags, int):
            return
        if not flags & (os.O_WRONLY | os.O_RDWR):
            return
        if flags & os.O_CREAT and not os.path.lexists(full):
            self._write(op="create", path=full)
        if flags & (os.O_TRUNC | os.O_EXCL) or not flags & os.O_RDWR:
            self._write(op="data", path=full)

    def _mkdir(self, path: Any, mode: Any, dir_fd: Any) -> None:
        full = self._mine(path, dir_fd)
        if full is not None and not os.path.lexists(full):
            self._write(op="create", path=full)

    def _symlink(self, target: Any, path: Any, dir_fd: Any) -> None:
        full = self._mine(path, dir_fd)
        if full is not None and not os.path.lexists(full):
            self._write(op="create", path=full)

    def _rename(self, src: Any, dst: Any, *dir_fds: Any) -> None:
        source, target = self._mine(src), self._mine(dst)
        if source is None or target is None or set(dir_fds) - {None, -1}:
            return
        self._write(op="rename", src=source, dst=target, old=self._old(target))

    def _remove(self, path: Any, dir_fd: Any) -> None:
        full = self._mine(path, dir_fd)
        if full is not None and os.path.lexists(full):
            self._write(op="remove", path=full, old=self._old(full))

    def _fsynced(self, fd: int, op: str) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if self._mine(path) is not None:
            directory = stat.S_ISDIR(os.fstat(fd).st_mode)
            self._write(op=op, path=path, dir=directory)

    _HANDLERS: ClassVar[dict[str, Callable[..., None]]] = {
        "open": _open,
        "os.mkdir": _mkdir,
        "os.symlink": _symlink,
        "os.rename": _rename,
        "os.remove": _remove,
        "os.rmdir": _remove,
        "shutil.rmtree": _remove,
    }


def traced() -> None:
    """Run ``device-agent`` under the tracer: argv is LOG ROOT ARGS..."""
    import runpy

    log, root, *args = sys.argv[1:]
    _Tracer(Path(log), Path(root)).install()
    sys.argv = ["device-agent", *args]
    runpy.run_module("device_agent", run_name="__main__", alter_sys=True)


# -- the power cut, played on the log afterwards ---------------------------


@dataclasses.dataclass
class Damage:
    """What one power cut did to the files."""

    changes: int = 0
    undone: int = 0
    emptied: int = 0
    shortened: int = 0
    kinds: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )

    @property
    def any(self) -> bool:
        return bool(self.undone or self.emptied or self.shortened)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The entries of a trace; a line cut short by the kill is dropped."""
    entries = []
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entries.append(json.loads(line))
    return entries


def _parents(entry: dict[str, Any]) -> set[str]:
    paths = [entry[k] for k in ("path", "src", "dst") if k in entry]
    return {os.path.dirname(p) for p in paths}


def power_cut(entries: list[dict[str, Any]], rng: random.Random) -> Damage:
    """Undo and tear what the disk had not been told to keep."""
    damage = Damage()
    changes = [
        i
        for i, e in enumerate(entries)
        if e["op"] in ("create", "rename", "remove")
    ]
    damage.changes = len(changes)
    synced_dirs = {
        i: e["path"] for i, e in enumerate(entries) if e["op"] == "fsync"
    }
    volatile: dict[str, list[int]] = collections.defaultdict(list)
    for index in changes:
        later = {p for i, p in synced_dirs.items() if i > index}
        for parent in _parents(entries[index]):
            if parent not in later:
                volatile[parent].append(index)

    lost: set[int] = set()
    for indices in volatile.values():
        kept = rng.randint(0, len(indices))
        lost.update(indices[kept:])
    for index in sorted(lost, reverse=True):
        if _undo(entries[index]):
            damage.undone += 1
            damage.kinds[entries[index]["op"]] += 1

    for path in _unsynced_data(entries):
        _tear(Path(path), rng, damage)
    return damage


def _unsynced_data(entries: list[dict[str, Any]]) -> set[str]:
    """Files whose newest data was written after their last fsync."""
    dirty: set[str] = set()
    for entry in entries:
        op = entry["op"]
        if op == "data":
            dirty.add(entry["path"])
        elif op == "fsync" and not entry["dir"]:
            dirty.discard(entry["path"])
        elif op == "rename" and entry["src"] in dirty:
            dirty.discard(entry["src"])
            dirty.add(entry["dst"])
        elif op == "remove":
            dirty.discard(entry["path"])
    return dirty


def _undo(entry: dict[str, Any]) -> bool:
    """Put back what one change replaced; False if it never happened."""
    op = entry["op"]
    if op == "create":
        return _clear(Path(entry["path"]))
    if op == "rename":
        source, target = Path(entry["src"]), Path(entry["dst"])
        if os.path.lexists(source) or not os.path.lexists(target):
            return False  # killed between the log line and the rename
        os.rename(target, source)
        _restore(target, entry["old"])
        return True
    if op == "remove":
        path = Path(entry["path"])
        _clear(path)
        _restore(path, entry["old"])
        return True
    return False


def _clear(path: Path) -> bool:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
        return True
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
        return True
    return False


def _restore(path: Path, old: dict[str, Any] | None) -> None:
    if old is None:
        return
    if old["kind"] == "symlink":
        os.symlink(old["target"], path)
    elif old["kind"] == "dir":
        shutil.copytree(old["copy"], path, symlinks=True)
    else:
        shutil.copy2(old["copy"], path)


def _tear(path: Path, rng: random.Random, damage: Damage) -> None:
    """Leave an unsynced file whole, empty, or cut short."""
    if path.is_symlink() or not path.is_file():
        return
    size = path.stat().st_size
    fate = rng.choice(("whole", "empty", "short"))
    if fate == "whole" or size == 0:
        return
    length = 0 if fate == "empty" else rng.randrange(size)
    os.truncate(path, length)
    if length:
        damage.shortened += 1
    else:
        damage.emptied += 1


# -- the campaign ---------------------------------------------------------


class TracedDevice:
    """A device whose ``renew`` processes run under the tracer."""

    def __init__(self, device: Device, logs: Path) -> None:
        self.inner = device
        self.logs = logs
        self.log = logs / "trace"

    def fresh_log(self) -> Path:
        shutil.rmtree(self.logs, ignore_errors=True)
        self.logs.mkdir(parents=True)
        return self.log

    def command(self, *args: str) -> list[str]:
        return [
            sys.executable, "-c", TRACE_BOOT,
            str(self.log), str(self.inner.state),
            "--config", str(self.inner.config), *args,
        ]  # fmt: skip

    def run(self, *args: str) -> str:
        return self.inner.run(*args)


@dataclasses.dataclass
class Tally:
    """What the campaign counted."""

    cuts: collections.Counter[tuple[str, str]] = dataclasses.field(
        default_factory=collections.Counter
    )
    survived: collections.Counter[tuple[str, str]] = dataclasses.field(
        default_factory=collections.Counter
    )
    failures: list[str] = dataclasses.field(default_factory=list)
    damaged: int = 0
    changes: int = 0
    undone: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    emptied: int = 0
    shortened: int = 0
    recovered: collections.Counter[str] = dataclasses.field(
        default_factory=collections.Counter
    )
    late: int = 0
    flushed: int = 0
    connects: int = 0
    renewals: int = 0
    entries: dict[str, int] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Cut(Kill):
    """A kill, or with ``entry`` the log entry after which it lands."""

    entry: int = 0


def plan(cuts: int, stores: Sequence[str], seed: int) -> list[Cut]:
    """Cuts spread over the stores, then over steps, entries and time."""
    # The generator is seeded on purpose: a run repeats with its seed.
    rng = random.Random(seed)  # noqa: S311
    planned = []
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    for number in range(cuts):
        store = stores[number % len(stores)]
        kind = ROTATION[(number // len(stores)) % len(ROTATION)]
        seen = counts[(store, kind)]
        counts[(store, kind)] += 1
        if kind == RANDOM:
            cut = Cut(number + 1, store, RANDOM, rng.uniform(0.0, MAX_DELAY))
        elif kind == WRITE:
            cut = Cut(number + 1, store, WRITE, entry=seen)
        else:
            cut = Cut(number + 1, store, STEPS[seen % len(STEPS)])
        planned.append(cut)
    return planned


def cut_at_entry(device: TracedDevice, entry: int) -> bool:
    """Kill a renewal after log entry ``entry``; False if it ended first."""
    env = {**os.environ, ENTRY_ENV: str(entry)}
    result = subprocess.run(
        device.command("renew", "--now"), env=env, capture_output=True,
        timeout=KILL_TIMEOUT, check=False,
    )  # fmt: skip
    if result.returncode == -signal.SIGKILL:
        return True
    if result.returncode == 0:
        return False
    raise CheckError(
        f"renew exited {result.returncode} instead of being killed at "
        f"entry {entry}: {result.stderr.decode().strip()}"
    )


def calibrate(device: TracedDevice) -> int:
    """How many log entries one whole traced renewal writes."""
    log = device.fresh_log()
    subprocess.run(
        device.command("renew", "--now"), capture_output=True,
        timeout=KILL_TIMEOUT, check=True,
    )  # fmt: skip
    return len(read_log(log))


def restart(target: Target, tally: Tally) -> None:
    """What a board does when power returns, before the agent connects.

    The TPM forgets every loaded object, and the agent's start-up
    recovery tidies both lineages, as ``device-agent run`` does first.
    """
    tally.flushed += target.flush()
    done = []
    for lineage in (FACTORY, OPERATIONAL):
        store = CredentialStore(target.settings.state_dir, lineage)
        with store.lock():
            done += store.recover()
    for line in done:
        tally.recovered[line.split(" ")[0]] += 1


def run_one(
    target: Target, device: TracedDevice, planned: Cut, rng: random.Random,
    tally: Tally,
) -> None:  # fmt: skip
    """Cut once, then check; a failed check is recorded, not raised."""
    key = (planned.store, planned.point)
    try:
        log = device.fresh_log()
        if planned.point == WRITE:
            # A renewal writes a few entries less when it has nothing
            # to discard first; the cut then moves earlier.
            entry = planned.entry
            while not cut_at_entry(device, entry):
                tally.late += 1
                if entry == 1:
                    raise CheckError("renewals end before any log entry")
                entry = max(1, entry // 2)
        else:
            tally.late += target.kill(planned)
        tally.cuts[key] += 1
        damage = power_cut(read_log(log), rng)
        tally.changes += damage.changes
        tally.damaged += damage.any
        tally.undone.update(damage.kinds)
        tally.emptied += damage.emptied
        tally.shortened += damage.shortened
        restart(target, tally)

        target.check()
        target.connect()
        tally.connects += 1
        if planned.number % CHECK_RENEW_EVERY == 0:
            target.renew()
            tally.renewals += 1
    except FAILURES as exc:
        detail = str(exc).strip().splitlines()
        tally.failures.append(
            f"cut {planned.number} ({planned.store}, {planned.point}): "
            f"{type(exc).__name__}: {detail[0] if detail else ''}"
        )
        return
    tally.survived[key] += 1


def finish(target: Target, name: str, tally: Tally) -> None:
    """The last word on a device: it renews, connects and is clean."""
    try:
        restart(target, tally)
        target.renew()
        tally.renewals += 1
        target.check()
        target.connect()
        tally.connects += 1
    except FAILURES as exc:
        tally.failures.append(f"final check ({name}): {exc}")
    kept = [g.number for g in target.store.generations()]
    if len(kept) != 1:
        tally.failures.append(f"final check ({name}): generations {kept}")


def build_table(
    tally: Tally, stores: Sequence[str], seconds: float, seed: int
) -> report.Table:
    total = sum(tally.cuts.values())
    table = report.Table(
        f"power-cut campaign: {total} cuts during renew --now, seed {seed}",
        ["cut point", *(f"{s} cuts" for s in stores), "survived"],
    )
    points = (*STEPS, WRITE, RANDOM)
    common.add_point_rows(table, points, stores, tally.cuts, tally.survived)
    undone = ", ".join(f"{n} {op}" for op, n in sorted(tally.undone.items()))
    recovered = ", ".join(
        f"{n} {what}" for what, n in sorted(tally.recovered.items())
    )
    for label, value in (
        ("failed", str(len(tally.failures))),
        ("cuts that lost or tore something", str(tally.damaged)),
        ("changes traced under the state dir", str(tally.changes)),
        ("unsynced changes undone", undone or "0"),
        ("unsynced files emptied", str(tally.emptied)),
        ("unsynced files cut short", str(tally.shortened)),
        ("recovery at restart", recovered or "nothing to do"),
        (
            "log entries in one renewal",
            ", ".join(f"{s} {n}" for s, n in tally.entries.items()),
        ),
        ("cuts retried: renewal ended first", str(tally.late)),
        ("TPM objects flushed", str(tally.flushed)),
        ("connects checked", str(tally.connects)),
        ("clean renewals", str(tally.renewals)),
    ):
        table.add(label, value)
    table.add("time", f"{seconds:.1f} s")
    return table


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    return common.seeded_arguments(
        "powercut", __doc__, "--cuts", DEFAULT_CUTS, argv
    )


@stoppable
def main(argv: Sequence[str] | None = None) -> int:
    options = arguments(argv)
    report.quiet_logging()
    # Recovery's own warnings are counted in the table instead.
    logging.getLogger("device_agent.store").setLevel(logging.ERROR)
    started = time.monotonic()
    tally = Tally()
    names = {store: f"cut-{store}" for store in options.stores}
    # The damage is drawn from its own generator, seeded like the plan.
    rng = random.Random(options.seed + 1)  # noqa: S311

    with (
        world(registered=list(names.values())) as here,
        common.scratch("powercut-") as logs,
    ):
        targets = {}
        for store, name in names.items():
            device = common.enrolled(here, name, tpm=store == "tpm")
            target = Target(here, device, tpm=store == "tpm")
            traced_device = TracedDevice(device, logs / name)
            target.device = traced_device  # type: ignore[assignment]
            targets[store] = (target, traced_device)
            tally.entries[store] = calibrate(traced_device)

        for planned in plan(options.cuts, options.stores, options.seed):
            target, traced_device = targets[planned.store]
            if planned.point == WRITE:
                size = tally.entries[planned.store]
                planned.entry = planned.entry % size + 1
            run_one(target, traced_device, planned, rng, tally)
        for store, (target, _) in targets.items():
            finish(target, names[store], tally)
            tally.flushed += target.flush()

    common.check_exercised(tally.failures, tally.connects, tally.renewals)
    seconds = time.monotonic() - started
    build_table(tally, options.stores, seconds, options.seed).print()
    return 1 if common.failed(tally.failures) else 0


if __name__ == "__main__":
    logging.captureWarnings(True)
    sys.exit(main())
