"""The finance reports' read model: every payment's report row in an SQLite file, built by
following `payment.events` (every partition, no consumer group) and kept across restarts.

- `ReportStore` is the file: one row per payment (`reports.fold` decides what an event changes)
  and the offset reached in each partition, written in the same transaction, so a restart goes
  on where the last batch ended and a row never counts an event twice. A file that is absent is
  built again from the topic's beginning (`payment.events` keeps every event). Until the file
  has once read to the end of every partition (`complete`), the routes answer 503.
- Several payments processes each keep their own file under `MOTCUA_DATA_DIR`: a process takes
  the first slot whose lock file no other process holds (`payments-reports-0.sqlite`, `-1`...),
  so processes sharing a disk never write one file, and a restarted process finds its file again.
- The file is on disk in WAL mode with a bounded page cache per connection (memory does not grow
  with history); reads and writes run in threads (`asyncio.to_thread`), each reading thread
  with its own connection, so neither blocks the event loop nor each other.
- `ReportFeed.follow()` (a task of the app) applies the topic in batches of up to 2000 records.
"""

from __future__ import annotations

import asyncio
import heapq
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from services.common import sqlite_file, topics
from services.common.following import assigned_consumer, follow_forever
from services.common.logging import get_logger
from services.common.topics import TopicSpec
from services.payments.reports import (
    COLUMNS,
    Page,
    ReportQuery,
    ReportRow,
    TotalsQuery,
    fold,
    key_of,
    merged_page,
    page_sql,
    row_of,
    row_values,
    split_on,
    totals_sql,
)

log = get_logger("motcua.payments.reports")

CACHE_KIB = 8 * 1024  # page cache per connection
BATCH = 2000

SCHEMA = """
CREATE TABLE IF NOT EXISTS payments (
    dossier_id TEXT PRIMARY KEY,
    agency_code TEXT NOT NULL,
    gateway TEXT NOT NULL,
    txn_ref TEXT NOT NULL,
    amount_vnd INTEGER NOT NULL,
    currency TEXT NOT NULL,
    state TEXT NOT NULL,
    version INTEGER NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    settled_at INTEGER,
    paid_at INTEGER,
    refunded_vnd INTEGER NOT NULL DEFAULT 0,
    paid_day TEXT
);
CREATE INDEX IF NOT EXISTS by_created ON payments
    (created_at, dossier_id, agency_code, state, gateway, amount_vnd);
CREATE INDEX IF NOT EXISTS by_agency ON payments (agency_code, created_at, dossier_id);
CREATE INDEX IF NOT EXISTS by_state ON payments (state, created_at, dossier_id);
CREATE INDEX IF NOT EXISTS by_gateway ON payments (gateway, created_at, dossier_id);
CREATE INDEX IF NOT EXISTS by_txn_ref ON payments (txn_ref);
CREATE INDEX IF NOT EXISTS by_paid_day ON payments
    (paid_day, agency_code, gateway, amount_vnd, refunded_vnd) WHERE paid_day IS NOT NULL;
CREATE TABLE IF NOT EXISTS offsets (part INTEGER PRIMARY KEY, next_offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_UPSERT = (
    f"INSERT OR REPLACE INTO payments ({', '.join(COLUMNS)}, paid_day) "
    f"VALUES ({', '.join('?' * (len(COLUMNS) + 1))})"
)
_SELECT_ONE = f"SELECT {', '.join(COLUMNS)} FROM payments WHERE dossier_id = ?"

Record = tuple[int, int, bytes | None]  # (partition, offset, value)


def _connect(path: Path) -> sqlite3.Connection:
    return sqlite_file.connect(path, cache_kib=CACHE_KIB)


def claim_slot(directory: Path) -> tuple[Path, IO[bytes]]:
    """The first report file under `directory` no other process holds, and its held lock."""
    return sqlite_file.slot(directory, "payments-reports")


class ReportStore:
    """The SQLite file; every method is blocking (call it through `asyncio.to_thread`)."""

    def __init__(self, path: Path, source: str, lock: IO[bytes] | None = None) -> None:
        self.path = path
        self._lock = lock  # held for the life of the process
        self._writer = _connect(path)
        self._writer.executescript(SCHEMA)
        self._local = threading.local()
        if self._meta("source") != source:  # another broker's or namespace's events
            self.reset()
            self._writer.execute(
                "INSERT OR REPLACE INTO meta (name, value) VALUES ('source', ?)", (source,)
            )
        self.complete = self._meta("complete") is not None

    @classmethod
    def in_directory(cls, directory: str | os.PathLike[str], source: str) -> ReportStore:
        """The report file of this process under `directory`, for the events of `source` (the
        broker and namespace: a file built from other events is built again)."""
        path, lock = claim_slot(Path(directory))
        return cls(path, source, lock)

    def _meta(self, name: str) -> str | None:
        return sqlite_file.meta(self._writer, name)

    def reset(self) -> None:
        """Forget every row and offset: the file is built again from the topic's beginning."""
        self._writer.executescript(
            "BEGIN; DELETE FROM payments; DELETE FROM offsets;"
            " DELETE FROM meta WHERE name = 'complete'; COMMIT;"
        )
        self.complete = False

    def close(self) -> None:
        self._writer.close()
        if self._lock is not None:
            self._lock.close()

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connect(self.path)
            self._local.conn = conn
        return conn

    # --- writing ----------------------------------------------------------------------------

    def offsets(self) -> dict[int, int]:
        return dict(self._writer.execute("SELECT part, next_offset FROM offsets").fetchall())

    def apply(self, records: Sequence[Record]) -> int:
        """Fold `records` (in their partitions' order) in one transaction with their offsets;
        returns how many rows changed. Undecodable values change nothing."""
        changed: dict[str, ReportRow] = {}
        ends: dict[int, int] = {}
        conn = self._writer
        for part, offset, value in records:
            ends[part] = max(ends.get(part, 0), offset + 1)
            try:
                event = orjson.loads(value) if value else None
            except orjson.JSONDecodeError:
                event = None
            if not isinstance(event, dict):
                continue
            data = event.get("data")
            dossier_id = data.get("dossier_id") if isinstance(data, dict) else None
            dossier_id = dossier_id or event.get("subject")
            if not isinstance(dossier_id, str):
                continue
            row = changed.get(dossier_id)
            if row is None:
                found = conn.execute(_SELECT_ONE, (dossier_id,)).fetchone()
                row = row_of(found) if found else None
            after = fold(row, event)
            if after is not None:
                changed[dossier_id] = after
        with sqlite_file.transaction(conn):
            conn.executemany(_UPSERT, [row_values(row) for row in changed.values()])
            conn.executemany(
                "INSERT INTO offsets (part, next_offset) VALUES (?, ?) ON CONFLICT (part) "
                "DO UPDATE SET next_offset = MAX(next_offset, excluded.next_offset)",
                list(ends.items()),
            )
        return len(changed)

    def put_rows(self, rows: Sequence[ReportRow]) -> None:
        """Write `rows` as they are (the benchmark's bulk load)."""
        with self._writer:
            self._writer.execute("BEGIN")
            self._writer.executemany(_UPSERT, [row_values(row) for row in rows])

    def mark_complete(self) -> None:
        self._writer.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('complete', '1')")
        self.complete = True

    # --- reading ----------------------------------------------------------------------------

    def _select(self, query: ReportQuery) -> list[ReportRow]:
        sql, args = page_sql(query)
        return [row_of(found) for found in self._reader().execute(sql, args)]

    def page(self, query: ReportQuery) -> Page:
        """One page of the list (several agencies: one ordered walk each, merged)."""
        return merged_page(query, [self._select(part) for part in split_on(query)])

    def rows(self, query: ReportQuery, chunk: int = 1000) -> Iterator[list[ReportRow]]:
        """Every row of `query`, newest first, in chunks of `chunk` (each its own read)."""
        query = replace(query, limit=chunk)
        parts = split_on(query)
        iterators = [self._walk(part) for part in parts]
        merged = heapq.merge(*iterators, key=key_of, reverse=True)
        batch: list[ReportRow] = []
        for row in merged:
            batch.append(row)
            if len(batch) >= chunk:
                yield batch
                batch = []
        if batch:
            yield batch

    def _walk(self, query: ReportQuery) -> Iterator[ReportRow]:
        while True:
            found = self._select(query)
            yield from found[: query.limit]
            if len(found) <= query.limit:
                return
            last = found[query.limit - 1]
            query = replace(query, after=key_of(last))

    def totals(self, query: TotalsQuery) -> list[tuple[Any, ...]]:
        sql, args = totals_sql(query)
        return list(self._reader().execute(sql, args))

    def count(self) -> int:
        found = self._reader().execute("SELECT COUNT(*) FROM payments").fetchone()
        return int(found[0])


