"""Credential scan: no default or shared secret in the repository or on a
device.

Run from the repository top::

    .venv/bin/python -m campaigns.credscan [--tree DIR ...] [--devices N]

Without options it scans every file git tracks and what ``init`` and
``keygen`` write for three software devices, made in a temporary
directory (``--devices N`` for another count, 0 for none): a shared
key only shows between two devices or more. ``--tree`` adds a directory
such as the config and state that ``device-agent init`` and ``keygen``
wrote on a real device.

What counts as a finding:

- a PEM private key block with a body, in a tracked file (a key in the
  repository is a key every installation shares);
- a password, secret or token written as a literal value, a password in
  a URL, a well-known default password, or a cloud or forge token;
- a broker config that lets clients in without a certificate
  (``allow_anonymous true``) or with a password file;
- the same private key in two device trees, or a device key that is
  also in the repository.

A device's own key in its own state directory is what the agent is for,
so a tree's private keys are compared, not flagged. The exit status is
1 if anything was found.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from bench.stopping import stoppable
from campaigns import common
from firmware_sim.ca import CertificateAuthority

logger = logging.getLogger(__name__)

TOP = Path(__file__).resolve().parent.parent

# Larger files are data, not configuration or code a secret hides in.
MAX_BYTES = 2_000_000

PEM_KEY = re.compile(
    rb"-----BEGIN ([A-Z0-9 ]*PRIVATE KEY)-----\r?\n"
    rb"((?:[A-Za-z0-9+/=:, -]*\r?\n)*?[A-Za-z0-9+/=]{16,}\r?\n)"
    rb"(?:[A-Za-z0-9+/=\r\n]*)-----END \1-----"
)

# Names whose value is a secret when written out literally.
_SECRET_NAME = (
    rb"(?:pass(?:word|wd|phrase)?|pwd|secret|token|api[_-]?key|"
    rb"access[_-]?key|auth[_-]?key|private[_-]?key)"
)
LITERAL_SECRET = re.compile(
    rb"(?i)\b[\w.-]*" + _SECRET_NAME + rb"[\w.-]*\s*[:=]\s*"
    rb"(['\"])([^'\"\s]{4,})\1"
)
CONFIG_SECRET = re.compile(
    rb"(?im)^\s*[\w.-]*" + _SECRET_NAME + rb"[\w.-]*\s*=\s*"
    rb"([^'\"\s#][^\s#]{3,})\s*$"
)
URL_PASSWORD = re.compile(
    rb"\b[a-z][a-z0-9+.-]*://[^/\s:@'\"]+:([^/\s@'\"]+)@"
)
TOKENS = {
    "AWS access key": re.compile(rb"\bAKIA[0-9A-Z]{16}\b"),
    "GitHub token": re.compile(rb"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    "Slack token": re.compile(rb"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "JSON web token": re.compile(
        rb"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]+"
    ),
}
# Passwords that ship as defaults on boards, routers and brokers.
DEFAULT_PASSWORDS = frozenset(
    {
        "admin", "changeme", "default", "letmein", "password", "passw0rd",
        "password1", "password123", "raspberry", "root", "secret", "toor",
        "12345678", "123456", "qwerty", "mosquitto", "public", "guest",
    }
)  # fmt: skip
ANONYMOUS = re.compile(rb"(?m)^\s*allow_anonymous\s+true\b")
PASSWORD_FILE = re.compile(rb"(?m)^\s*password_file\s+\S")

# A value that names a secret instead of holding one: an environment
# variable, a placeholder, a path, or code that reads the value.
_REFERENCE = re.compile(
    r"^(?:\$|<|\{|%|/|~|\.\.?/)|^[A-Z][A-Z0-9_]+$|\(|(?i:^(?:none|null|"
    r"true|false|required|optional|unset)$)"
)


@dataclasses.dataclass(frozen=True)
class Finding:
    """One thing that looks like a credential, and where."""

    path: str
    line: int
    kind: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.kind}"


def tracked_files(top: Path) -> list[Path]:
    """The files git tracks under ``top`` (the working tree's copies)."""
    listed = subprocess.run(
        ["git", "-C", str(top), "ls-files", "-z"],
        capture_output=True,
        check=True,
    )
    names = [n for n in listed.stdout.decode().split("\0") if n]
    return [top / name for name in names if (top / name).is_file()]


def tree_files(root: Path) -> list[Path]:
    """Every regular file under ``root``, symlinks not followed."""
    found = []
    for directory, _dirs, files in os.walk(root):
        for name in files:
            path = Path(directory, name)
            if path.is_file() and not path.is_symlink():
                found.append(path)
    return sorted(found)


def scan_text(data: bytes, where: str) -> list[Finding]:
    """Secrets written in one file's bytes (keys not included)."""
    findings = []
    for kind, pattern in TOKENS.items():
        findings += [_at(data, m, where, kind) for m in pattern.finditer(data)]
    for match in LITERAL_SECRET.finditer(data):
        value = match.group(2).decode(errors="replace")
        if not _REFERENCE.search(value):
            findings.append(_at(data, match, where, _secret_kind(value)))
    # In code an unquoted right-hand side is an expression, not a value.
    unquoted = () if where.endswith(".py") else CONFIG_SECRET.finditer(data)
    for match in unquoted:
        value = match.group(1).decode(errors="replace")
        if not _REFERENCE.search(value):
            findings.append(_at(data, match, where, _secret_kind(value)))
    for match in URL_PASSWORD.finditer(data):
        value = match.group(1).decode(errors="replace")
        if not _REFERENCE.search(value):
            findings.append(_at(data, match, where, "password in a URL"))
    for pattern, kind in (
        (ANONYMOUS, "broker lets clients in without a certificate"),
        (PASSWORD_FILE, "broker takes passwords"),
    ):
        findings += [_at(data, m, where, kind) for m in pattern.finditer(data)]
    return findings


def private_keys(data: bytes) -> Iterator[tuple[int, bytes, bytes]]:
    """(offset, label, fingerprint) of each PEM private key in ``data``.

    The fingerprint is of the public key when the key parses, so that one
    key in two encodings is still one key; otherwise (a TSS2 blob, which
    only its TPM can load) of the block itself.
    """
    for match in PEM_KEY.finditer(data):
        block = match.group(0)
        yield match.start(), match.group(1), _fingerprint(block)


def scan_repository(top: Path) -> tuple[list[Finding], set[bytes]]:
    """Findings in the tracked files, and the fingerprints of their keys."""
    findings: list[Finding] = []
    fingerprints: set[bytes] = set()
    for path in tracked_files(top):
        data = _read(path)
        if data is None:
            continue
        where = str(path.relative_to(top))
        findings += scan_text(data, where)
        for offset, label, fingerprint in private_keys(data):
            fingerprints.add(fingerprint)
            line = data.count(b"\n", 0, offset) + 1
            findings.append(
                Finding(where, line, f"{label.decode()} in the repository")
            )
    return findings, fingerprints


def scan_trees(
    trees: Sequence[Path], known: Iterable[bytes] = ()
) -> tuple[list[Finding], int]:
    """Findings in device trees, and how many private keys they held."""
    findings: list[Finding] = []
    owners: dict[bytes, Path] = {}
    repository = set(known)
    keys = 0
    for tree in trees:
        for path in tree_files(tree):
            data = _read(path)
            if data is None:
                continue
            findings += scan_text(data, str(path))
            for fingerprint, line in _tree_keys(data):
                keys += 1
                where = str(path)
                if fingerprint in repository:
                    findings.append(
                        Finding(where, line, "a key from the repository")
                    )
                first = owners.setdefault(fingerprint, tree)
                if first != tree:
                    findings.append(
                        Finding(where, line, f"the same key as in {first}")
                    )
    return findings, keys


def make_devices(count: int, root: Path) -> list[Path]:
    """``init`` and ``keygen`` for ``count`` software devices under root."""
    # init wants a real trust anchor; a throwaway CA beside the trees.
    ca_file = CertificateAuthority.create(root / "ca", "Scan CA").root_path
    trees = []
    for number in range(1, count + 1):
        tree = root / f"device-{number}"
        tree.mkdir()
        config_path = tree / "agent.toml"
        base = [
            sys.executable, "-m", "device_agent",
            "--config", str(config_path),
        ]  # fmt: skip
        for args in (
            [
                "init", "--device-id", f"scan-{number}",
                "--key-store", "software",
                "--state-dir", str(tree / "state"),
                "--broker", "127.0.0.1:8883", "--ca-file", str(ca_file),
            ],
            ["keygen"],
        ):  # fmt: skip
            subprocess.run([*base, *args], capture_output=True, check=True)
        trees.append(tree)
    return trees


def _tree_keys(data: bytes) -> Iterator[tuple[bytes, int]]:
    for offset, _label, fingerprint in private_keys(data):
        yield fingerprint, data.count(b"\n", 0, offset) + 1


def _fingerprint(block: bytes) -> bytes:
    try:
        key = serialization.load_pem_private_key(block, password=None)
    except (ValueError, TypeError):
        return hashlib.sha256(block).digest()
    public = key.public_key().public_bytes(
        serialization.Encoding.DER,
        serialization.PublicFormat.SubjectPublicKeyInfo,
    )
    return hashlib.sha256(public).digest()


def _secret_kind(value: str) -> str:
    if value.lower() in DEFAULT_PASSWORDS:
        return f"well-known default password {value!r}"
    return "secret written as a literal value"


def _at(data: bytes, match: re.Match[bytes], where: str, kind: str) -> Finding:
    return Finding(where, data.count(b"\n", 0, match.start()) + 1, kind)


def _read(path: Path) -> bytes | None:
    try:
        if path.stat().st_size > MAX_BYTES:
            return None
        return path.read_bytes()
    except OSError as exc:
        logger.warning("%s: %s", path, exc.strerror or exc)
        return None


# Enough devices that a key shared between any two of them shows.
DEFAULT_DEVICES = 3


def arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = common.argument_parser("credscan", __doc__)
    parser.add_argument("--top", type=Path, default=TOP)
    parser.add_argument("--tree", type=Path, action="append", default=[])
    parser.add_argument("--devices", type=int, default=DEFAULT_DEVICES)
    options = parser.parse_args(argv)
    if options.devices < 0:
        parser.error("--devices must not be negative")
    for tree in options.tree:
        if not tree.is_dir():
            parser.error(f"--tree {tree}: not a directory")
    if not _is_checkout(options.top):
        parser.error(f"--top {options.top}: not the top of a git checkout")
    return options


def _is_checkout(top: Path) -> bool:
    """Whether ``top`` is the top directory of a git working tree."""
    # Its tracked files are what is scanned; below the top, git would
    # list only part of them, so a subdirectory is refused as well.
    shown = subprocess.run(
        ["git", "-C", str(top), "rev-parse", "--show-toplevel"],
        capture_output=True,
        text=True,
        check=False,
    )
    if shown.returncode != 0:
        return False
    return Path(shown.stdout.strip()).resolve() == top.resolve()


@stoppable
def main(argv: Sequence[str] | None = None) -> int:
    options = arguments(argv)
    files = tracked_files(options.top)
    findings, known = scan_repository(options.top)
    with tempfile.TemporaryDirectory(prefix="credscan-") as scratch:
        trees = list(options.tree)
        if options.devices:
            trees += make_devices(options.devices, Path(scratch))
        tree_findings, keys = scan_trees(trees, known)
    findings += tree_findings

    print(f"tracked files scanned: {len(files)}")
    print(f"device trees scanned: {len(trees)} ({keys} private keys)")
    print(f"findings: {len(findings)}")
    for finding in findings:
        print(f"!! {finding}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
