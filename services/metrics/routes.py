"""The metrics API (CONTRACT section 5), the dashboard and the Prometheus figures, all read from
this process's figures (`figures.Figures`: every partition, whichever this process holds).

The API needs an operator's bearer token with the role `viewer` or above (CONTRACT section 8,
checked by `OperatorAuth`); a token scoped to agencies counts only their dossiers. The dashboard
page and its files are open: the page signs the browser in (`services.metrics.sign_in`) before it
asks the API for any figure."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from services.common.auth import OperatorAuth
from services.common.operators import Operator, Role
from services.common.problems import PROBLEM, invalid_query
from services.common.webhooks import PROBLEM_SCHEMA
from services.metrics.catalogue import Catalogue, load_catalogue
from services.metrics.domain import dossiers_block, satisfaction_block
from services.metrics.figures import FiguresFollower
from services.metrics.query import (
    BY,
    MAX_POINTS,
    STEPS,
    TIERS,
    WINDOWS,
    buckets,
    parse_by,
    parse_query,
    parse_step,
)
from services.metrics.settings import MetricsSettings

STATIC = Path(__file__).with_name("static")

# What the gauges mean, the same for every range (the OpenAPI document says it to API users,
# the dashboard's page to operators).
SATISFACTION_MEANING = (
    " `satisfaction` counts the dossiers whose survey answer (`survey.answered`; the latest, when "
    "it was changed) lies in the range: `answers`, `satisfied` (a score of 4 or 5 of 5) and "
    "`rate` = satisfied / answers (null without answers). A changed answer moves the dossier's "
    "one vote to the time of the new answer."
)
GAUGES_MEANING = (
    "`in_progress` and `overdue_open` are counts *as of `to`* (event time), whatever `from` is: "
    "`in_progress` counts dossiers received before `to` and not resolved, withdrawn or rejected "
    "before it; `overdue_open` counts those of them whose due date had passed at `to` while "
    "their clock ran. The clock stops while the applicant owes documents "
    "(`dossier.supplement_requested`) and runs again when they come "
    "(`dossier.supplement_received`), to its `new_due_at` or else to the due date moved by the "
    "working days it stood still. Every other count is of the events whose time lies in "
    "[`from`, `to`). `online_rate_eligible` is the share filed online among resolved dossiers of "
    "procedures offered online (`online_level` 3 or 4), what the per-tier targets compare with."
)

DOSSIERS_IN_STATE = Gauge("motcua_metrics_dossiers", "Dossiers in the state")

# The query parameters `parse_query` reads (CONTRACT section 5), for the OpenAPI document; what
# JSON Schema cannot say (`window` or `from`/`to`, not both; `from` not after `to`) is a 422.
RANGE_PARAMETERS: list[dict[str, Any]] = [
    {"name": "window", "in": "query", "schema": {"enum": list(WINDOWS)}},
    {"name": "from", "in": "query", "schema": {"type": "string", "format": "date-time"}},
    {"name": "to", "in": "query", "schema": {"type": "string", "format": "date-time"}},
    {"name": "agency_code", "in": "query", "schema": {"type": "string", "minLength": 1}},
    {"name": "tier", "in": "query", "schema": {"enum": sorted(TIERS)}},
    {"name": "sector", "in": "query", "schema": {"type": "string", "minLength": 1}},
]
STEP_PARAMETER: dict[str, Any] = {
    "name": "step",
    "in": "query",
    "required": True,
    "schema": {"enum": list(STEPS)},
}
BY_PARAMETER: dict[str, Any] = {
    "name": "by",
    "in": "query",
    "required": True,
    "schema": {"enum": list(BY)},
}
INVALID_QUERY: dict[int | str, dict[str, Any]] = {
    422: {
        "description": "a query parameter is invalid (each one named in `errors`)",
        "content": {PROBLEM: {"schema": PROBLEM_SCHEMA}},
    }
}


def described(operator: Operator) -> dict[str, Any]:
    """Who is signed in, as the dashboard shows it."""
    return {
        "sub": operator.sub,
        "roles": sorted(role.value for role in operator.roles),
        "role": operator.highest_role.value if operator.highest_role else None,
        "agencies": None if operator.scope is None else sorted(operator.scope),
    }


def register(
    api: FastAPI,
    follower: FiguresFollower,
    metrics: MetricsSettings,
    auth: OperatorAuth,
    catalogue: Catalogue | None = None,
) -> None:
    """`/v1/metrics/summary`, `/v1/metrics/breakdown`, `/v1/metrics/series`, `/v1/metrics/info`
    (role `viewer`), the dashboard at `/` (also `/auth/callback`, where the issuer sends the
    browser back) and its files under `/static`."""
    viewer = Depends(auth.requires(Role.VIEWER))
    names = catalogue or load_catalogue(*metrics.catalogue_paths())

    @api.get(
        "/v1/metrics/summary",
        openapi_extra={"parameters": RANGE_PARAMETERS},
        responses=INVALID_QUERY,
        description=GAUGES_MEANING + SATISFACTION_MEANING,
    )
    async def summary(request: Request, operator: Operator = viewer) -> JSONResponse:
        query, errors = parse_query(dict(request.query_params), datetime.now(UTC))
        if query is None:
            return invalid_query(errors)
        body = follower.figures.store.summary(
            query.start,
            query.end,
            query.agency_code,
            query.tier,
            query.sector,
            agencies=operator.scope,
        )
        return JSONResponse(body)

    @api.get(
        "/v1/metrics/breakdown",
        openapi_extra={"parameters": [BY_PARAMETER, *RANGE_PARAMETERS]},
        responses=INVALID_QUERY,
        description="The summary's `dossiers` block per agency, tier or sector (groups of agencies "
        "carry `agency_name` from the agency catalogue, null for a code it does not list; groups "
        "of tiers carry `online_target`, the band [low, high] of the year of `to` that "
        "`online_rate_eligible` is compared with, null when none is set; groups of sectors "
        "carry `sector_name` {`vi`, `en`}, null for a sector the catalogue does not list), "
        "with the group's `satisfaction` as in the summary. " + GAUGES_MEANING,
    )
    async def breakdown(request: Request, operator: Operator = viewer) -> JSONResponse:
        params = dict(request.query_params)
        by, by_errors = parse_by(params.pop("by", None))
        query, errors = parse_query(params, datetime.now(UTC))
        if query is None or by is None:
            return invalid_query([*by_errors, *errors])
        groups = follower.figures.store.breakdown_counters(
            by,
            query.start,
            query.end,
            query.agency_code,
            query.tier,
            query.sector,
            agencies=operator.scope,
        )
        return JSONResponse(
            {
                "from": query.start.isoformat(),
                "to": query.end.isoformat(),
                "by": by,
                "groups": [
                    {
                        **group(by, name, dossiers_block(counts), query.end.year),
                        "satisfaction": satisfaction_block(counts),
                    }
                    for name, counts in groups.items()
                ],
            }
        )

    def group(by: str, name: str, block: dict[str, Any], year: int) -> dict[str, Any]:
        if by == "agency_code":
            return {by: name, "agency_name": names.agency_name(name), "dossiers": block}
        if by == "tier":  # the tier's target for `online_rate_eligible`, of the year of `to`
            band = names.targets_for(year).get(name)
            return {by: name, "online_target": list(band) if band else None, "dossiers": block}
        sector = names.sectors.get(name)
        named = {"vi": sector.vi, "en": sector.en} if sector else None
        return {by: name, "sector_name": named, "dossiers": block}

    @api.get(
        "/v1/metrics/series",
        openapi_extra={"parameters": [STEP_PARAMETER, *RANGE_PARAMETERS]},
        responses=INVALID_QUERY,
        description="The summary's `dossiers` block for each step of the range (`hour`, `day` "
        f"or `week` from `from`; at most {MAX_POINTS} points). " + GAUGES_MEANING,
    )
    async def series(request: Request, operator: Operator = viewer) -> JSONResponse:
        params = dict(request.query_params)
        step_raw = params.pop("step", None)
        query, errors = parse_query(params, datetime.now(UTC))
        if query is None:
            return invalid_query(errors)
        step, step_errors = parse_step(step_raw, query.start, query.end)
        if step is None:
            return invalid_query(step_errors)
        cut = buckets(query.start, query.end, step)
        counts = follower.figures.store.series(
            [query.start, *(end for _, end in cut)],
            query.agency_code,
            query.tier,
            query.sector,
            agencies=operator.scope,
        )
        points = [
            {"from": start.isoformat(), "to": end.isoformat(), "dossiers": dossiers_block(c)}
            for (start, end), c in zip(cut, counts, strict=True)
        ]
        return JSONResponse(
            {
                "from": query.start.isoformat(),
                "to": query.end.isoformat(),
                "step": step,
                "points": points,
            }
        )

    @api.get("/v1/metrics/info")
    async def info(operator: Operator = viewer) -> dict[str, Any]:
        """What the dashboard needs besides the figures: the data's span, targets (the online
        targets per tier, `satisfaction_target`), refresh, and who is signed in."""
        figures = follower.figures
        return {
            "operator": described(operator),
            "first_event_time": figures.first_minute.isoformat() if figures.first_minute else None,
            "watermark": figures.watermark.isoformat() if figures.watermark else None,
            "now": datetime.now(UTC).isoformat(),
            "overdue_clock": metrics.overdue_clock,
            **names.described(datetime.now(UTC).date()),
            "gauges": GAUGES_MEANING,
            "refresh_seconds": metrics.dashboard_refresh_seconds,
            "satisfaction_target": metrics.satisfaction_target,
            # the province's whole count: for operators who see every agency only
            "dossiers_in_state": figures.dossiers if operator.scope is None else None,
        }

    page: dict[int | str, dict[str, Any]] = {
        200: {
            "description": "the dashboard's page (it signs in and reads the API itself)",
            "content": {"text/html": {"schema": {"type": "string"}}},
        }
    }

    @api.get("/", tags=["dashboard"], response_class=FileResponse, responses=page)
    @api.get("/auth/callback", tags=["dashboard"], response_class=FileResponse, responses=page)
    async def dashboard() -> FileResponse:
        return FileResponse(
            STATIC / "index.html", media_type="text/html", headers={"Cache-Control": "no-store"}
        )

    api.mount("/static", StaticFiles(directory=STATIC), name="static")


class StoreCollector(Collector):
    """Prometheus figures read from the store, so they agree with the API (and survive restarts:
    they are rebuilt from the states like the store, never counted twice)."""

    def __init__(self, follower: FiguresFollower, cache_seconds: float) -> None:
        self.follower = follower
        self.cache_seconds = cache_seconds
        self._cached: list[CounterMetricFamily | GaugeMetricFamily] = []
        self._computed_at = -float("inf")

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """The figures, recomputed at most every `cache_seconds` (scrapes are cheap while the
        worker is busy consuming)."""
        now = time.monotonic()
        if now - self._computed_at >= self.cache_seconds:
            self._cached = list(self._compute())
            self._computed_at = now
        DOSSIERS_IN_STATE.set(self.follower.figures.dossiers)
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
        store = self.follower.figures.store
        totals = store.totals_by(("tier", "sector"))
        for (tier, sector), counts in sorted(totals.items()):
            received.add_metric([tier, sector], counts["received"])
            for name in ("early", "on_time", "late"):
                resolved.add_metric([tier, sector, name], counts[name])
        now = datetime.now(UTC)
        for tier in sorted({tier for tier, _ in totals}):
            block = store.summary(now, now, tier=tier)["dossiers"]
            open_.add_metric([tier], block["in_progress"])
            overdue.add_metric([tier], block["overdue_open"])
        yield from (resolved, received, open_, overdue)
