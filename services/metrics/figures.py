"""The figures every metrics process answers with, whichever partitions it holds.

`Figures` is the sum of everything in the metrics changelog (`topics.METRICS_STATE_CHANGELOG`),
all partitions: the contributions of every live dossier state (`domain.contributions`) and the
folds of the retired ones (`rollups.Fold`). It is built record by record, in the order of each
partition, so it needs nothing but the topic:

- a state record replaces the dossier's previous contributions by the new ones (a tombstone
  removes them);
- a fold adds its sums and drops the live states it names, each by the digest of its bytes (the
  worker writes a fold before the tombstones of its dossiers, in the same partition, so those
  states were read just before; the tombstones that follow find nothing to remove).

The first read keeps each key's latest record and decodes only those, then applies the folds:
the same figures as record by record, at the cost of the live states.

`FiguresFollower.follow()` (a task of the app) reads the topic from the beginning, then tails it
(a consumer of no group): `caught_up` once it has read up to the end offsets taken when it
started (the service's `/readyz` waits for it). When the broker goes away it keeps the figures it
has, builds them again from the beginning once the broker answers, and never ends the process.
Two processes that have read the same records answer the same figures.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.structs import TopicPartition
from prometheus_client import Counter

from services.common.following import every_partition, follow_forever
from services.common.logging import get_logger
from services.common.state import RESERVED
from services.common.topics import TopicSpec
from services.metrics.domain import (
    OVERDUE_TYPE,
    Deltas,
    DossierState,
    advance_watermark,
    contributions,
)
from services.metrics.rollups import InvalidFold, decode_fold, state_digest
from services.metrics.store import ColumnarStore

log = get_logger("motcua.metrics.figures")

SKIPPED = Counter(
    "motcua_metrics_records_skipped_total",
    "Records of the metrics changelog that are neither a state nor a fold",
)


def _negated(deltas: Deltas) -> Deltas:
    return {key: -value for key, value in deltas.items()}


class Figures:
    """The store of every dossier's counts, and what the dashboard says about the data."""

    def __init__(self, decode: Callable[[str, bytes], DossierState]) -> None:
        self._decode = decode
        self.store = ColumnarStore()
        self._live: dict[str, tuple[str, Deltas]] = {}  # dossier id -> (digest, contributions)
        self.watermark: datetime | None = None
        self.first_minute: datetime | None = None
        self.folds = 0

    @property
    def dossiers(self) -> int:
        """Dossiers whose per-dossier state is held (in progress, or closed lately)."""
        return len(self._live)

    def state(self, dossier_id: str, raw: bytes | None) -> None:
        """A state record (None: its tombstone)."""
        before = self._live.pop(dossier_id, None)
        if raw is None:
            if before is not None:
                self.store.apply(_negated(before[1]))
            return
        state = self._decode(dossier_id, raw)
        after = contributions(state)
        self._live[dossier_id] = (state_digest(raw), after)
        if before is None:
            self.store.apply(after)
        else:
            change = dict(after)
            for key, value in before[1].items():
                change[key] = change.get(key, 0) - value
            self.store.apply({key: value for key, value in change.items() if value})
        for fact in state.facts:
            if fact.type != OVERDUE_TYPE:
                self._saw(fact.time)

    def fold(self, partition: int, raw: bytes) -> None:
        """A fold: its sums in, the states it names out."""
        fold = decode_fold(partition, raw)
        self.store.apply(fold.deltas)
        for dossier_id, digest in fold.folded.items():
            before = self._live.get(dossier_id)
            if before is not None and before[0] == digest:  # not a later state of that dossier
                del self._live[dossier_id]
                self.store.apply(_negated(before[1]))
        minutes = [cell.minute for cell, _ in fold.deltas]
        if minutes:  # the event times of the folded dossiers, to the minute
            self._saw(datetime.fromtimestamp(min(minutes) * 60, UTC))
            self._saw(datetime.fromtimestamp(max(minutes) * 60, UTC))
        self.folds += 1

    def record(self, partition: int, key: bytes | None, value: bytes | None) -> None:
        """Any record of the changelog."""
        if key is None:
            SKIPPED.inc()
            return
        name = key.decode(errors="replace")
        if not name.startswith(RESERVED):
            self.state(name, value or None)
            return
        if not value:
            return  # nothing tombstones a fold
        try:
            self.fold(partition, value)
        except InvalidFold as exc:
            SKIPPED.inc()
            log.warning("metrics_record_skipped", key=name[:80], reason=str(exc))

    def _saw(self, moment: datetime) -> None:
        self.watermark = advance_watermark(self.watermark, moment)
        if self.first_minute is None or moment < self.first_minute:
            self.first_minute = moment


