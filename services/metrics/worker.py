"""The metrics worker: folds batches of events into the per-dossier states of the partitions it
holds, announces dossiers whose due date passed, and retires dossiers whose story is over.

- `on_batch` groups a batch by dossier, folds each group into the dossier's state
  (`domain.fold_all`, idempotent by (source, id)) and puts the new state in the `StateTable`;
  the batch consumer writes the changed states to the changelog (acks=all) before it commits the
  batch's offsets. The figures are not kept here: every metrics process reads them from the
  changelog, all partitions (`figures.Figures`).
- Retirement, after a batch or an empty poll, at most every `METRICS_RETIRE_INTERVAL_SECONDS`:
  the states whose story is over and whose last input arrived longer ago than their grace
  (`domain.retire_after`, on the wall clock; an index by that moment, no scan), and that the
  changelog already holds as they are (none changed in this batch), are summed into one
  `rollups.Fold` per partition (at most `FOLD_MOST` dossiers each: the rest wait for the next
  step), written to that partition of the changelog, and only then
  deleted (their tombstones follow in the same partition). A late event for a retired dossier
  starts a new state of that dossier, counted from that event on (its own time, its own
  agency; tier and sector `unknown` unless a `dossier.submitted` comes again): its earlier
  events are in the folds and are not counted again.
- `after_restore` runs once the states of newly assigned partitions are read back from the
  changelog: the overdue and retirement indexes and the watermark are rebuilt from the states
  (a restored state waits a whole grace again: when its last input came is not kept).
  A worker that stopped between a fold and its tombstones left those states behind: the last
  fold of each partition names them (id and digest of their bytes), and they are deleted then.
- `emit_overdue` (a timer) pops the dossiers whose `due_at` passed (an index by due date, no
  scan) and publishes one `dossier.overdue` each (deterministic id), several per send; the event
  comes back on `dossier.events` and marks the state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka.structs import TopicPartition
from prometheus_client import Counter, Gauge

from services.common.due import DueIndex
from services.common.events import CloudEvent, parse_event
from services.common.kafka import dossier_partition
from services.common.logging import get_logger
from services.common.state import RESERVED, STATES_LIVE, STATES_RETIRED, StateTable
from services.metrics.domain import (
    OVERDUE_TYPE,
    DossierState,
    Event,
    OverdueIndex,
    RetirePolicy,
    advance_watermark,
    contributions,
    fold_all,
    is_overdue_unannounced,
    new_state,
    overdue_event,
    retire_after,
)
from services.metrics.rollups import InvalidFold, decode_fold, encode_fold, fold_of, state_digest
from services.metrics.settings import MetricsSettings

log = get_logger("motcua.metrics")

Publish = Callable[[Sequence[CloudEvent[Any]]], Awaitable[None]]

# `dossier.overdue` events handed to the producer per send (each send waits for its acks).
OVERDUE_PER_SEND = 500
# Dossiers one fold takes at most: a fold is one changelog record (its dossiers' ids and digests
# and their summed counts: 700-800 bytes a dossier for the tests' dossier streams), well under
# what one produce request carries (`kafka.MAX_REQUEST_BYTES`, 2 MiB). More due at once (a
# restart after a replay puts every closed dossier's grace at the same moment) retire at the
# next steps.
FOLD_MOST = 1000

OVERDUE_EMITTED = Counter("motcua_overdue_emitted_total", "dossier.overdue events published")
REBUILD_SECONDS = Gauge("motcua_metrics_rebuild_seconds", "Duration of the last rebuild")
FOLD_PREFIX = f"{RESERVED}fold:"


def to_domain(event: CloudEvent[Any]) -> Event:
    """The domain's view of a validated envelope (data keeps parsed datetimes and extras)."""
    data = event.data
    # what `dict(data)` gives, without pydantic's mapping-protocol probe (an AttributeError
    # raised and caught per event)
    values = dict(data.__dict__)
    if data.__pydantic_extra__:
        values.update(data.__pydantic_extra__)
    return Event(event.source, event.id, event.type, event.subject, event.time, values)


