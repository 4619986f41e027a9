"""The TPM commands a swtpm has logged, by name, between two marks.

From log level 2 on, swtpm writes each command it receives as a line
``SWTPM_IO_Read: length N`` followed by the command's bytes in hex,
sixteen to a line. A TPM 2.0 command starts with a 2-byte tag, a 4-byte
size and the 4-byte command code, so the code is bytes 6 to 9.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Sequence
from pathlib import Path

from tpm2_pytss.constants import TPM2_CC

_READ = "SWTPM_IO_Read:"


def _command_names() -> dict[int, str]:
    names: dict[int, str] = {}
    for name in dir(TPM2_CC):
        value = getattr(TPM2_CC, name)
        if not name.startswith("_") and isinstance(value, int):
            names.setdefault(int(value), f"TPM2_{name}")
    return names


NAMES = _command_names()


def command_name(code: int) -> str:
    return NAMES.get(code, f"0x{code:08X}")


class TpmLog:
    """Reads the commands of one swtpm log; :meth:`mark` starts a count."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0

    def mark(self) -> None:
        """Count only commands logged from now on."""
        self._offset = self.position()

    def since_mark(self) -> list[int]:
        """The command codes logged since the last mark, in order."""
        return self.between(self._offset, None)

    def position(self) -> int:
        """Where the log ends now; swtpm logs a command before answering."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def between(self, start: int, end: int | None) -> list[int]:
        """The command codes logged between two positions, in order."""
        with self.path.open("rb") as stream:
            stream.seek(start)
            data = stream.read() if end is None else stream.read(end - start)
        return parse(data.decode("ascii", "replace").splitlines())


def parse(lines: Iterable[str]) -> list[int]:
    """Command codes of every TPM command in swtpm log ``lines``."""
    codes: list[int] = []
    header: list[int] | None = None
    for line in lines:
        if line.strip().startswith(_READ):
            header = []
            continue
        if header is None:
            continue
        try:
            header.extend(int(part, 16) for part in line.split())
        except ValueError:
            header = None  # another kind of record; the command was short
            continue
        if len(header) >= 10:
            codes.append(int.from_bytes(bytes(header[6:10]), "big"))
            header = None
    return codes


def sequence(codes: Iterable[int]) -> str:
    """The commands in the order they ran, without the ``TPM2_`` prefix."""
    names = [command_name(code).removeprefix("TPM2_") for code in codes]
    return " ".join(names) if names else "none"


def summary(runs: Sequence[Sequence[int]]) -> str:
    """How many commands each run cost, and which, for runs alike or not.

    ``8: CreatePrimary Load ...`` when every run sent the same commands;
    otherwise the range of counts and the sequence seen most often.
    """
    if not runs:
        return "not measured"
    seen = collections.Counter(tuple(run) for run in runs)
    common, times = seen.most_common(1)[0]
    if len(seen) == 1:
        return f"{len(common)}: {sequence(common)}"
    counts = sorted(len(run) for run in runs)
    return (
        f"{counts[0]}-{counts[-1]}, most often ({times} of {len(runs)}) "
        f"{len(common)}: {sequence(common)}"
    )
