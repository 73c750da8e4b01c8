"""One way to open a process's SQLite file (the finance reports, the data keys, the retention's
closing moments): WAL, so readers do not wait for the writer; `synchronous=NORMAL` (a commit
is not flushed to disk, a checkpoint is: a power cut can lose the last commits, never the file,
and each of these files is read again from its topic when it is behind); a bounded page cache
(memory does not grow with the file); temporary tables on disk. `path` None: a database in
memory (tests)."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def connect(path: Path | None, *, cache_kib: int) -> sqlite3.Connection:
    conn = sqlite3.connect(
        ":memory:" if path is None else str(path),
        isolation_level=None,  # transactions are the callers' own BEGIN / COMMIT
        check_same_thread=False,
        timeout=30,
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA cache_size=-{cache_kib}")
    conn.execute("PRAGMA temp_store=FILE")
    return conn
