"""The retention of personal data (CONTRACT section 10): the data keys of closed dossiers are
destroyed `MOTCUA_PII_RETENTION_DAYS` after closing, which erases their personal data everywhere.

Every `MOTCUA_PII_RETENTION_INTERVAL_SECONDS` one intake replica (a claim in Redis for the
interval) reads `dossier.events` from where its last round ended (the whole topic at its first
round ever), folds when each dossier whose key is still there closed, and writes the tombstone
of each key due (acks=all) on `dossier.keys`. The closing moments and where the read ended are
kept in a file of intake's data directory (`closing_file.ClosingFile`), only for dossiers whose
key is still there: intake's memory holds a batch of the read, and a process started again
reads on from where its last round ended. A replica that dies mid-round leaves the rest to the
next round, of whichever replica. Closing is in event time, against the wall clock: a replay of
history older than the retention would lose the keys of its closed dossiers at the next round.
`MOTCUA_PII_RETENTION_CLOCK=events` (replays only: benchmarks, load tests) takes instead the
latest closing moment read as "now" (`closing.HistoryClock`, kept in the file too), so the keys
follow the retention in the replayed history's time.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import redis.asyncio as aioredis

from services.common.changelog import read_to_end
from services.common.coordination import Keys
from services.common.data_keys import DataKeys
from services.common.kafka import DurablePublisher
from services.common.logging import get_logger
from services.common.topics import DOSSIER_EVENTS, DOSSIER_KEYS
from services.intake.closing import CLOSING_TYPES, HistoryClock
from services.intake.closing_file import ClosingFile

log = get_logger("motcua.intake.retention")

TOMBSTONES_PER_WRITE = 500
CLOCKS_APART_MS = 60_000  # how far the intake replicas' clocks may disagree
_MARKS = tuple(f'"{kind}"'.encode() for kind in CLOSING_TYPES)

Closing = tuple[str, str, datetime, int]  # type, dossier id, event time, written (epoch ms)


def now_utc() -> datetime:
    return datetime.now(UTC)


class Retention:
    def __init__(
        self,
        bootstrap: str,
        keys: DataKeys,
        publisher: DurablePublisher,
        redis: aioredis.Redis,
        redis_keys: Keys,
        *,
        days: float,
        interval_seconds: float,
        clock: Callable[[], datetime] = now_utc,
        history_clock: bool = False,
        directory: Path | None = None,  # where the closing moments are kept (None: in memory)
    ) -> None:
        self._bootstrap = bootstrap
        self._keys = keys
        self._publisher = publisher
        self._redis = redis
        self._turn = redis_keys("intake", "pii-retention", "turn")
        self._retention = timedelta(days=days)
        self._interval = interval_seconds
        self._clock = clock
        # with `history_clock`, "now" is the latest closing moment read (a replay of history)
        self._history = HistoryClock() if history_clock else None
        # when each dossier whose key is there closed, and where the last round's read ended
        if directory is None:
            self._closing = ClosingFile(None, keys.identity)
        else:
            self._closing = ClosingFile.in_directory(directory, keys.identity)

    async def run_forever(self) -> None:
        """Every interval, once across the replicas: destroy the keys due. The file is closed,
        and its slot given up, when the task ends."""
        try:
            await self._rounds()
        finally:
            self._closing.close()

    async def _rounds(self) -> None:
        while True:
            try:
                if self._keys.caught_up and await self._redis.set(
                    self._turn, "1", nx=True, px=max(1, int(self._interval * 1000))
                ):
                    await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the broker or Redis away: the next round tries again
                with contextlib.suppress(Exception):
                    await self._redis.delete(self._turn)
                log.warning("pii_retention_failed", error_type=type(exc).__name__)
            await asyncio.sleep(min(self._interval, 60.0))

    async def run_once(self) -> list[str]:
        """Destroy the keys of the dossiers closed longer than the retention ago; return them."""
        started = time.monotonic()
        # Keys are written before their events: a dossier whose key this replica does not hold
        # now, and whose events were written before now (give or take the replicas' clocks),
        # has no key to destroy. Only the events written since may be of keys not read yet.
        await self._keys.read_to_now()
        self._closing.follow(self._keys.identity)
        if self._history is not None and self._history.now is None:
            self._history.now = self._closing.history_now()
        since_ms = int(time.time() * 1000) - CLOCKS_APART_MS
        later: list[Closing] = []  # written since, of dossiers whose key was not read yet
        upto = self._closing.upto()
        async for batch in read_to_end(self._bootstrap, DOSSIER_EVENTS, start_offsets=upto):
            closings: list[Closing] = []
            for tp, records in batch.items():
                if records:
                    upto[tp.partition] = records[-1].offset + 1
                for record in records:
                    value = record.value
                    if not value or not any(mark in value for mark in _MARKS):
                        continue
                    with contextlib.suppress(ValueError, TypeError, KeyError):
                        event = orjson.loads(value)
                        at = datetime.fromisoformat(event["time"])
                        dossier_id = event["subject"]
                        if at.tzinfo is None or not isinstance(dossier_id, str):
                            continue
                        if self._history is not None:
                            self._history.read(at)
                        closings.append((event["type"], dossier_id, at, record.timestamp))
            later.extend(self._fold(closings, since_ms, upto))
        await self._keys.read_to_now()  # the keys of the events written since are read now
        self._fold(later, None, upto)
        now = self._clock() if self._history is None else self._history.now
        doomed: list[str] = []
        if now is not None:
            closed = self._closing.closed_before(now - self._retention)
            live = self._keys.holding(closed)
            self._closing.drop(d for d in closed if d not in live)  # erased meanwhile
            doomed = [d for d in closed if d in live]
        for start in range(0, len(doomed), TOMBSTONES_PER_WRITE):
            chunk = doomed[start : start + TOMBSTONES_PER_WRITE]
            await self._publisher.publish([(DOSSIER_KEYS, d.encode(), None) for d in chunk])
            for dossier_id in chunk:
                self._keys.apply_written(dossier_id, None)
            self._closing.drop(chunk)
        log.info(
            "pii_retention_done",
            destroyed=len(doomed),
            seconds=round(time.monotonic() - started, 3),
        )
        return doomed

    def _fold(
        self, closings: list[Closing], since_ms: int | None, upto: dict[int, int]
    ) -> list[Closing]:
        """Fold the closings of dossiers whose key is there into the file, with where the read
        stands; return the others written since `since_ms` (None: none kept)."""
        held = self._keys.holding({dossier_id for _, dossier_id, _, _ in closings})
        stories = self._closing.stories(held)
        others: list[Closing] = []
        for closing in closings:
            kind, dossier_id, at, written_ms = closing
            if dossier_id in held:
                stories.add(kind, dossier_id, at)
            elif since_ms is not None and written_ms >= since_ms:
                others.append(closing)
        self._closing.save(stories, upto, None if self._history is None else self._history.now)
        return others
