"""Credential lineages: numbered generations and atomic pointers to them.

A lineage lives in ``<state_dir>/<lineage>/``::

    generations/0001/key.tss2.pem   the key (a TPM blob or a PKCS#8 file)
    generations/0001/chain.pem      leaf first, then issuers
    current -> generations/0001     the credential in use
    pending -> generations/0002     a key waiting for its certificate

A generation never changes once it holds a chain. Pointers are symlinks
replaced by rename, so a reader sees the old credential or the new one,
never a mix, and a crash leaves one of the two.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import logging
import os
import pwd
import re
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from device_agent.errors import StoreError

logger = logging.getLogger(__name__)

CHAIN_NAME = "chain.pem"
_GENERATION = re.compile(r"[0-9]{4,9}")
_LOCK_NAME = ".lock"


@dataclasses.dataclass(frozen=True)
class Generation:
    """One key and, once certified, its chain."""

    number: int
    path: Path

    @property
    def chain_path(self) -> Path:
        return self.path / CHAIN_NAME

    def key_path(self) -> Path | None:
        keys = sorted(self.path.glob("key.*"))
        return keys[0] if keys else None

    def key_path_for(self, suffix: str) -> Path:
        return self.path / f"key{suffix}"

    def complete(self) -> bool:
        return self.key_path() is not None and self.chain_path.is_file()


class CredentialStore:
    """The generations of one identity, and the pointers into them."""

    def __init__(self, state_dir: Path, lineage: str = "idevid") -> None:
        self.state_dir = state_dir
        self.lineage = lineage
        self.root = state_dir / lineage
        self._generations = self.root / "generations"

    @contextlib.contextmanager
    def lock(
        self, timeout: float = 10.0, name: str = _LOCK_NAME
    ) -> Iterator[None]:
        """Hold a lock of the state directory, waiting up to ``timeout``.

        The default lock guards short changes to the pointers; other names
        guard longer work, such as a whole renewal.
        """
        _make_private_dir(self.state_dir)
        path = self.state_dir / name
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError as exc:
            raise StoreError(f"{path}: {exc.strerror or exc}") from None
        try:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        raise StoreError(
                            f"{path} is held by another device-agent process"
                        ) from None
                    time.sleep(0.05)
            yield
        finally:
            os.close(fd)

    def prepare(self) -> None:
        """Make the state directory, or check an existing one is private."""
        _make_private_dir(self.state_dir)

    def current(self) -> Generation | None:
        """The credential in use, or None before the first install."""
        return self._pointer("current")

    def pending(self) -> Generation | None:
        """The key waiting for a certificate, if there is one."""
        return self._pointer("pending")

    def broken(self, name: str) -> str | None:
        """Why pointer ``name`` leads nowhere, or None if it is sound.

        A pointer whose generation was deleted reads as no pointer at
        all; this tells the two apart, for a diagnosis that names it.
        """
        link = self.root / name
        if self._pointer(name) is not None or not os.path.lexists(link):
            return None
        try:
            target = os.readlink(link)
        except OSError:
            target = "?"
        return f"{name} pointer broken: it leads to {target}, which is gone"

    def generations(self) -> list[Generation]:
        if not self._generations.is_dir():
            return []
        found = [
            Generation(int(p.name), p)
            for p in self._generations.iterdir()
            if _GENERATION.fullmatch(p.name) and p.is_dir()
        ]
        return sorted(found, key=lambda g: g.number)

    def new_generation(self) -> Generation:
        """An empty generation numbered after every existing one."""
        _make_private_dir(self.state_dir)
        _make_private_dir(self.root)
        _make_private_dir(self._generations)
        existing = self.generations()
        number = existing[-1].number + 1 if existing else 1
        path = self._generations / f"{number:04d}"
        path.mkdir(mode=0o700)
        _fsync_dir(self._generations)
        return Generation(number, path)

    def set_pending(self, generation: Generation) -> None:
        self._point("pending", generation)

    def drop_pending(self) -> None:
        """Forget the pending pointer; the generation it led to stays.

        A commit switches ``current`` first and drops ``pending`` after,
        so an interruption between the two leaves both pointing at the
        new generation, which is then in use and must be kept.
        """
        self._unpoint("pending")

    def install(self, generation: Generation, chain_pem: bytes) -> None:
        """Give ``generation`` its chain and make it the current one."""
        self.stage(generation, chain_pem)
        self.commit(generation)

    def stage(self, generation: Generation, chain_pem: bytes) -> None:
        """Give ``generation`` its chain without putting it in use."""
        if generation.chain_path.exists():
            raise StoreError(f"generation {generation.number} is sealed")
        write_atomic(generation.chain_path, chain_pem, mode=0o644)

    def commit(self, generation: Generation) -> None:
        """Make a staged generation the current one."""
        if not generation.complete():
            raise StoreError(f"generation {generation.number} is incomplete")
        self._point("current", generation)
        if self.pending() == generation:
            self._unpoint("pending")
        logger.info(
            "%s generation %d is now current", self.lineage, generation.number
        )

    def discard(self, generation: Generation) -> None:
        """Delete a generation that is not in use, key and all."""
        if generation == self.current():
            raise StoreError(f"generation {generation.number} is in use")
        if generation == self.pending():
            self._unpoint("pending")
        shutil.rmtree(generation.path, ignore_errors=True)
        _fsync_dir(self._generations)

    def retire_others(self) -> list[int]:
        """Delete every generation but the current one; their keys too."""
        current = self.current()
        if current is None:
            return []
        retired = []
        for generation in self.generations():
            if generation != current:
                self.discard(generation)
                retired.append(generation.number)
        return retired

    def prune(self, keep: int = 2) -> list[int]:
        """Delete old certified generations beyond the newest ``keep``.

        The current and pending generations always stay, and so does the
        one before the current, as a fallback while it proves itself.
        """
        keep_set = {self.current(), self.pending()}
        complete = [g for g in self.generations() if g.complete()]
        keep_set.update(complete[-keep:])
        pruned = []
        for generation in self.generations():
            if generation not in keep_set and generation.complete():
                self.discard(generation)
                pruned.append(generation.number)
        return pruned

    def destroy(self) -> None:
        """Delete the whole lineage: every key and certificate in it."""
        if self.root.exists():
            for name in ("current", "pending"):
                self._unpoint(name)
            shutil.rmtree(self.root)
            _fsync_dir(self.state_dir)

    def copy_key(self, source: Generation) -> Generation:
        """A new generation holding the same key as ``source``."""
        key = source.key_path()
        if key is None:
            raise StoreError(f"generation {source.number} holds no key")
        target = self.new_generation()
        data = key.read_bytes()
        write_atomic(target.path / key.name, data, mode=0o600)
        return target

    def recover(self) -> list[str]:
        """Tidy what an interrupted update left behind; say what was done.

        Pointers that lead nowhere are removed, and generations that
        never got a chain and are not pending are deleted with their key.
        Complete generations are never touched here.
        """
        done: list[str] = []
        if not self.root.is_dir():
            return done
        for leftover in self.root.glob(".*.tmp"):
            leftover.unlink()
            done.append(f"removed {leftover.name}")

        current = self.current()
        if current is not None and not current.complete():
            self._unpoint("current")
            done.append(f"dropped current -> incomplete {current.number}")
            current = None
        if current is None:
            complete = [g for g in self.generations() if g.complete()]
            if complete:
                self._point("current", complete[-1])
                done.append(f"current -> {complete[-1].number}")

        pending = self.pending()
        if pending is not None and pending == self.current():
            self.drop_pending()
            pending = None
            done.append("dropped pending: it is current already")
        if pending is not None and pending.key_path() is None:
            self._unpoint("pending")
            pending = None
            done.append("dropped pending without a key")
        for generation in self.generations():
            in_use = generation in (self.current(), pending)
            if not in_use and not generation.chain_path.exists():
                shutil.rmtree(generation.path)
                done.append(f"deleted unfinished {generation.number}")
        for line in done:
            logger.warning("store %s: %s", self.lineage, line)
        return done

    def _pointer(self, name: str) -> Generation | None:
        link = self.root / name
        try:
            target = os.readlink(link)
        except FileNotFoundError:
            return None
        except PermissionError:
            check_access(self.state_dir)
            raise StoreError(
                f"cannot read {self.root} as user {_user()} "
                "(Permission denied)"
            ) from None
        except OSError as exc:
            raise StoreError(
                f"{link}: not a pointer ({exc.strerror})"
            ) from None
        parts = Path(target).parts
        if (
            len(parts) != 2
            or parts[0] != "generations"
            or not _GENERATION.fullmatch(parts[1])
        ):
            raise StoreError(f"{link} points outside the store: {target}")
        path = self._generations / parts[1]
        if not path.is_dir():
            return None
        return Generation(int(parts[1]), path)

    def _point(self, name: str, generation: Generation) -> None:
        link = self.root / name
        temporary = self.root / f".{name}.tmp"
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()
        os.symlink(f"generations/{generation.path.name}", temporary)
        os.replace(temporary, link)
        _fsync_dir(self.root)

    def _unpoint(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            (self.root / name).unlink()
            _fsync_dir(self.root)


def write_atomic(
    path: Path, data: bytes, mode: int, durable: bool = True
) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves old or new.

    With ``durable`` the data and the rename reach the disk before this
    returns; without, a power cut may lose the newest content, but the
    file is still never torn.
    """
    temporary = path.with_name(f".{path.name}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)
            stream.flush()
            if durable:
                os.fsync(stream.fileno())
        os.replace(temporary, path)
    except OSError as exc:
        # A full disk, say: leave no half-written file behind, and name
        # the file the write was for (a failed write names none).
        with contextlib.suppress(OSError):
            temporary.unlink()
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    if durable:
        _fsync_dir(path.parent)


def _make_private_dir(path: Path) -> None:
    """Make a 0700 directory, or check that an existing one is private.

    A directory that others can enter is refused rather than tightened:
    it may be shared, and changing its mode behind a user's back would
    break whatever else lives there.
    """
    try:
        path.mkdir(mode=0o700, parents=True)
        return
    except FileExistsError:
        pass
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror or exc}") from None
    if not path.is_dir():
        raise StoreError(f"{path}: not a directory")
    check_private_dir(path)


def check_private_dir(path: Path) -> None:
    """Refuse an existing directory that group or others may enter.

    A missing one passes: commands that only read find nothing there.
    """
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise StoreError(
            f"{path} is open to group or others (mode {mode:04o}); keys are "
            "kept only in a directory private to the agent (chmod 700)"
        )
    check_access(path)


def check_access(path: Path) -> None:
    """Refuse a state directory this user may not read.

    Without this, every pointer and key in it would look missing or
    broken to a user who merely lacks the rights to see them.
    """
    try:
        os.listdir(path)
    except FileNotFoundError:
        return
    except PermissionError as exc:
        raise StoreError(
            f"cannot read state_dir {path} as user {_user()} ({exc.strerror})"
        ) from None
    except OSError as exc:
        raise StoreError(f"{path}: {exc.strerror or exc}") from None


def _user() -> str:
    try:
        return pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return f"uid {os.geteuid()}"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
