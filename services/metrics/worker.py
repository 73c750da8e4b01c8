"""The metrics worker: folds batches of events into per-dossier states, keeps the store and the
overdue index as the sum of those states, and announces dossiers whose due date passed.

- `on_batch` groups a batch by dossier, folds each group into the dossier's state
  (`domain.apply_all`, idempotent by (source, id)), puts the new state in the `StateTable` and
  adds the difference of the contributions to the `ColumnarStore`. The batch consumer writes the
  changed states to the changelog (acks=all) before it commits the batch's offsets.
- `after_restore` runs once the states of newly assigned partitions are read back from the
  changelog: the store, the overdue index and the watermark are rebuilt from the states alone,
  so a redelivered event never counts twice.
- `emit_overdue` (a timer) pops the dossiers whose `due_at` passed (an index by due date, no
  scan) and publishes one `dossier.overdue` each (deterministic id), several per send; the event
  comes back on `dossier.events` and marks the state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from aiokafka.structs import TopicPartition
from prometheus_client import Counter, Gauge

from services.common.events import CloudEvent, parse_event
from services.common.logging import get_logger
from services.common.state import StateTable
from services.metrics.domain import (
    OVERDUE_TYPE,
    DossierState,
    Event,
    OverdueIndex,
    advance_watermark,
    apply_all,
    contributions,
    is_overdue_unannounced,
    new_state,
    overdue_event,
)
from services.metrics.settings import MetricsSettings
from services.metrics.store import ColumnarStore

log = get_logger("motcua.metrics")

Publish = Callable[[Sequence[CloudEvent[Any]]], Awaitable[None]]

# `dossier.overdue` events handed to the producer per send (each send waits for its acks).
OVERDUE_PER_SEND = 500

OVERDUE_EMITTED = Counter("motcua_overdue_emitted_total", "dossier.overdue events published")
REBUILD_SECONDS = Gauge("motcua_metrics_rebuild_seconds", "Duration of the last rebuild")


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
    """The states (a `StateTable` on the metrics changelog) and what is derived from them."""

    def __init__(
        self, states: StateTable[DossierState], metrics: MetricsSettings, publish: Publish
    ) -> None:
        self.metrics = metrics
        self.publish = publish
        self.states = states
        self.store = ColumnarStore()
        self.index = OverdueIndex()
        self.watermark: datetime | None = None
        self.first_minute: datetime | None = None

    @property
    def dossiers(self) -> int:
        return len(self.states)

    # --- consuming -------------------------------------------------------------------------

    async def on_batch(self, events: Sequence[CloudEvent[Any]]) -> None:
        """Fold a batch into the states, the store and the overdue index."""
        by_dossier: dict[str, list[Event]] = {}
        for envelope in events:
            event = to_domain(envelope)
            by_dossier.setdefault(event.subject, []).append(event)
        if events:
            times = [event.time for event in events]
            self._saw(min(times))
            self._saw(max(times))
        # every fold first: a failing event leaves the states and the store untouched
        folded = []
        for dossier_id, batch in by_dossier.items():
            before = self.states.get(dossier_id) or new_state(dossier_id)
            after, deltas = apply_all(before, batch)
            if after is not before:  # else every event was applied already: a redelivery
                folded.append((dossier_id, after, deltas))
        for dossier_id, after, deltas in folded:
            self.states.put(dossier_id, after)
            self.store.apply(deltas)
            self.index.track(after)

    async def after_restore(self, assigned: frozenset[TopicPartition]) -> None:
        """The store, the overdue index and the watermark from the restored states: the sum of
        their contributions."""
        started = time.perf_counter()
        store, index = ColumnarStore(), OverdueIndex()
        self.watermark = self.first_minute = None
        states = self.states.items_raw()
        for count, (dossier_id, raw) in enumerate(states, start=1):
            state = self.states.decode(dossier_id, raw)
            store.apply(contributions(state))
            index.track(state)
            for fact in state.facts:
                if fact.type != OVERDUE_TYPE:
                    self._saw(fact.time)
            if count % 5000 == 0:
                await asyncio.sleep(0)  # stay responsive (heartbeats, /healthz)
        store.flush()
        self.store, self.index = store, index
        REBUILD_SECONDS.set(time.perf_counter() - started)
        log.info(
            "metrics_rebuilt",
            partitions=len(assigned),
            dossiers=len(states),
            seconds=round(time.perf_counter() - started, 3),
        )

    def _saw(self, moment: datetime) -> None:
        self.watermark = advance_watermark(self.watermark, moment)
        if self.first_minute is None or moment < self.first_minute:
            self.first_minute = moment

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
