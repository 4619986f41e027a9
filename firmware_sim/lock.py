"""Lock files that let one process at a time use a directory."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from firmware_sim.errors import SimError

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def hold(
    path: Path, refuse: Callable[[int | None], SimError], mode: int = 0o600
) -> Iterator[None]:
    """Hold the lock file ``path`` while inside, or refuse at once.

    ``refuse`` makes the error raised when another process holds it,
    given that process's pid if it wrote one. The lock goes with the
    process, so a killed holder leaves none behind; the pid inside only
    names the holder for the refusal. The file stays afterwards:
    removing it would let a process that opened it just before lock a
    file no one else can find.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, mode)
    except OSError as exc:
        raise SimError(f"{path}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise refuse(_holder(fd)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        logger.debug("holding %s", path)
        yield
    finally:
        os.close(fd)


def _holder(fd: int) -> int | None:
    """The pid the holder of the lock wrote, if it did."""
    try:
        return int(os.pread(fd, 32, 0).decode().strip())
    except (OSError, ValueError):
        return None
