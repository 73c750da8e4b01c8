"""`dossier.keys` as read, in an SQLite file under the process's data directory (`DataKeys`).

Every dossier's wrapped data key within the retention is needed by intake, SMS and postal, and
there are as many as dossiers closed in the retention (about 1.5 million at a province's volume
with 90 days). The file holds them, so a process's memory holds only:
- the writes not in the file yet (`flush` puts them there, with the offsets read to, in one
  transaction);
- the latest lookups (`cached` of them: a dossier's events come close together).
The page cache of the connection is bounded (`CACHE_KIB`); the file is read with `pread`, not
mapped, so the file's size does not show in the process's memory.

A row is a dossier's wrapped key as written on the topic, or an erasure: an empty value with the
erasure's sequence number. Only the latest `erased_kept` erasures stay (as compaction keeps only
the latest tombstones). The file records the source it was read from (broker and namespace) and
the offset read to per partition (with the timestamp of the record before it, which tells the
topic from another of the same name), so a process started again reads only what was written
since (`offsets`). Every method blocks: each is one indexed statement, or one transaction per batch
of records read.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import IO

from services.common import sqlite_file

CACHE_KIB = 2 * 1024  # the connection's page cache
UNFLUSHED_MOST = 10_000  # puts held before they go to the file without waiting for a batch
ERASED = b""  # the value of an erased dossier's row

SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    dossier_id TEXT PRIMARY KEY,
    wrapped BLOB NOT NULL,
    erased_seq INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS erasures ON keys (erased_seq) WHERE erased_seq IS NOT NULL;
CREATE TABLE IF NOT EXISTS offsets (
    part INTEGER PRIMARY KEY,
    next_offset INTEGER NOT NULL,
    before_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


class KeyFile:
    """The wrapped keys and the latest erasures; `get` answers bytes (the wrapped key),
    `ERASED`, or None for a dossier with no row."""

    def __init__(
        self,
        path: Path | None,
        source: str,
        *,
        erased_kept: int,
        cached: int,
        lock: IO[bytes] | None = None,
    ) -> None:
        # None: a database in memory (tests, tools), gone with the process
        self._conn = sqlite_file.connect(path, cache_kib=CACHE_KIB)
        self._conn.executescript(SCHEMA)
        self._lock = lock  # held for the life of the process
        self._erased_kept = erased_kept
        self._cached = cached
        self._unflushed: dict[str, bytes] = {}
        self._cache: OrderedDict[str, bytes | None] = OrderedDict()
        found = self._conn.execute("SELECT MAX(erased_seq) FROM keys").fetchone()
        self._erased_seq = int(found[0] or 0)
        if self._meta("source") != source:  # another broker's or namespace's keys
            self.forget()
            self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('source', ?)", (source,))
        self.identity = self._meta("identity") or self._new_identity()

    @classmethod
    def in_directory(
        cls, directory: Path, source: str, *, erased_kept: int, cached: int
    ) -> KeyFile:
        """The key file of this process under `directory` (the first slot no other process
        holds: processes sharing a disk never write one file)."""
        path, lock = sqlite_file.slot(directory, "data-keys")
        return cls(path, source, erased_kept=erased_kept, cached=cached, lock=lock)

    def _meta(self, name: str) -> str | None:
        return sqlite_file.meta(self._conn, name)

    def close(self) -> None:
        self._conn.close()
        if self._lock is not None:
            self._lock.close()

    # --- reading ------------------------------------------------------------------------------

    def get(self, dossier_id: str) -> bytes | None:
        found = self._unflushed.get(dossier_id)
        if found is not None:
            return found
        if dossier_id in self._cache:
            self._cache.move_to_end(dossier_id)
            return self._cache[dossier_id]
        row = self._conn.execute(
            "SELECT wrapped FROM keys WHERE dossier_id = ?", (dossier_id,)
        ).fetchone()
        value = None if row is None else bytes(row[0])
        self._cache[dossier_id] = value
        if len(self._cache) > self._cached:
            self._cache.popitem(last=False)
        return value

    def holding(self, dossier_ids: Iterable[str]) -> set[str]:
        """Those of `dossier_ids` whose key is there (many at once: a statement per 500)."""
        ids = list(dossier_ids)
        held = {d for d in ids if self._unflushed.get(d)}
        rows = sqlite_file.rows_in(
            self._conn,
            "SELECT dossier_id FROM keys WHERE erased_seq IS NULL AND dossier_id IN ({})",
            [d for d in ids if d not in self._unflushed],
        )
        held.update(str(row[0]) for row in rows)
        return held

    def count(self) -> int:
        """The keys there (not the erasures): a scan, for logs and tests."""
        self.flush()
        found = self._conn.execute("SELECT COUNT(*) FROM keys WHERE erased_seq IS NULL")
        return int(found.fetchone()[0])

    def offsets(self) -> dict[int, tuple[int, int]]:
        """Per partition read: the next offset to read, and the timestamp of the record before
        it (none for a file never written)."""
        rows = self._conn.execute("SELECT part, next_offset, before_ms FROM offsets")
        return {int(part): (int(offset), int(ms)) for part, offset, ms in rows}

    # --- writing ------------------------------------------------------------------------------

    @property
    def unflushed(self) -> int:
        """Puts not in the file yet."""
        return len(self._unflushed)

    def put(self, dossier_id: str, value: bytes) -> None:
        """A dossier's wrapped key, or `ERASED`; in the file at the next `flush`."""
        self._unflushed.pop(dossier_id, None)  # the latest put last: erasures count in order
        self._unflushed[dossier_id] = value
        self._cache.pop(dossier_id, None)
        if len(self._unflushed) >= UNFLUSHED_MOST:  # written faster than read back
            self.flush()

    def flush(self, offsets: Mapping[int, tuple[int, int]] | None = None) -> None:
        """Write what was put since the last flush, and the partitions' offsets read to, in one
        transaction; drop the erasures past the latest `erased_kept`."""
        if not self._unflushed and not offsets:
            return
        rows: list[tuple[str, bytes, int | None]] = []
        for dossier_id, value in self._unflushed.items():
            seq = None
            if value == ERASED:
                self._erased_seq += 1
                seq = self._erased_seq
            rows.append((dossier_id, value, seq))
        rows.sort(key=lambda row: row[0])  # in the index's order: fewer pages touched
        pruned = any(seq is not None for _, _, seq in rows)
        with sqlite_file.transaction(self._conn) as conn:
            conn.executemany("INSERT OR REPLACE INTO keys VALUES (?, ?, ?)", rows)
            if pruned:
                conn.execute(
                    "DELETE FROM keys WHERE erased_seq IS NOT NULL AND erased_seq <= ?",
                    (self._erased_seq - self._erased_kept,),
                )
            conn.executemany(
                "INSERT OR REPLACE INTO offsets VALUES (?, ?, ?)",
                [(part, offset, ms) for part, (offset, ms) in (offsets or {}).items()],
            )
        self._unflushed.clear()
        if pruned:  # an erasure looked up may be one of those dropped
            for dossier_id in [d for d, value in self._cache.items() if value == ERASED]:
                del self._cache[dossier_id]

    def forget(self) -> None:
        """Empty the file: it is read again from the topic's beginning."""
        self._unflushed.clear()
        self._cache.clear()
        self._conn.executescript(
            "BEGIN; DELETE FROM keys; DELETE FROM offsets;"
            " DELETE FROM meta WHERE name = 'identity'; COMMIT;"
        )
        self._erased_seq = 0
        self.identity = self._new_identity()

    def _new_identity(self) -> str:
        """A name for what the file holds now, new at every `forget`: what is kept beside it
        (the retention's closing moments) was read from the same topic while it is the same."""
        identity = uuid.uuid4().hex
        self._conn.execute("INSERT OR REPLACE INTO meta VALUES ('identity', ?)", (identity,))
        return identity
