"""Helpers for tests that drive the firmware-sim CLI through its edge."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from click.testing import CliRunner
from conftest import edge_command

from firmware_sim import cli


def invoke(argv):
    return CliRunner().invoke(edge_command(cli.run), argv)


def assert_refused(result, named):
    assert result.exit_code in (1, 2), result.output
    assert result.output.count("\n") == 1, result.output
    assert result.output.startswith("error: ")
    assert named in result.output
    assert "internal error" not in result.output
    assert "Traceback" not in result.output


def tree(root):
    """Every path under root with its type, mode and content or target."""
    tree = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            what = os.readlink(path)
        elif stat.S_ISREG(info.st_mode):
            what = path.read_bytes()
        else:
            what = None
        tree[str(path.relative_to(root))] = (info.st_mode, what)
    return tree


def alive(pid):
    """Whether ``pid`` runs; a zombie that init has yet to reap does not."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text.rpartition(")")[2].split()[0] not in ("Z", "X")


def swtpm_pids(directory):
    """Live swtpm processes whose command line names ``directory``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        is_swtpm = cmdline.split(b"\0")[0].endswith(b"swtpm")
        named = os.fsencode(directory) in cmdline
        if is_swtpm and named and alive(int(proc.name)):
            pids.append(int(proc.name))
    return pids


def mark_issued(ca, *serials):
    """Record ``serials`` as issued by ``ca``, so that it may revoke them.

    For tests that revoke made-up serials: the CA refuses to revoke one
    it never issued.
    """
    with ca.issued_path.open("a") as record:
        for serial in serials:
            record.write(f"{serial:x} 2026-01-01T00:00:00Z\n")
