"""The power-cut campaign, short; and its model of a lost write."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

from campaign_run import TOP, run_campaign

# The campaigns are scripts run from the repository top, not an installed
# package; the model tests import one from there.
sys.path.insert(0, str(TOP))

from campaigns import powercut
from device_agent.store import CredentialStore

CUTS = 8


def test_short_power_cut_campaign_leaves_every_device_with_a_credential():
    summary = run_campaign(
        "powercut",
        "--cuts", str(CUTS), "--seed", "3",
        "--stores", "tpm,software",
    ).stdout  # fmt: skip

    assert f"{CUTS} cuts" in summary
    assert re.search(r"^failed\s+\|\s+0\s", summary, re.MULTILINE)
    assert re.search(
        rf"^total\s+\|\s+{CUTS // 2}\s+\|\s+{CUTS // 2}\s+\|\s+{CUTS}\s",
        summary,
        re.MULTILINE,
    )
    # The seed makes the key-step cuts lose the key file's directory
    # entry, which recovery must then clean up.
    assert re.search(r"^cuts that lost or tore something\s+\|\s+[1-9]",
                     summary, re.MULTILINE)  # fmt: skip


def _trace(tmp_path: Path, work) -> list[dict]:
    """Run ``work`` in a child under the tracer; return its log."""
    root = tmp_path / "state"
    root.mkdir()
    log = tmp_path / "trace"
    code = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from campaigns.powercut import _Tracer\n"
        f"_Tracer(Path({str(log)!r}), Path({str(root)!r})).install()\n"
        f"root = Path({str(root)!r})\n" + work
    )
    subprocess.run(
        [sys.executable, "-c", code], cwd=TOP, check=True, timeout=30
    )
    return powercut.read_log(log)


def test_an_unsynced_pointer_switch_can_be_lost_and_a_synced_one_cannot(
    tmp_path,
):
    work = (
        "(root / 'one').mkdir()\n"
        "(root / 'two').mkdir()\n"
        "os.symlink('one', root / 'current')\n"
        "fd = os.open(root, os.O_RDONLY)\n"
        "os.fsync(fd)\n"
        "os.symlink('two', root / '.tmp')\n"
        "os.replace(root / '.tmp', root / 'current')\n"
    )
    entries = _trace(tmp_path, work)
    root = tmp_path / "state"
    assert [e["op"] for e in entries] == [
        "create", "create", "create", "syncing", "fsync", "create",
        "rename",
    ]  # fmt: skip

    # Every directory keeps a random prefix of its unsynced changes: over
    # a few seeds the switch is kept, lost, and lost with its new link.
    outcomes = set()
    for seed in range(40):
        copy = tmp_path / f"copy{seed}"
        shutil.copytree(root, copy, symlinks=True)
        moved = [_moved(e, root, copy) for e in entries]
        damage = powercut.power_cut(moved, random.Random(seed))

        assert (copy / "one").is_dir() and (copy / "two").is_dir()
        target = os.readlink(copy / "current")
        assert target == ("one" if damage.undone else "two")
        assert (copy / ".tmp").is_symlink() == (damage.undone == 1)
        outcomes.add(damage.undone)
    assert outcomes == {0, 1, 2}


def _moved(entry: dict, old: Path, new: Path) -> dict:
    return {
        k: v.replace(str(old), str(new)) if isinstance(v, str) else v
        for k, v in entry.items()
    }


def test_unsynced_data_is_torn_and_synced_data_is_kept(tmp_path):
    work = (
        "for name, sync in (('kept', True), ('torn', False)):\n"
        "    fd = os.open(root / name, os.O_WRONLY | os.O_CREAT, 0o600)\n"
        "    os.write(fd, b'x' * 1000)\n"
        "    if sync:\n"
        "        os.fsync(fd)\n"
        "    os.close(fd)\n"
        "dfd = os.open(root, os.O_RDONLY)\n"
        "os.fsync(dfd)\n"
    )
    entries = _trace(tmp_path, work)
    root = tmp_path / "state"
    sizes = set()
    for seed in range(30):
        (root / "torn").write_bytes(b"x" * 1000)
        powercut.power_cut(entries, random.Random(seed))
        assert (root / "kept").stat().st_size == 1000
        sizes.add((root / "torn").stat().st_size)
    assert 0 in sizes and 1000 in sizes and len(sizes) > 2


def test_recovery_keeps_a_generation_left_both_current_and_pending(tmp_path):
    """A commit cut between its two pointer changes leaves both pointers
    on the new generation; recovery drops only the pending one."""
    store = CredentialStore(tmp_path / "state", "ldevid")
    generation = store.new_generation()
    (generation.path / "key.pkcs8.pem").write_bytes(b"key")
    store.install(generation, b"chain")
    store.set_pending(generation)

    done = store.recover()

    assert store.pending() is None
    assert store.current() == generation
    assert generation.complete()
    assert done == ["dropped pending: it is current already"]