class FiguresFollower:
    """This process's `Figures`, and the task that keeps them current."""

    def __init__(
        self,
        bootstrap: str,
        spec: TopicSpec,
        decode: Callable[[str, bytes], DossierState],
        *,
        replication: int = 1,
        poll_ms: int = 200,
    ) -> None:
        self._bootstrap = bootstrap
        self._spec = spec
        self._decode = decode
        self._replication = replication
        self._poll_ms = poll_ms
        self.figures = Figures(decode)
        self.caught_up = False

    async def figures_read(self) -> bool:
        """Whether the first whole read of the changelog is done (a ready check)."""
        return self.caught_up

    async def follow(self) -> None:
        """Catch up, then tail the changelog until cancelled; start again after any failure."""
        await follow_forever(self._catch_up_and_tail, name="figures_follower")

    async def _catch_up_and_tail(self, caught_up: Callable[[], None]) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self._poll_ms,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        await consumer.start()
        await asyncio.sleep(0)  # aiokafka 0.14: see changelog.read_to_end
        try:
            tps = await every_partition(consumer, self._bootstrap, self._spec, self._replication)
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            # The first read keeps each key's latest record and decodes only those: every
            # version of every state ever written is on a broker that does not compact.
            latest: dict[tuple[int, bytes], bytes] = {}
            folds: list[tuple[int, bytes]] = []
            behind = {tp for tp in tps if ends[tp] > 0}
            while behind:
                batch = await consumer.getmany(*tps, timeout_ms=500, max_records=20_000)
                for tp, records in batch.items():
                    for record in records:
                        _keep(latest, folds, tp.partition, record.key, record.value)
                for tp in list(behind):
                    if await consumer.position(tp) >= ends[tp]:
                        behind.discard(tp)
            self.figures = await self._built(latest, folds)
            if not self.caught_up:
                log.info(
                    "figures_caught_up",
                    dossiers=self.figures.dossiers,
                    folds=self.figures.folds,
                    partitions=len(tps),
                )
            self.caught_up = True
            caught_up()
            while True:
                batch = await consumer.getmany(timeout_ms=self._poll_ms, max_records=20_000)
                self._apply(self.figures, batch)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 5.0)

    async def _built(
        self, latest: dict[tuple[int, bytes], bytes], folds: list[tuple[int, bytes]]
    ) -> Figures:
        """The figures of the latest states, then the folds (each drops the very state it took,
        when its tombstone was not written yet)."""
        figures = Figures(self._decode)
        for count, ((partition, key), raw) in enumerate(latest.items(), start=1):
            figures.record(partition, key, raw)
            if count % 5000 == 0:
                await asyncio.sleep(0)  # stay responsive (/healthz, the consumer's heartbeats)
        for partition, raw in folds:
            figures.record(partition, f"{RESERVED}fold".encode(), raw)
        return figures

    @staticmethod
    def _apply(
        figures: Figures,
        batch: dict[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
    ) -> None:
        for tp, records in batch.items():
            for record in records:
                figures.record(tp.partition, record.key, record.value)


def _keep(
    latest: dict[tuple[int, bytes], bytes],
    folds: list[tuple[int, bytes]],
    partition: int,
    key: bytes | None,
    value: bytes | None,
) -> None:
    """A record of the first read: a fold kept in order, a state's latest version by key."""
    if key is None:
        return
    if key.startswith(RESERVED.encode()):
        if value:
            folds.append((partition, value))
    elif value:
        latest.pop((partition, key), None)
        latest[(partition, key)] = value
    else:
        latest.pop((partition, key), None)
