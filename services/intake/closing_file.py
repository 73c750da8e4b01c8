"""When each dossier whose data key is there closed, for the retention of personal data
(`retention.Retention`), in an SQLite file of intake's data directory, with where the last
round's read of `dossier.events` ended.

A row is what `closing.Stories` holds of a dossier: a dossier still open its latest resolution
and return so far, a closed one its closing moment (an ended one, withdrawn or rejected, with
that moment as its end). Moments are microseconds since the epoch (UTC), exact. A round loads
the rows of the dossiers its events name, folds the events in (`closing.Stories.add`), and saves
them with the offsets read to in one transaction; the keys due are found by the closing moment's
index. So intake holds a round's batch in memory, not every dossier within the retention, and a
process started again reads on from where its last round ended.

The file is of the key file it was read beside (`DataKeys.identity`): when the keys are read
again from the beginning (another topic of the same name), so is `dossier.events`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

from services.common import sqlite_file
from services.intake.closing import Stories, Story

CACHE_KIB = 2 * 1024
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

SCHEMA = """
CREATE TABLE IF NOT EXISTS closing (
    dossier_id TEXT PRIMARY KEY,
    resolved_us INTEGER,
    returned_us INTEGER,
    ended_us INTEGER,
    closed_us INTEGER
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS by_closed ON closing (closed_us) WHERE closed_us IS NOT NULL;
CREATE TABLE IF NOT EXISTS upto (part INTEGER PRIMARY KEY, next_offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

Row = tuple[str, int | None, int | None, int | None, int | None]


def micros(at: datetime) -> int:
    return (at - EPOCH) // timedelta(microseconds=1)


def moment(us: int) -> datetime:
    return EPOCH + timedelta(microseconds=us)


def _opt(us: int | None) -> datetime | None:
    return None if us is None else moment(us)


def _dossier_id(row: Row) -> str:
    return row[0]


def stories_of(rows: Iterable[Row]) -> Stories:
    """The rows as `Stories` (pure)."""
    stories = Stories()
    for dossier_id, resolved, returned, ended, closed in rows:
        if ended is not None:
            stories.ended[dossier_id] = moment(ended)
        elif closed is not None:
            stories.done[dossier_id] = moment(closed)
        else:
            stories.open[dossier_id] = Story(_opt(resolved), _opt(returned))
    return stories


def rows_of(stories: Stories) -> list[Row]:
    """`Stories` as rows (pure): `stories_of(rows_of(s))` holds what `s` holds."""
    rows: list[Row] = [
        (
            d,
            None if s.resolved_at is None else micros(s.resolved_at),
            None if s.returned_at is None else micros(s.returned_at),
            None,
            None,
        )
        for d, s in stories.open.items()
    ]
    rows.extend((d, None, None, None, micros(at)) for d, at in stories.done.items())
    rows.extend((d, None, None, micros(at), micros(at)) for d, at in stories.ended.items())
    return rows


class ClosingFile:
    """The closing moments and the read's offsets; every method blocks (one statement, or one
    transaction)."""

    def __init__(
        self, path: Path | None, keys_identity: str, lock: IO[bytes] | None = None
    ) -> None:
        self._conn = sqlite_file.connect(path, cache_kib=CACHE_KIB)  # None: in memory (tests)
        self._conn.executescript(SCHEMA)
        self._lock = lock  # held for the life of the process
        self.follow(keys_identity)

    @classmethod
    def in_directory(cls, directory: Path, keys_identity: str) -> ClosingFile:
        path, lock = sqlite_file.slot(directory, "pii-retention")
        return cls(path, keys_identity, lock)

    def follow(self, keys_identity: str) -> None:
        """Hold what was read beside the key file named `keys_identity`: another one empties
        this file (to be read again from the beginning)."""
        if sqlite_file.meta(self._conn, "keys") == keys_identity:
            return
        self._conn.executescript(
            "BEGIN; DELETE FROM closing; DELETE FROM upto; DELETE FROM meta; COMMIT;"
        )
        self._conn.execute("INSERT INTO meta VALUES ('keys', ?)", (keys_identity,))

    def close(self) -> None:
        self._conn.close()
        if self._lock is not None:
            self._lock.close()

    def upto(self) -> dict[int, int]:
        """Where the last round's read ended, per partition."""
        rows = self._conn.execute("SELECT part, next_offset FROM upto")
        return {int(part): int(offset) for part, offset in rows}

    def history_now(self) -> datetime | None:
        """The replayed history's "now" as last saved (`closing.HistoryClock`)."""
        found = sqlite_file.meta(self._conn, "history_now")
        return None if found is None else moment(int(found))

    def stories(self, dossier_ids: Iterable[str]) -> Stories:
        """What is kept of these dossiers (none of those with no row)."""
        rows = sqlite_file.rows_in(
            self._conn,
            "SELECT dossier_id, resolved_us, returned_us, ended_us, closed_us"
            " FROM closing WHERE dossier_id IN ({})",
            list(dossier_ids),
        )
        return stories_of(rows)

    def save(self, stories: Stories, upto: Mapping[int, int], history_now: datetime | None) -> None:
        """The dossiers of `stories` as they are now, and where the read stands."""
        with sqlite_file.transaction(self._conn) as conn:
            rows = sorted(rows_of(stories), key=_dossier_id)  # the index's order
            conn.executemany("INSERT OR REPLACE INTO closing VALUES (?, ?, ?, ?, ?)", rows)
            conn.executemany("INSERT OR REPLACE INTO upto VALUES (?, ?)", list(upto.items()))
            if history_now is not None:
                conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('history_now', ?)",
                    (str(micros(history_now)),),
                )

    def closed_before(self, at: datetime) -> list[str]:
        """The dossiers closed at or before `at`, in a stable order."""
        rows = self._conn.execute(
            "SELECT dossier_id FROM closing WHERE closed_us <= ? ORDER BY dossier_id",
            (micros(at),),
        )
        return [str(row[0]) for row in rows]

    def drop(self, dossier_ids: Iterable[str]) -> None:
        """Forget these dossiers (their key is gone)."""
        self._conn.executemany(
            "DELETE FROM closing WHERE dossier_id = ?", [(d,) for d in dossier_ids]
        )

    def count(self) -> int:
        return int(self._conn.execute("SELECT COUNT(*) FROM closing").fetchone()[0])
