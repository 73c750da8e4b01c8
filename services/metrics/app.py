"""The metrics service: a batch consumer and FastAPI routes around the pure core. Thin on purpose.

- A plain aiokafka consumer (`services.common.batches`) reads `dossier.events`, `payment.events`,
  `postal.events` and `sms.events` (all keyed by dossier id) in batches; each batch is grouped by
  dossier and folded into the dossier's state (`domain.apply_all`, idempotent by (source, id)),
  and the difference of the contributions goes to the in-memory `ColumnarStore`.
- The states are the truth, kept in a compacted changelog written by this service: one record
  per dossier changed per batch, acknowledged (acks=all) before the batch's offsets are
  committed. On every assignment (start, SIGKILL and restart, rebalance) the states of the
  assigned partitions are read back from the changelog (co-partitioned with the inputs), and
  the store and the overdue index are rebuilt as the sum of their contributions, so a
  redelivered event can never count twice; `/readyz` answers 503 until that is done.
- A timer pops the dossiers whose `due_at` passed (an index by due date, no scan) and publishes one
  `dossier.overdue` each (deterministic id); it comes back on `dossier.events` and marks the state.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka.structs import TopicPartition
from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common import topics
from services.common.batches import BatchConsumer
from services.common.changelog import Changelog, DecodedCache
from services.common.events import CloudEvent, parse_event
from services.common.kafka import DurablePublisher
from services.common.logging import get_logger
from services.common.problems import problem
from services.common.service import Service, create_service, run_service
from services.common.settings import Settings
from services.common.topics import TopicSpec
from services.metrics.codec import decode_state, encode_state
from services.metrics.domain import (
    Event,
    OverdueIndex,
    advance_watermark,
    apply_all,
    contributions,
    is_overdue_unannounced,
    new_state,
    overdue_event,
)
from services.metrics.query import ParamError, parse_by, parse_query
from services.metrics.settings import MetricsSettings
from services.metrics.store import ColumnarStore

log = get_logger("motcua.metrics")

STATIC = Path(__file__).with_name("static")
INPUT_TOPICS = (
    topics.DOSSIER_EVENTS,
    topics.PAYMENT_EVENTS,
    topics.POSTAL_EVENTS,
    topics.SMS_EVENTS,
)
# The province's 2019 targets for the online share, per tier (FACTS.md).
ONLINE_TARGETS = {"province": (0.40, 0.45), "district": (0.30, 0.35), "commune": (0.20, 0.25)}

OVERDUE_EMITTED = Counter("motcua_overdue_emitted_total", "dossier.overdue events published")
REBUILD_SECONDS = Gauge("motcua_metrics_rebuild_seconds", "Duration of the last rebuild")
DOSSIERS_IN_STATE = Gauge("motcua_metrics_dossiers", "Dossiers in the state")


def to_domain(event: CloudEvent[Any]) -> Event:
    """The domain's view of a validated envelope (data keeps parsed datetimes and extras)."""
    data = event.data
    # what `dict(data)` gives, without pydantic's mapping-protocol probe (an AttributeError
    # raised and caught per event)
    values = dict(data.__dict__)
    if data.__pydantic_extra__:
        values.update(data.__pydantic_extra__)
    return Event(event.source, event.id, event.type, event.subject, event.time, values)


def invalid_query(errors: list[ParamError]) -> JSONResponse:
    return problem(
        422,
        "Invalid query parameters",
        "; ".join(f"{e.parameter}: {e.detail}" for e in errors),
        errors=[{"parameter": e.parameter, "detail": e.detail} for e in errors],
    )


