"""Helpers for tests that drive the firmware-sim CLI through its edge."""

from __future__ import annotations

import os
import stat

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