class MetricsWorker:
    """The states of the partitions held (a `StateTable` on the metrics changelog), their
    overdue announcements and their retirement."""

    def __init__(
        self,
        states: StateTable[DossierState],
        metrics: MetricsSettings,
        publish: Publish,
        *,
        partitions: int,
    ) -> None:
        self.metrics = metrics
        self.publish = publish
        self.states = states
        self.partitions = partitions
        self.index = OverdueIndex()
        self.retiring = DueIndex()
        self.policy = RetirePolicy(
            timedelta(seconds=metrics.retire_after_seconds),
            timedelta(seconds=metrics.retire_idle_after_seconds),
        )
        self.watermark: datetime | None = None
        self._next_retirement = 0.0

    @property
    def dossiers(self) -> int:
        return len(self.states)

    # --- consuming -------------------------------------------------------------------------

    async def on_batch(self, events: Sequence[CloudEvent[Any]]) -> None:
        """Fold a batch into the states and the overdue index; then retire what is due."""
        by_dossier: dict[str, list[Event]] = {}
        for envelope in events:
            event = to_domain(envelope)
            by_dossier.setdefault(event.subject, []).append(event)
        if events:
            self.watermark = advance_watermark(self.watermark, max(e.time for e in events))
        # every fold first: a failing event leaves the states untouched
        now = datetime.now(UTC)
        folded = []
        for dossier_id, batch in by_dossier.items():
            before = self.states.get(dossier_id) or new_state(dossier_id)
            after = fold_all(before, batch)
            if after is not before:  # else every event was applied already: a redelivery
                folded.append((dossier_id, after))
        for dossier_id, after in folded:
            self.states.put(dossier_id, after)
            self.index.track(after)
            self._watch(dossier_id, after, now)
        await self.retire_when_due()

    async def retire_when_due(self) -> None:
        """`retire` at most every `METRICS_RETIRE_INTERVAL_SECONDS` (after a batch, and when a
        poll brings nothing: the consumer's `on_idle`)."""
        if time.monotonic() >= self._next_retirement:
            self._next_retirement = time.monotonic() + self.metrics.retire_interval_seconds
            await self.retire()
        STATES_LIVE.labels("metrics").set(len(self.states))

    def _watch(self, dossier_id: str, state: DossierState, now: datetime) -> None:
        grace = retire_after(state, self.policy)
        self.retiring.set(dossier_id, None if grace is None else now + grace)

    async def retire(self) -> None:
        """Fold the states whose grace passed into one fold per partition (at most `FOLD_MOST`
        dossiers: the rest stay due for the next step), write each fold, then delete its
        states (the consumer writes their tombstones next)."""
        now = datetime.now(UTC)
        unsaved = self.states.unsaved
        by_partition: dict[int, list[tuple[str, bytes, DossierState]]] = {}
        # as many as the folds take: a burst stays in the index for the next steps
        for dossier_id in self.retiring.pop_due(now, FOLD_MOST * self.partitions):
            raw = self.states.raw(dossier_id)
            if raw is None:
                continue
            partition = dossier_partition(dossier_id.encode(), self.partitions)
            if len(by_partition.get(partition, ())) >= FOLD_MOST:  # more than its share
                self.retiring.set(dossier_id, now)  # due still: the next step's fold takes it
                continue
            state = self.states.decode(dossier_id, raw)
            if retire_after(state, self.policy) is None or dossier_id in unsaved:
                self._watch(dossier_id, state, now)  # changed since: wait again
                continue
            by_partition.setdefault(partition, []).append((dossier_id, raw, state))
        folds = sorted(by_partition.items())
        for index, (partition, retired) in enumerate(folds):
            fold = fold_of(
                partition,
                self.clock() or now,
                ((d, raw, contributions(st)) for d, raw, st in retired),
            )
            try:
                await self.states.write_reserved(
                    partition, FOLD_PREFIX + fold.key.decode(), encode_fold(fold)
                )
            except Exception:
                for _, left in folds[index:]:  # tried again at the next retirement
                    for dossier_id, _, state in left:
                        self._watch(dossier_id, state, now)
                raise
            for dossier_id, _, _ in retired:
                self.states.delete(dossier_id)
            STATES_RETIRED.labels("metrics").inc(len(retired))
            log.debug("metrics_retired", partition=partition, dossiers=len(retired))

    async def after_restore(self, assigned: frozenset[TopicPartition]) -> None:
        """The overdue and retirement indexes and the watermark from the restored states; the
        states a fold already took (the worker stopped before their tombstones) are deleted."""
        started = time.perf_counter()
        self.watermark = None
        self._forget_folded()
        await self.states.save()  # their tombstones, before anything else is written
        index, retiring = OverdueIndex(), DueIndex()
        now = datetime.now(UTC)
        states = self.states.items_raw()
        for count, (dossier_id, raw) in enumerate(states, start=1):
            state = self.states.decode(dossier_id, raw)
            index.track(state)
            grace = retire_after(state, self.policy)
            retiring.set(dossier_id, None if grace is None else now + grace)
            for fact in state.facts:
                if fact.type != OVERDUE_TYPE:
                    self.watermark = advance_watermark(self.watermark, fact.time)
            if count % 5000 == 0:
                await asyncio.sleep(0)  # stay responsive (heartbeats, /healthz)
        self.index, self.retiring = index, retiring
        STATES_LIVE.labels("metrics").set(len(self.states))
        REBUILD_SECONDS.set(time.perf_counter() - started)
        log.info(
            "metrics_restored",
            partitions=len(assigned),
            dossiers=len(states),
            seconds=round(time.perf_counter() - started, 3),
        )

    def _forget_folded(self) -> None:
        for partition, raw in self.states.last_reserved().items():  # each partition's last fold
            try:
                fold = decode_fold(partition, raw)
            except InvalidFold as exc:
                log.warning("metrics_fold_unreadable", partition=partition, reason=str(exc))
                continue
            if self.metrics.overdue_clock == "watermark":
                self.watermark = advance_watermark(self.watermark, fold.clock)
            for dossier_id, digest in fold.folded.items():
                raw_state = self.states.raw(dossier_id)
                if raw_state is not None and state_digest(raw_state) == digest:
                    self.states.delete(dossier_id)

    # --- overdue ---------------------------------------------------------------------------

    def clock(self) -> datetime | None:
        """The wall clock live, or the latest event time seen when replaying old data."""
        if self.metrics.overdue_clock == "watermark":
            return self.watermark
        return datetime.now(UTC)

    async def emit_overdue(self) -> None:
        """One `dossier.overdue` for every open dossier whose due date passed; those not
        acknowledged go back to the index for the next round."""
        clock = self.clock()
        if clock is None:
            return
        announce = []
        for dossier_id in self.index.pop_due(clock):
            raw = self.states.raw(dossier_id)
            if raw is None:
                continue
            state = self.states.decode(dossier_id, raw)  # not cached: read once, not hot
            if is_overdue_unannounced(state, clock):
                announce.append(state)
        for start in range(0, len(announce), OVERDUE_PER_SEND):
            chunk = announce[start : start + OVERDUE_PER_SEND]
            try:
                await self.publish([parse_event(overdue_event(state, clock)) for state in chunk])
            except Exception:
                for state in announce[start:]:  # tried again on the next round
                    self.index.track(state)
                raise
            OVERDUE_EMITTED.inc(len(chunk))
        if announce:
            log.info("overdue_emitted", dossiers=len(announce), clock=clock.isoformat())