class ReportFeed:
    """Keeps a `ReportStore` current with `payment.events` for the life of the process."""

    name = "payment_reports"

    def __init__(self, store: ReportStore, bootstrap: str, partitions: int, replication: int):
        self.store = store
        self._bootstrap = bootstrap
        self._spec = TopicSpec(topics.PAYMENT_EVENTS, partitions)
        self._replication = replication
        self.applied = 0  # events read since the start (tests and logs)

    async def follow(self) -> None:
        await follow_forever(self._catch_up_and_tail, name=self.name)

    async def _catch_up_and_tail(self, caught_up: Callable[[], None]) -> None:
        async with assigned_consumer(self._bootstrap, self._spec, self._replication) as (
            consumer,
            tps,
        ):
            ends: dict[TopicPartition, int] = await consumer.end_offsets(tps)
            catching_up = True
            done = await asyncio.to_thread(self.store.offsets)
            if any(done.get(tp.partition, 0) > end for tp, end in ends.items()):
                log.warning("payment_reports_rebuilt", reason="offsets past the topic's end")
                await asyncio.to_thread(self.store.reset)
                done = {}
            for tp in tps:
                if tp.partition in done:
                    consumer.seek(tp, done[tp.partition])
                else:
                    await consumer.seek_to_beginning(tp)
            while True:
                batch = await consumer.getmany(timeout_ms=200, max_records=BATCH)
                records = [
                    (tp.partition, r.offset, r.value) for tp, rs in batch.items() for r in rs
                ]
                if records:
                    await asyncio.to_thread(self.store.apply, records)
                    self.applied += len(records)
                if catching_up and all(
                    await asyncio.gather(
                        *(self._reached(consumer, tp, end) for tp, end in ends.items())
                    )
                ):
                    catching_up = False
                    if not self.store.complete:
                        await asyncio.to_thread(self.store.mark_complete)
                    caught_up()
                    log.info("payment_reports_caught_up", events=self.applied)

    @staticmethod
    async def _reached(consumer: AIOKafkaConsumer, tp: TopicPartition, end: int) -> bool:
        position: int = await consumer.position(tp)
        return position >= end
