"""One way to keep a process's SQLite file (the finance reports, the data keys, the retention's
closing moments): WAL, so readers do not wait for the writer; `synchronous=NORMAL` (a commit
is not flushed to disk, a checkpoint is: a power cut can lose the last commits, never the file,
and each of these files is read again from its topic when it is behind); a bounded page cache
(memory does not grow with the file); temporary tables on disk. `path` None: a database in
memory (tests).

Beside the connection: the file of the first slot no other process holds (`slot`), one
transaction (`transaction`), a value of the file's `meta (name, value)` table (`meta`), and a
query over many ids, 500 a statement (`rows_in`)."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from services.common import slots

IDS_PER_STATEMENT = 500


def connect(path: Path | None, *, cache_kib: int) -> sqlite3.Connection:
    conn = sqlite3.connect(
        ":memory:" if path is None else str(path),
        isolation_level=None,  # transactions are the callers' own (`transaction`)
        check_same_thread=False,
        timeout=30,
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute(f"PRAGMA cache_size=-{cache_kib}")
    conn.execute("PRAGMA temp_store=FILE")
    return conn


def slot(directory: Path, name: str) -> tuple[Path, IO[bytes]]:
    """The file `<name>-<n>.sqlite` of the first slot under `directory` no other process holds
    (processes sharing a disk never write one file), and its lock, held until closed."""
    stem, lock = slots.claim_slot(directory, name)
    return stem.with_suffix(".sqlite"), lock


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction: committed at the end of the block, rolled back on any error."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def meta(conn: sqlite3.Connection, name: str) -> str | None:
    """A value of the file's `meta (name TEXT PRIMARY KEY, value TEXT)` table."""
    found = conn.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
    return None if found is None else str(found[0])


def rows_in(conn: sqlite3.Connection, select: str, ids: Sequence[str]) -> Iterator[Any]:
    """The rows of `select` (ending `... IN ({})`) for `ids`, 500 ids a statement."""
    for start in range(0, len(ids), IDS_PER_STATEMENT):
        chunk = ids[start : start + IDS_PER_STATEMENT]
        yield from conn.execute(select.format(", ".join("?" * len(chunk))), chunk)
