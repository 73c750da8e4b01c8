"""The one shape of a motcua service: `Service`, built by `create_service`, run by `run_service`.

A service is one process: a faust worker (lifecycle, timers and crontabs) that serves the
service's FastAPI app on its own loop, reads Kafka through one `BatchConsumer`
(`Service.consume`), keeps its per-dossier state in a `StateTable`, and publishes with one
acks=all producer (`Service.publisher`). A service's `bootstrap.py` builds its dependencies and
registers everything it handles in one place:

    service = create_service("postal", settings)
    states = DossierStates(service.state_table(topics.POSTAL_STATE_CHANGELOG, ...))
    service.consume(TOPICS, worker.on_batch, decode=..., state=states.table)
    service.every(seconds, worker.scan)
    service.webhook("/v1/webhooks/postal/{carrier}", intake.endpoint)
    routes.register(service.api, ...)

A service with nothing to consume and no timers (intake) runs as a plain uvicorn app.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Awaitable, Callable, Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import faust
from aiokafka.errors import KafkaError
from fastapi import FastAPI, Response, Security
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Gauge, generate_latest
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response as StarletteResponse
from starlette.routing import Match

from services.common import scrape, topics, tracing
from services.common.auth import OPERATOR_BEARER
from services.common.consumer import INFRASTRUCTURE_ERRORS, BatchConsumer, Decoder, Restore
from services.common.dead_letters import RetrySchedule
from services.common.events import CloudEvent
from services.common.kafka import BrokerUnavailable, DurablePublisher, ensure_topics
from services.common.logging import get_logger
from services.common.problems import PROBLEM, problem
from services.common.settings import Settings
from services.common.state import StateTable
from services.common.tz import VIETNAM_TZ
from services.common.webhooks import (
    PROBLEM_SCHEMA,
    WebhookIntake,
    unavailable_response,
    webhook_operations,
)

log = get_logger("motcua.service")

S = TypeVar("S")
# How long a daily job waits for its member to be assigned and restored before it gives up.
DAILY_WAIT_SECONDS = 600.0
ReadyCheck = Callable[[], Awaitable[bool]]
# Readiness as Prometheus sees it: evaluated at each scrape (what `/readyz` would answer), so an
# alert needs no probe of its own; a check that does not answer in time counts as not ready.
READY = Gauge("motcua_ready", "1 when the service is ready (as /readyz), 0 when not")
READY_AT_SCRAPE_SECONDS = 2.0
Endpoint = Callable[[Request], Awaitable[StarletteResponse]]


@dataclass
class Service:
    """A named faust app, its FastAPI app, its producer and (at most) one batch consumer."""

    name: str
    settings: Settings
    app: faust.App
    api: FastAPI
    publisher: DurablePublisher
    retry: RetrySchedule = field(default_factory=RetrySchedule)
    consumer: BatchConsumer[Any] | None = None
    _ready_checks: list[ReadyCheck] = field(default_factory=list)
    _timers: int = 0
    # OpenAPI path items of the routes FastAPI does not document itself (the webhooks)
    _documented: dict[str, dict[str, Any]] = field(default_factory=dict)

    # --- registering what the service handles ----------------------------------------------

    def consume(
        self,
        topic_names: Sequence[str],
        handler: Callable[[Sequence[Any]], Awaitable[None]],
        *,
        decode: Decoder[Any] | None = None,
        types: frozenset[str] | None = None,
        state: StateTable[Any] | None = None,
        after_restore: Restore | None = None,
        on_idle: Callable[[], Awaitable[None]] | None = None,
        held: Callable[[], Collection[str]] | None = None,
        max_records: int = 2000,
        poll_seconds: float = 0.2,
        group_id: str | None = None,
    ) -> BatchConsumer[Any]:
        """Read `topic_names` in batches with `handler` (see `consumer.BatchConsumer`); the
        state table is restored on every assignment and written before every commit."""
        if self.consumer is not None:
            raise RuntimeError(f"{self.name} already consumes {self.consumer.topic_names}")
        consumer: BatchConsumer[Any] = BatchConsumer(
            self.name,
            self.settings.kafka_bootstrap,
            topic_names,
            handler,
            decode=decode,
            types=types,
            state=state,
            after_restore=after_restore,
            on_idle=on_idle,
            held=held,
            retry=self.retry,
            max_records=max_records,
            poll_seconds=poll_seconds,
            group_id=group_id,
            publisher=self.publisher,
            session_timeout_seconds=self.settings.consumer_session_timeout_seconds,
            members_dir=data_dir(self.settings, self.name),
        )
        if consumer.group_id == self.app.conf.id:
            # faust's own consumer would join the same group with its own assignor protocol,
            # which a broker refuses to mix: the app keeps its timers and HTTP only.
            self.app.producer_only = True
        self.app.task(consumer.run)
        self.consumer = consumer

        async def partitions_assigned_and_restored() -> bool:
            return consumer.ready

        self.add_ready_check(partitions_assigned_and_restored)
        return consumer

    def state_table(
        self,
        topic_name: str,
        *,
        encode: Callable[[S], bytes],
        decode: Callable[[str, bytes], S],
        cache_size: int = 0,
        on_reserved: Callable[[int, str, bytes], None] | None = None,
    ) -> StateTable[S]:
        """The service's per-dossier state on its compacted changelog `topic_name`, written with
        the service's producer and co-partitioned with its inputs (pass it to `consume`)."""
        return StateTable.on_changelog(
            self.settings,
            self.publisher,
            topic_name,
            encode=encode,
            decode=decode,
            cache_size=cache_size,
            on_reserved=on_reserved,
        )

    def every(self, seconds: float, job: Callable[[], Awaitable[None]]) -> None:
        """Run `job` every `seconds` once the consumer (if any) is ready; a failure is logged
        and the next round tries again."""
        name = getattr(job, "__name__", "job")

        async def timer() -> None:
            if self.consumer is not None and not self.consumer.ready:
                return  # state being restored: the next round looks
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis or the broker away for a moment
                log.warning(
                    "timer_failed",
                    service=self.name,
                    job=name,
                    error_type=type(exc).__name__,
                    error=str(exc)[:300],
                )

        self._timers += 1
        timer.__name__ = timer.__qualname__ = f"{self.name}_{name}_{self._timers}"
        self.app.timer(seconds, name=f"{self.name}.{name}")(timer)

    def daily(self, cron: str, job: Callable[[], Awaitable[None]]) -> None:
        """Run `job` on the crontab `cron` (Vietnam time) on one member of the group: the one
        holding partition 0 of its first topic (`BatchConsumer.leads`). A member still restoring
        or rebalancing at that moment waits for it (up to `DAILY_WAIT_SECONDS`) before it decides,
        so a rebalance at the wrong minute does not skip the day."""
        name = getattr(job, "__name__", "job")

        async def cronjob() -> None:
            consumer = self.consumer
            if consumer is not None:
                waited = 0.0
                while not consumer.ready and waited < DAILY_WAIT_SECONDS:
                    await asyncio.sleep(5.0)
                    waited += 5.0
                if not consumer.leads:
                    if not consumer.ready:
                        log.warning("daily_job_skipped", service=self.name, job=name)
                    return
            try:
                await job()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "daily_job_failed",
                    service=self.name,
                    job=name,
                    error_type=type(exc).__name__,
                    error=str(exc)[:300],
                )

        cronjob.__name__ = cronjob.__qualname__ = f"{self.name}_{name}_daily"
        self.app.crontab(cron, timezone=VIETNAM_TZ)(cronjob)

    def webhook(self, path: str, endpoint: Endpoint, *, methods: Sequence[str] = ("POST",)) -> None:
        """A partner's webhook (`webhooks.WebhookIntake.endpoint`), as a plain Starlette route:
        it reads the raw body itself, and FastAPI's parameter solving was a tenth of its cost.
        The route is in the OpenAPI document all the same, described by its door
        (`webhooks.webhook_operations`: the endpoint is a `WebhookIntake`'s bound `endpoint`)."""
        self.api.add_route(path, endpoint, methods=list(methods))
        door = getattr(endpoint, "__self__", None)
        if isinstance(door, WebhookIntake):
            self._documented[path] = webhook_operations(door, methods)
        else:  # not through the door: documented by its path and methods only
            self._documented[path] = {
                m.lower(): {
                    "summary": f"webhook {path}",
                    "responses": {"200": {"description": "OK"}},
                }
                for m in methods
            }

    def add_ready_check(self, check: ReadyCheck) -> None:
        self._ready_checks.append(check)

    # --- producing -------------------------------------------------------------------------

    async def publish(self, events: Sequence[CloudEvent[Any]]) -> None:
        """Send events to their topics keyed by dossier id; return once the broker acked all."""
        if events:
            traced = tracing.current_attributes()  # the event being handled, when it records
            await self.publisher.publish(
                [(e.topic, e.key, tracing.event_json(e, traced)) for e in events]
            )

    # --- health ----------------------------------------------------------------------------

    async def ready(self) -> tuple[bool, str]:
        """Ready once the worker runs and every ready check (the consumer's first) passes."""
        if self.needs_worker:
            app = self.app
            if not app.producer or not getattr(app.producer, "_producer", None):
                return False, "starting"
        for check in self._ready_checks:
            if not await check():
                return False, f"{getattr(check, '__name__', 'check')} failed"
        return True, "ready"

    @property
    def needs_worker(self) -> bool:
        """A consumer or a timer needs the faust worker; an HTTP-only service does not."""
        return self.consumer is not None or self._timers > 0