class MetricsApp:
    """The wiring: one instance per worker process."""

    def __init__(self, settings: Settings, metrics: MetricsSettings) -> None:
        self.settings = settings
        self.metrics = metrics
        self.service: Service = create_service("metrics", settings, title="motcua metrics")
        publisher = DurablePublisher(settings.kafka_bootstrap)
        self.changelog = Changelog(
            settings.kafka_bootstrap,
            TopicSpec(topics.METRICS_STATE_CHANGELOG, settings.topic_partitions, compacted=True),
            publisher,
            replication=settings.topic_replication,
        )
        self.consumer = BatchConsumer(
            self.service,
            INPUT_TOPICS,
            self.on_batch,
            restore=self.restore,
            max_records=metrics.max_batch,
            poll_seconds=metrics.batch_within_seconds,
            publisher=publisher,
        )
        self.store = ColumnarStore()
        self.index = OverdueIndex()
        self.lock = asyncio.Lock()
        self.stale = True  # the store does not reflect the states yet
        self.watermark: datetime | None = None
        self.first_minute: datetime | None = None
        # dossier id -> its encoded state, as last written to (or restored from) the changelog
        self.raw: dict[str, bytes] = {}
        # dossiers whose state in `raw` the broker has not acknowledged yet
        self.unsaved: set[str] = set()
        # the decoded states of `raw`, emptied on every restore
        self.states = DecodedCache(decode_state, metrics.state_cache_size)

    @property
    def dossiers(self) -> int:
        return len(self.raw)

    # --- consuming -------------------------------------------------------------------------

    async def on_batch(self, events: Sequence[CloudEvent[Any]]) -> None:
        """Fold a batch into the states, then write each changed state once (acks=all)."""
        async with self.lock:  # the consumer restores (and rebuilds) before the first batch
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
                raw = self.raw.get(dossier_id)
                before = new_state(dossier_id) if raw is None else self.states.get(dossier_id, raw)
                after, deltas = apply_all(before, batch)
                if after is not before:  # else every event was applied already: a redelivery
                    folded.append((dossier_id, after, deltas))
            for dossier_id, after, deltas in folded:
                encoded = encode_state(after)
                self.raw[dossier_id] = encoded
                self.unsaved.add(dossier_id)
                self.states.remember(dossier_id, encoded, after)
                self.store.apply(deltas)
                self.index.track(after)
            unsaved = {key: self.raw[key] for key in self.unsaved}
        await self.changelog.write({key.encode(): value for key, value in unsaved.items()})
        for key, value in unsaved.items():
            if self.raw.get(key) is value:  # not changed again meanwhile
                self.unsaved.discard(key)

    async def restore(self, assigned: frozenset[TopicPartition]) -> None:
        """The states of the assigned partitions from the changelog; then the store and index."""
        records = await self.changelog.read({tp.partition for tp in assigned})
        async with self.lock:
            self.raw = {key.decode(): value for key, value in records.items()}
            self.unsaved.clear()
            self.states.clear()
            await self._rebuild()

    def _saw(self, moment: datetime) -> None:
        self.watermark = advance_watermark(self.watermark, moment)
        if self.first_minute is None or moment < self.first_minute:
            self.first_minute = moment

    async def _rebuild(self) -> None:
        """The store and the index from the states: the sum of their contributions."""
        started = time.perf_counter()
        self.stale = False
        store, index = ColumnarStore(), OverdueIndex()
        self.watermark = self.first_minute = None
        for count, (dossier_id, raw) in enumerate(list(self.raw.items()), start=1):
            state = decode_state(dossier_id, raw)
            store.apply(contributions(state))
            index.track(state)
            for fact in state.facts:
                if fact.type != "dossier.overdue":
                    self._saw(fact.time)
            if count % 5000 == 0:
                await asyncio.sleep(0)  # stay responsive (heartbeats, /healthz)
        store.flush()
        self.store, self.index = store, index
        REBUILD_SECONDS.set(time.perf_counter() - started)
        log.info(
            "metrics_rebuilt",
            dossiers=len(self.raw),
            seconds=round(time.perf_counter() - started, 3),
        )

    # --- overdue ---------------------------------------------------------------------------

    def clock(self) -> datetime | None:
        if self.metrics.overdue_clock == "watermark":
            return self.watermark
        return datetime.now(UTC)

    async def on_overdue_timer(self) -> None:
        clock = self.clock()
        if clock is None or self.stale or not self.consumer.ready:
            return
        try:
            await self._emit_overdue(clock)
        except Exception as exc:  # the broker away for a moment: the next tick retries
            log.warning("overdue_failed", error_type=type(exc).__name__, error=str(exc)[:200])

    async def _emit_overdue(self, clock: datetime) -> None:
        due = self.index.pop_due(clock)
        for position, dossier_id in enumerate(due):
            raw = self.raw.get(dossier_id)
            if raw is None:
                continue
            state = decode_state(dossier_id, raw)
            if not is_overdue_unannounced(state, clock):
                continue
            try:
                event = parse_event(overdue_event(state, clock))
                await self.service.publish(event, wait=False)
            except Exception:
                for rest in due[position:]:  # try those again on the next tick
                    self._retrack(rest)
                raise
            OVERDUE_EMITTED.inc()
        if due:
            await self.service.app.producer.flush()
            log.info("overdue_emitted", dossiers=len(due), clock=clock.isoformat())

    def _retrack(self, dossier_id: str) -> None:
        raw = self.raw.get(dossier_id)
        if raw is not None:
            self.index.track(decode_state(dossier_id, raw))

    # --- HTTP ------------------------------------------------------------------------------

    def summary(self, request: Request) -> JSONResponse:
        query, errors = parse_query(dict(request.query_params), datetime.now(UTC))
        if query is None:
            return invalid_query(errors)
        body = self.store.summary(
            query.start, query.end, query.agency_code, query.tier, query.sector
        )
        return JSONResponse(body)

    def breakdown(self, request: Request) -> JSONResponse:
        params = dict(request.query_params)
        by, by_errors = parse_by(params.pop("by", None))
        query, errors = parse_query(params, datetime.now(UTC))
        if query is None or by is None:
            return invalid_query([*by_errors, *errors])
        groups = self.store.breakdown(
            by, query.start, query.end, query.agency_code, query.tier, query.sector
        )
        return JSONResponse(
            {
                "from": query.start.isoformat(),
                "to": query.end.isoformat(),
                "by": by,
                "groups": [{by: name, "dossiers": block} for name, block in groups.items()],
            }
        )

    def info(self) -> dict[str, Any]:
        """What the dashboard needs besides the figures: the data's span, targets, refresh."""
        return {
            "first_event_time": self.first_minute.isoformat() if self.first_minute else None,
            "watermark": self.watermark.isoformat() if self.watermark else None,
            "now": datetime.now(UTC).isoformat(),
            "overdue_clock": self.metrics.overdue_clock,
            "online_targets": {tier: list(band) for tier, band in ONLINE_TARGETS.items()},
            "refresh_seconds": self.metrics.dashboard_refresh_seconds,
            "dossiers_in_state": self.dossiers,
        }

    # --- wiring ----------------------------------------------------------------------------

    def wire(self) -> None:
        service = self.service
        self.consumer.attach()
        service.app.timer(self.metrics.overdue_interval_seconds)(self.on_overdue_timer)

        async def aggregates_rebuilt() -> bool:
            return not self.stale

        service.add_ready_check(aggregates_rebuilt)
        api = service.api

        @api.get("/v1/metrics/summary")
        async def summary(request: Request) -> JSONResponse:
            return self.summary(request)

        @api.get("/v1/metrics/breakdown")
        async def breakdown(request: Request) -> JSONResponse:
            return self.breakdown(request)

        @api.get("/v1/metrics/info")
        async def info() -> dict[str, Any]:
            return self.info()

        @api.get("/", include_in_schema=False)
        async def dashboard() -> FileResponse:
            return FileResponse(STATIC / "index.html", media_type="text/html")

        api.mount("/static", StaticFiles(directory=STATIC), name="static")
        REGISTRY.register(StoreCollector(self))


