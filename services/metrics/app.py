"""The metrics service: faust agents and FastAPI routes around the pure core. Thin on purpose.

- Agents on `dossier.events`, `payment.events`, `postal.events`, `sms.events` (all keyed by dossier
  id, co-partitioned with the `metrics-dossiers` table) take batches, group them by dossier, fold
  them into the stored state (`domain.apply_all`, idempotent by (source, id)) and add the
  difference of the contributions to the in-memory `ColumnarStore`.
- The table is the truth; the store is derived from it. After every recovery (start, SIGKILL and
  restart, rebalance) the store and the overdue index are rebuilt as the sum of the contributions
  of the recovered states, so a redelivered event can never count twice; `/readyz` answers 503
  until that rebuild is done.
- A timer pops the dossiers whose `due_at` passed (an index by due date, no scan) and publishes one
  `dossier.overdue` each (deterministic id); it comes back on `dossier.events` and marks the state.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import REGISTRY, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common import topics
from services.common.events import CloudEvent, parse_event
from services.common.logging import get_logger
from services.common.problems import problem
from services.common.service import Service, create_service, run_service
from services.common.settings import Settings
from services.metrics.codec import decode_state, encode_state
from services.metrics.domain import (
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
DOSSIERS_IN_STATE = Gauge("motcua_metrics_dossiers", "Dossiers in the state table")


def to_domain(event: CloudEvent[Any]) -> Event:
    """The domain's view of a validated envelope (data keeps parsed datetimes and extras)."""
    return Event(event.source, event.id, event.type, event.subject, event.time, dict(event.data))


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
        # use_partitioner: the changelog partition is the key's, as on the co-partitioned input
        # topics, so batches (which mix partitions) write each record where recovery expects it.
        self.table = self.service.app.Table(
            "metrics-dossiers",
            partitions=settings.topic_partitions,
            key_type=bytes,
            value_type=bytes,
            use_partitioner=True,
        )
        self.store = ColumnarStore()
        self.index = OverdueIndex()
        self.lock = asyncio.Lock()
        self.stale = True  # the store does not reflect the table yet
        self.watermark: datetime | None = None
        self.first_minute: datetime | None = None
        self.dossiers = 0
        # dossier id -> (the table's bytes, their decoded state): a cache, used only while the
        # table still holds exactly those bytes; emptied on every recovery.
        self.states: OrderedDict[str, tuple[bytes, DossierState]] = OrderedDict()

    # --- consuming -------------------------------------------------------------------------

    async def on_batch(self, events: Sequence[CloudEvent[Any]]) -> None:
        async with self.lock:
            if self.stale:
                await self._rebuild()
            by_dossier: dict[str, list[Event]] = {}
            for envelope in events:
                event = to_domain(envelope)
                by_dossier.setdefault(event.subject, []).append(event)
                self._saw(event.time)
            for dossier_id, batch in by_dossier.items():
                key = dossier_id.encode()
                raw = self.table.get(key)
                before = new_state(dossier_id) if raw is None else self._decode(dossier_id, raw)
                after, deltas = apply_all(before, batch)
                if after is before:
                    continue  # every event already applied: a redelivery
                if raw is None:
                    self.dossiers += 1
                encoded = encode_state(after)
                self.table[key] = encoded
                self._remember(dossier_id, encoded, after)
                self.store.apply(deltas)
                self.index.track(after)

    def _decode(self, dossier_id: str, raw: bytes) -> DossierState:
        cached = self.states.get(dossier_id)
        if cached is not None and (cached[0] is raw or cached[0] == raw):
            self.states.move_to_end(dossier_id)
            return cached[1]
        state = decode_state(dossier_id, bytes(raw))
        self._remember(dossier_id, bytes(raw), state)
        return state

    def _remember(self, dossier_id: str, raw: bytes, state: DossierState) -> None:
        size = self.metrics.state_cache_size
        if size <= 0:
            return
        self.states[dossier_id] = (raw, state)
        self.states.move_to_end(dossier_id)
        while len(self.states) > size:
            self.states.popitem(last=False)

    def _saw(self, moment: datetime) -> None:
        self.watermark = advance_watermark(self.watermark, moment)
        if self.first_minute is None or moment < self.first_minute:
            self.first_minute = moment

    def _states(self) -> Iterator[DossierState]:
        for key, raw in list(self.table.items()):
            if isinstance(raw, bytes | bytearray):
                yield decode_state(bytes(key).decode(), bytes(raw))

    async def _rebuild(self) -> None:
        """The store and the index from the table: the sum of the contributions of the states."""
        started = time.perf_counter()
        self.stale = False
        self.states.clear()
        store, index, count = ColumnarStore(), OverdueIndex(), 0
        self.watermark = self.first_minute = None
        for count, state in enumerate(self._states(), start=1):
            store.apply(contributions(state))
            index.track(state)
            for fact in state.facts:
                if fact.type != "dossier.overdue":
                    self._saw(fact.time)
            if count % 5000 == 0:
                await asyncio.sleep(0)  # stay responsive (heartbeats, /healthz)
        store.flush()
        self.store, self.index, self.dossiers = store, index, count
        REBUILD_SECONDS.set(time.perf_counter() - started)
        log.info("metrics_rebuilt", dossiers=count, seconds=round(time.perf_counter() - started, 3))

    async def on_recover(self) -> None:
        self.stale = True
        self.states.clear()

    def recovered(self) -> bool:
        app = self.service.app
        recovery = app.tables.recovery  # type: ignore[attr-defined]
        return bool(
            app.producer
            and not app.rebalancing
            and not app.in_recovery
            and recovery.completed.is_set()
        )

    async def on_rebuild_timer(self) -> None:
        if self.stale and self.recovered():
            async with self.lock:
                if self.stale:
                    await self._rebuild()

    # --- overdue ---------------------------------------------------------------------------

    def clock(self) -> datetime | None:
        if self.metrics.overdue_clock == "watermark":
            return self.watermark
        return datetime.now(UTC)

    async def on_overdue_timer(self) -> None:
        clock = self.clock()
        if clock is None or self.stale or not self.recovered():
            return
        try:
            await self._emit_overdue(clock)
        except Exception as exc:  # the broker away for a moment: the next tick retries
            log.warning("overdue_failed", error_type=type(exc).__name__, error=str(exc)[:200])

    async def _emit_overdue(self, clock: datetime) -> None:
        due = self.index.pop_due(clock)
        for position, dossier_id in enumerate(due):
            raw = self.table.get(dossier_id.encode())
            if raw is None:
                continue
            state = decode_state(dossier_id, bytes(raw))
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
        raw = self.table.get(dossier_id.encode())
        if raw is not None:
            self.index.track(decode_state(dossier_id, bytes(raw)))

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
        for topic in INPUT_TOPICS:
            service.consume_batches(
                topic,
                self.on_batch,
                max_batch=self.metrics.max_batch,
                within=self.metrics.batch_within_seconds,
            )
        self.table.on_recover(self.on_recover)
        service.app.timer(0.2)(self.on_rebuild_timer)
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
    they are rebuilt from the table like the store, never counted twice)."""

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
