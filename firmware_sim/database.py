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

    def __init__(self, path: Path, read_only: bool = False) -> None:
        """Open ``path``; ``read_only`` for commands that only look.

        Read-only opens never create the file or write to it (no
        schema, no journal-mode change), so auditing records cannot
        alter them; SQLite refuses any write on such a connection.
        """
        self._lock = threading.Lock()
        target: str | Path = path
        if read_only:
            target = f"{Path(path).absolute().as_uri()}?mode=ro"
        self._db = sqlite3.connect(
            target,
            timeout=BUSY_TIMEOUT,
            isolation_level=None,
            check_same_thread=False,
            uri=read_only,
        )

    def has_table(self, name: str) -> bool:
        """Whether the file holds table ``name`` (an empty file holds none)."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' "
                "AND name = ?",
                (name,),
            ).fetchone()
        return row is not None

    def close(self) -> None:
        with self._lock:
            # Absent when connecting failed; a failed open still closes.
            db = getattr(self, "_db", None)
            if db is not None:
                db.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
