"""SQLite files the simulator keeps its records in, opened alike.

The factory line and the registry each keep one file that threads of
one process share and that several processes (a CLI command next to a
running registrar) may open at once; both open and close it the same
way.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from types import TracebackType
from typing import Self

# Another process may hold the write lock for a moment; wait that long
# before giving up.
BUSY_TIMEOUT = 5.0


class Database:
    """One SQLite connection, shared by threads under ``_lock``.

    Autocommit (``isolation_level=None``): each change says where its
    own transaction begins and ends. Raises :class:`sqlite3.Error`; the
    subclass says what the file is in its own error.
    """

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            path,
            timeout=BUSY_TIMEOUT,
            isolation_level=None,
            check_same_thread=False,
        )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