class StoreCollector(Collector):
    """Prometheus figures read from the store, so they agree with the API (and survive restarts:
    they are rebuilt from the states like the store, never counted twice)."""

    def __init__(self, app: MetricsApp) -> None:
        self.app = app
        self._cached: list[CounterMetricFamily | GaugeMetricFamily] = []
        self._computed_at = -float("inf")

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """The figures, recomputed at most every `prometheus_cache_seconds` (scrapes are cheap
        while the worker is busy consuming)."""
        now = time.monotonic()
        if now - self._computed_at >= self.app.metrics.prometheus_cache_seconds:
            self._cached = list(self._compute())
            self._computed_at = now
        DOSSIERS_IN_STATE.set(self.app.dossiers)
        yield from self._cached

    def _compute(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        resolved = CounterMetricFamily(
            "motcua_dossiers_resolved",
            "Dossiers resolved, by tier, sector and class (early, on_time, late)",
            labels=["tier", "sector", "class"],
        )
        received = CounterMetricFamily(
            "motcua_dossiers_received", "Dossiers received", labels=["tier", "sector"]
        )
        open_ = GaugeMetricFamily(
            "motcua_dossiers_in_progress", "Dossiers received and not closed, now", labels=["tier"]
        )
        overdue = GaugeMetricFamily(
            "motcua_dossiers_overdue_open",
            "Open dossiers past their due date, now",
            labels=["tier"],
        )
        totals = self.app.store.totals_by(("tier", "sector"))
        for (tier, sector), counts in sorted(totals.items()):
            received.add_metric([tier, sector], counts["received"])
            for name in ("early", "on_time", "late"):
                resolved.add_metric([tier, sector, name], counts[name])
        now = datetime.now(UTC)
        for tier in sorted({tier for tier, _ in totals}):
            block = self.app.store.summary(now, now, tier=tier)["dossiers"]
            open_.add_metric([tier], block["in_progress"])
            overdue.add_metric([tier], block["overdue_open"])
        yield from (resolved, received, open_, overdue)


def build(settings: Settings, metrics: MetricsSettings | None = None) -> MetricsApp:
    app = MetricsApp(settings, metrics or MetricsSettings())
    app.wire()
    return app


def run(settings: Settings) -> None:
    app = build(settings)
    log.info("metrics_starting", port=settings.metrics_port, clock=app.metrics.overdue_clock)
    run_service(app.service, settings.metrics_port)