def allow_every_method(api: FastAPI) -> None:
    """A 405 lists in `Allow` every method of every route on the path: two routes on one path
    (a list's GET and a request's POST, a subscription's PUT, GET and DELETE) are two routes,
    and the router's own 405 names only the first one's methods."""

    async def method_not_allowed(request: Request, exc: Exception) -> StarletteResponse:
        allowed: set[str] = set()
        for route in api.router.routes:
            match, _ = route.matches(request.scope)
            if match is not Match.NONE:
                allowed |= set(getattr(route, "methods", None) or ())
        return JSONResponse(
            {"detail": "Method Not Allowed"},
            status_code=405,
            headers={"Allow": ", ".join(sorted(allowed))},
        )

    api.add_exception_handler(405, method_not_allowed)


def data_dir(settings: Settings, name: str) -> Path:
    """Where a process of service `name` keeps files across its restarts (`MOTCUA_DATA_DIR`)."""
    return Path(settings.data_dir or f"/tmp/motcua-{name}-data")


def create_service(
    name: str,
    settings: Settings,
    *,
    title: str | None = None,
    description: str = "",
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
    publish_timeout_seconds: float = 10.0,
) -> Service:
    """Build the faust app, the FastAPI app and the producer of one service (`lifespan` runs
    around an HTTP-only service's app, see `run_service`; a publication not acknowledged within
    `publish_timeout_seconds` raises `BrokerUnavailable`)."""
    app = faust.App(
        f"motcua-{name}",
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        datadir=str(data_dir(settings, name)),
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        producer_acks=-1,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=settings.consumer_session_timeout_seconds,
        broker_heartbeat_interval=settings.consumer_session_timeout_seconds * 0.3,
        web_enabled=True,  # serve_asgi replaces the aiohttp server; no second port is bound
    )
    traced = tracing.setup(name)
    api = FastAPI(
        title=title or f"motcua {name}",
        version="1.0",
        description=description,
        lifespan=lifespan,
        telemetry=tracing.FASTAPI_TELEMETRY_OFF,  # the requests' spans: `tracing.instrument`
    )
    if traced:
        tracing.instrument(api)
    publisher = DurablePublisher(settings.kafka_bootstrap, timeout=publish_timeout_seconds)
    service = Service(name=name, settings=settings, app=app, api=api, publisher=publisher)
    add_operational_routes(api, service.ready, scrape_token=settings.metrics_scrape_token)
    answer_unavailable_dependencies(api)
    allow_every_method(api)
    complete_openapi(api, service._documented)

    @app.on_before_shutdown.connect
    async def close_publisher(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await publisher.close()

    return service


async def always_ready() -> tuple[bool, str]:
    """The readiness of a process with no dependency to wait for (a partner sandbox)."""
    return True, "ready"


# How long a client waits before it retries a request refused because a dependency is away.
UNAVAILABLE_RETRY_AFTER_SECONDS = 2


def answer_unavailable_dependencies(api: FastAPI) -> None:
    """Whatever route meets Redis or the broker away (`INFRASTRUCTURE_ERRORS`) answers 503
    `application/problem+json` with `Retry-After`, never a 500: the client retries later."""

    async def unavailable(request: Request, exc: Exception) -> StarletteResponse:
        if isinstance(exc, RedisError):
            what = "Redis"
        elif isinstance(exc, (BrokerUnavailable, KafkaError)):
            what = "the broker"
        else:
            what = "a dependency"
        log.warning(
            "dependency_unavailable",
            path=request.url.path,
            error_type=type(exc).__name__,
            error=str(exc)[:200],
        )
        return problem(
            503,
            "Service Unavailable",
            f"{what} is unreachable; retry later",
            retry_after=UNAVAILABLE_RETRY_AFTER_SECONDS,
        )

    for kind in INFRASTRUCTURE_ERRORS:
        api.add_exception_handler(kind, unavailable)


UNAVAILABLE_RESPONSE = unavailable_response(
    "a dependency (Redis, the broker) is away: nothing was done; retry after Retry-After"
)
OPERATOR_SCHEME = OPERATOR_BEARER.scheme_name
OPERATOR_RESPONSES: dict[str, Any] = {
    "401": {
        "description": "no, malformed, expired or foreign bearer token (`WWW-Authenticate`)",
        "content": {PROBLEM: {"schema": PROBLEM_SCHEMA}},
    },
    "403": {
        "description": "a valid token without the role this needs",
        "content": {PROBLEM: {"schema": PROBLEM_SCHEMA}},
    },
}


def complete_openapi(api: FastAPI, documented: dict[str, dict[str, Any]]) -> None:
    """`api.openapi()` documents every route and every status it can answer, in one place:
    the routes FastAPI does not see (`documented`: the webhooks, added when registered), a 503
    `application/problem+json` with `Retry-After` on every operation
    (`answer_unavailable_dependencies` applies to all; a route's own 503 keeps its
    description), and 401/403 on every operation that asks for an operator's bearer token (the
    operators' routes; a portal-key route documents its own 401)."""
    generate = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is not None:
            return api.openapi_schema
        schema = generate()
        paths = schema.setdefault("paths", {})
        for path, item in documented.items():
            paths.setdefault(path, {}).update(item)
        for item in paths.values():
            for operation in item.values():
                responses = operation.setdefault("responses", {})
                unavailable = responses.setdefault("503", UNAVAILABLE_RESPONSE)
                if "content" not in unavailable:  # a route's own 503 is such a problem too
                    responses["503"] = {**UNAVAILABLE_RESPONSE, **unavailable}
                if any(OPERATOR_SCHEME in req for req in operation.get("security", [])):
                    for status, response in OPERATOR_RESPONSES.items():
                        responses.setdefault(status, response)
        api.openapi_schema = schema
        return schema

    api.openapi = openapi  # type: ignore[method-assign]


def add_operational_routes(
    api: FastAPI, ready: Callable[[], Awaitable[tuple[bool, str]]], *, scrape_token: str = ""
) -> None:
    """`/healthz`, `/readyz` and `/metrics`, the same for every service (and documented so);
    with a `scrape_token` (MOTCUA_METRICS_SCRAPE_TOKEN), `/metrics` answers only the scrapes
    that send it (`services.common.scrape`)."""
    status = {"type": "object", "properties": {"status": {"type": "string"}}}
    readiness = {
        "type": "object",
        "properties": {"status": {"enum": ["ready", "not ready"]}, "reason": {"type": "string"}},
        "required": ["status", "reason"],
    }

    @api.get(
        "/healthz",
        tags=["operations"],
        summary="Liveness: the process answers",
        responses={200: {"content": {"application/json": {"schema": status}}}},
    )
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get(
        "/readyz",
        tags=["operations"],
        summary="Readiness: the worker runs and every ready check passes",
        response_class=JSONResponse,
        responses={
            200: {
                "description": "ready",
                "content": {"application/json": {"schema": readiness}},
            },
            503: {
                "description": "not ready yet (starting, restoring its state, Redis away)",
                "content": {"application/json": {"schema": readiness}},
            },
        },
    )
    async def readyz() -> JSONResponse:
        ok, reason = await ready()
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "reason": reason},
            status_code=200 if ok else 503,
        )

    metrics_responses: dict[int | str, dict[str, Any]] = {
        200: {
            "description": "the process's metrics",
            "content": {CONTENT_TYPE_LATEST.split(";")[0]: {"schema": {"type": "string"}}},
        }
    }
    if scrape_token:
        metrics_responses[401] = scrape.UNAUTHORIZED_RESPONSE

    @api.get(
        "/metrics",
        tags=["operations"],
        summary="Prometheus metrics (text exposition format)",
        response_class=Response,
        responses=metrics_responses,
        dependencies=[Security(scrape.SCRAPE_BEARER)] if scrape_token else None,
    )
    async def metrics(request: Request) -> Response:
        refusal = scrape.scrape_refusal(request.headers.get("authorization"), scrape_token)
        if refusal is not None:
            return refusal
        try:
            ok, _ = await asyncio.wait_for(ready(), READY_AT_SCRAPE_SECONDS)
        except Exception:  # a check that fails or hangs: not ready
            ok = False
        READY.set(1 if ok else 0)
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


