"""The retention of personal data (CONTRACT section 10): the data keys of closed dossiers are
destroyed `MOTCUA_PII_RETENTION_DAYS` after closing, which erases their personal data everywhere.

Every `MOTCUA_PII_RETENTION_INTERVAL_SECONDS` one intake replica (a claim in Redis for the
interval) reads `dossier.events` to its end, folds when each dossier whose key is still there
closed (`closing.Stories`: its memory follows the keys kept, not the history), and writes the
tombstone of each key due (acks=all) on `dossier.keys`. Reading the whole topic keeps nothing
between runs: a replica that dies mid-run leaves the rest to the next run. Closing is in event
time: a replay of history older than the retention loses the keys of its closed dossiers at the
next run (the benchmarks that replay the seed set `MOTCUA_PII_RETENTION_DAYS` to cover it).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import orjson
import redis.asyncio as aioredis

from services.common.changelog import read_to_end
from services.common.coordination import Keys
from services.common.data_keys import DataKeys
from services.common.kafka import DurablePublisher
from services.common.logging import get_logger
from services.common.topics import DOSSIER_EVENTS, DOSSIER_KEYS
from services.intake.closing import CLOSING_TYPES, Stories, due_with_keys

log = get_logger("motcua.intake.retention")

TOMBSTONES_PER_WRITE = 500
_MARKS = tuple(f'"{kind}"'.encode() for kind in CLOSING_TYPES)


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
    ) -> None:
        self._bootstrap = bootstrap
        self._keys = keys
        self._publisher = publisher
        self._redis = redis
        self._turn = redis_keys("intake", "pii-retention", "turn")
        self._retention = timedelta(days=days)
        self._interval = interval_seconds
        self._clock = clock

    async def run_forever(self) -> None:
        """Every interval, once across the replicas: destroy the keys due."""
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
        live = set(self._keys.dossiers())  # only these can be due: the fold keeps no others
        stories = Stories()
        async for batch in read_to_end(self._bootstrap, DOSSIER_EVENTS):
            for records in batch.values():
                for record in records:
                    value = record.value
                    if not value or not any(mark in value for mark in _MARKS):
                        continue
                    with contextlib.suppress(ValueError, TypeError, KeyError):
                        event = orjson.loads(value)
                        at = datetime.fromisoformat(event["time"])
                        if at.tzinfo is not None and event["subject"] in live:
                            stories.add(event["type"], event["subject"], at)
        doomed = due_with_keys(stories.closed(), live, self._clock(), self._retention)
        for start in range(0, len(doomed), TOMBSTONES_PER_WRITE):
            chunk = doomed[start : start + TOMBSTONES_PER_WRITE]
            await self._publisher.publish([(DOSSIER_KEYS, d.encode(), None) for d in chunk])
            for dossier_id in chunk:
                self._keys.apply_written(dossier_id, None)
        log.info(
            "pii_retention_done",
            destroyed=len(doomed),
            seconds=round(time.monotonic() - started, 3),
        )
        return doomed
