"""Credentials on a flash filesystem, in generations a power cut cannot lose.

A board keeps each certificate chain (and, where the key lives on flash,
the key) as a numbered generation directory, and a small pointer file
names the current one. A generation is written under a temporary name
and renamed once complete; the pointer is written to ``current.tmp`` and
renamed over ``current``. Some flash filesystems replace a file on rename
by deleting the old one first, so for an instant neither exists: loading
then takes the pointer from ``current.tmp``, which was complete before
the rename began. Whenever power fails, the next start finds the old
credential or the new one, never neither.

Only ``os`` calls that MicroPython's LittleFS and FAT drivers share with
CPython are used: no ``os.path``, no symlinks.
"""

import os

POINTER = "current"
POINTER_TEMP = "current.tmp"
_GENERATION = "g"
_STAGING = "t"
_DIGITS = 4
_DIR_FLAG = 0x4000
_MAX_GENERATION = 9999


class StoreError(OSError):
    """The store cannot do what was asked; nothing was changed."""


class FlashStore:
    """Numbered credential generations under ``root`` and a pointer.

    ``keep`` is how many generations before the current one ``prune``
    leaves in place, so a bad new credential can be rolled back.
    """

    def __init__(self, root: str, keep: int = 1) -> None:
        if type(keep) is not int or keep < 0:
            raise ValueError("keep must be a non-negative int")
        self.root = root.rstrip("/") or "/"
        self.keep = keep
        _makedirs(self.root)
        self._recover()

    def generations(self) -> list[int]:
        """The complete generations on flash, oldest first."""
        found = []
        for name in _listdir(self.root):
            number = _number(name, _GENERATION)
            if number is not None and _is_dir(self._path(name)):
                found.append(number)
        found.sort()
        return found

    def current(self) -> int | None:
        """The generation the pointer names, or None before the first."""
        return self._read_pointer(POINTER)

    def stage(self, files: "dict[str, bytes]") -> int:
        """Write ``files`` as a new generation and return its number.

        The pointer does not move: ``commit`` makes it current. Names are
        plain file names; the write order is sorted so that no platform's
        dict order matters.
        """
        names = sorted(files)
        if not names:
            raise ValueError("a generation needs at least one file")
        for name in names:
            _check_name(name)
        existing = self.generations()
        number = (existing[-1] if existing else 0) + 1
        if number > _MAX_GENERATION:
            raise StoreError("generation numbers are exhausted")

        staging = self._path(_STAGING + _format(number))
        _remove_tree(staging)
        os.mkdir(staging)
        for name in names:
            _write(staging + "/" + name, files[name])
        os.rename(staging, self._path(_GENERATION + _format(number)))
        return number

    def commit(self, number: int) -> None:
        """Make generation ``number`` the current one."""
        if number not in self.generations():
            raise StoreError("no complete generation " + str(number))
        temp = self._path(POINTER_TEMP)
        _write(temp, (_format(number) + "\n").encode())
        os.rename(temp, self._path(POINTER))

    def load(self, number: int | None = None) -> "dict[str, bytes]":
        """The files of generation ``number``, by default the current one."""
        if number is None:
            number = self.current()
            if number is None:
                raise StoreError("no current generation")
        directory = self._path(_GENERATION + _format(number))
        if not _is_dir(directory):
            raise StoreError("no complete generation " + str(number))
        files = {}
        for name in _listdir(directory):
            with open(directory + "/" + name, "rb") as handle:
                files[name] = handle.read()
        return files

    def previous(self) -> int | None:
        """The newest complete generation older than the current one."""
        current = self.current()
        if current is None:
            return None
        older = [n for n in self.generations() if n < current]
        return older[-1] if older else None

    def rollback(self) -> int:
        """Point back at the previous generation and return its number."""
        number = self.previous()
        if number is None:
            raise StoreError("no earlier generation to roll back to")
        self.commit(number)
        return number

    def discard(self, number: int) -> None:
        """Remove a generation that is not current."""
        if number == self.current():
            raise StoreError("refusing to remove the current generation")
        _remove_tree(self._path(_GENERATION + _format(number)))

    def prune(self) -> list[int]:
        """Remove generations beyond ``keep`` older ones and newer strays.

        Generations newer than the current one were staged and never
        committed (their session never came up), so they go too.
        """
        current = self.current()
        if current is None:
            return []
        older = [n for n in self.generations() if n < current]
        newer = [n for n in self.generations() if n > current]
        doomed = newer + older[: max(len(older) - self.keep, 0)]
        for number in doomed:
            self.discard(number)
        return doomed

    def _recover(self) -> None:
        # A half-written generation is never named by a pointer: remove it.
        for name in _listdir(self.root):
            if _number(name, _STAGING) is not None:
                _remove_tree(self._path(name))

        pointer = self._read_pointer(POINTER)
        if pointer is not None:
            _remove_file(self._path(POINTER_TEMP))
            return
        # The pointer is missing or torn: the rename over it was cut
        # short, and the temporary pointer is the newer, complete one.
        staged = self._read_pointer(POINTER_TEMP)
        if staged is not None:
            os.rename(self._path(POINTER_TEMP), self._path(POINTER))

    def _read_pointer(self, name: str) -> int | None:
        try:
            with open(self._path(name), "rb") as handle:
                text = handle.read(16)
        except OSError:
            return None
        if len(text) != _DIGITS + 1 or text[-1:] != b"\n":
            return None
        digits = text[:_DIGITS].decode()
        if not digits.isdigit():
            return None
        number = int(digits)
        if not _is_dir(self._path(_GENERATION + _format(number))):
            return None
        return number

    def _path(self, name: str) -> str:
        return self.root + "/" + name


def _format(number: int) -> str:
    text = str(number)
    return "0" * (_DIGITS - len(text)) + text


def _number(name: str, prefix: str) -> int | None:
    if len(name) != _DIGITS + 1 or name[0] != prefix:
        return None
    digits = name[1:]
    return int(digits) if digits.isdigit() else None


def _check_name(name: object) -> None:
    if type(name) is not str or not name or "/" in name or name[0] == ".":
        raise ValueError("file names must be plain names")


def _write(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        _sync(handle)


def _sync(handle: object) -> None:
    # CPython can push the data to the device; MicroPython's flush already
    # does, and it has no fsync.
    fsync = getattr(os, "fsync", None)
    fileno = getattr(handle, "fileno", None)
    if fsync is not None and fileno is not None:
        fsync(fileno())


def _listdir(path: str) -> list[str]:
    names = os.listdir(path)
    names.sort()
    return names


def _is_dir(path: str) -> bool:
    try:
        return bool(os.stat(path)[0] & _DIR_FLAG)
    except OSError:
        return False


def _makedirs(path: str) -> None:
    prefix = "/" if path[0] == "/" else ""
    built = ""
    for part in path.split("/"):
        if not part:
            continue
        built = built + "/" + part if built else prefix + part
        if not _is_dir(built):
            os.mkdir(built)


def _remove_file(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass


def _remove_tree(path: str) -> None:
    if not _is_dir(path):
        _remove_file(path)
        return
    for name in os.listdir(path):
        _remove_tree(path + "/" + name)
    os.rmdir(path)