# A worker allocates hundreds of short-lived objects per event and keeps few cycles: collecting
# the youngest generation every 700 allocations (the default) cost a quarter of the metrics
# worker's CPU per event and a fifth of the SMS worker's (docs/benchmarks.md).
GC_THRESHOLDS = (50_000, 20, 100)


def run_service(service: Service, port: int) -> None:
    """Create every declared topic that is missing, then serve the service on `port` of the
    bind host (blocking): inside the faust worker when it consumes or has timers, else as a
    plain uvicorn app."""
    with contextlib.suppress(Exception):  # a broker still starting: the consumer waits for it
        asyncio.run(
            ensure_topics(
                service.settings.kafka_bootstrap,
                topics.declared_topics(service.settings.topic_partitions),
                service.settings.topic_replication,
            )
        )
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()  # what start-up built lives as long as the process: no collection scans it
    host = service.settings.bind_host
    if not service.needs_worker:
        serve_http(service.api, service.settings, port)
        return
    from faust.contrib.asgi import serve_asgi

    serve_asgi(service.app, service.api, host=host, port=port, log_level="warning")
    worker = faust.Worker(
        service.app,
        loglevel=service.settings.log_level.lower(),
        quiet=True,
        redirect_stdouts=False,
        override_logging=False,  # keep the one log format of `configure_logging`
    )
    # faust's terminal spinner sets the root logger to DEBUG so that it can spin on every record:
    # every aiokafka send would then build a log record that the handler throws away.
    worker.spinner = None
    worker.execute_from_commandline()


def serve_http(api: FastAPI, settings: Settings, port: int) -> None:
    """Serve an HTTP-only app (intake, a partner sandbox, the dev issuer) with uvicorn on `port`
    of the bind host (blocking); per-request lines only in the DEBUG log."""
    import uvicorn

    uvicorn.run(
        api,
        host=settings.bind_host,
        port=port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )
