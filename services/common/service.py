"""The one faust app factory every consuming service uses.

A service is one faust worker that also serves its FastAPI app on the worker's own loop, so
agents and HTTP routes share one producer. Each consumer topic is read as raw bytes and decoded
here: a message that does not decode or validate, or that its handler keeps failing on, goes to
the topic's `.dlq` with the CONTRACT section 3 headers instead of crashing the agent.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import faust
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from services.common import topics
from services.common.events import CloudEvent, InvalidEvent, decode_event
from services.common.logging import get_logger
from services.common.settings import Settings

Handler = Callable[[CloudEvent[Any]], Awaitable[None]]
BatchHandler = Callable[[Sequence[CloudEvent[Any]]], Awaitable[None]]
RawHandler = Callable[[bytes | None, bytes], Awaitable[None]]


class PoisonMessage(Exception):
    """Raised by a handler for a message that can never succeed: dead-lettered at once."""


log = get_logger("motcua.service")

EVENTS_CONSUMED = Counter(
    "motcua_events_consumed_total", "Events handled by a service", ["service", "topic"]
)
DEAD_LETTERED = Counter(
    "motcua_dead_lettered_total",
    "Messages sent to a dead-letter topic",
    ["service", "topic", "error_type"],
)
HANDLER_SECONDS = Histogram(
    "motcua_handler_seconds", "Time to handle one event or batch", ["service", "topic"]
)


@dataclass(frozen=True)
class RetrySchedule:
    """How often a handler is retried on one message before it is dead-lettered."""

    attempts: int = 3
    base_delay: float = 0.2

    def delay(self, attempt: int) -> float:
        return float(self.base_delay * (2 ** (attempt - 1)))


def dead_letter_headers(error: BaseException, attempts: int) -> dict[str, bytes]:
    """The headers of CONTRACT section 3, added to the original bytes of a dead letter."""
    return {
        "error": str(error)[:1000].encode(),
        "error_type": type(error).__name__.encode(),
        "attempts": str(attempts).encode(),
        "failed_at": datetime.now(UTC).isoformat().encode(),
    }


@dataclass
class Service:
    """A named faust app plus its FastAPI app, with health, readiness and Prometheus routes."""

    name: str
    settings: Settings
    app: faust.App
    api: FastAPI
    retry: RetrySchedule = field(default_factory=RetrySchedule)
    _topics: dict[str, faust.TopicT] = field(default_factory=dict)
    _consumes: bool = False
    _ready_checks: list[Callable[[], Awaitable[bool]]] = field(default_factory=list)

    def topic(self, name: str) -> faust.TopicT:
        """A raw-bytes topic handle, declared with the configured partition count."""
        if name not in self._topics:
            self._topics[name] = self.app.topic(
                name,
                key_type=bytes,
                value_type=bytes,
                key_serializer="raw",
                value_serializer="raw",
                partitions=self.settings.topic_partitions,
            )
        return self._topics[name]

    async def publish(self, event: CloudEvent[Any], *, wait: bool = True) -> None:
        """Send an event to its topic keyed by dossier id; with `wait`, until the broker acked."""
        await self.send(event.topic, event.key, event.to_json(), wait=wait)

    async def send(self, topic_name: str, key: bytes, value: bytes, *, wait: bool = True) -> None:
        """Send raw bytes (webhook payloads to an internal topic); with `wait`, until acked."""
        future = await self.topic(topic_name).send(key=key, value=value)
        if wait:
            await future

    def add_ready_check(self, check: Callable[[], Awaitable[bool]]) -> None:
        self._ready_checks.append(check)

    def consume(
        self,
        topic_name: str,
        handler: Handler,
        *,
        types: frozenset[str] | None = None,
        concurrency: int = 1,
    ) -> None:
        """Run `handler` for every valid event on `topic_name`; dead-letter what fails."""
        source = self.topic(topic_name)
        dlq = self.topic(topics.dlq(topic_name))
        self._consumes = True

        async def agent(stream: faust.StreamT[bytes]) -> None:
            async for message in stream.events():
                await self._handle_one(topic_name, dlq, message, handler, types)

        agent.__name__ = f"{self.name}_{topic_name.replace('.', '_')}"
        self.app.agent(source, name=agent.__name__, concurrency=concurrency)(agent)

    def consume_raw(self, topic_name: str, handler: RawHandler, *, concurrency: int = 1) -> None:
        """Run `handler(key, value)` for every message of an internal (non-CloudEvents) topic.

        The handler parses what it needs; raising `PoisonMessage` dead-letters the message at
        once, any other exception after the retries.
        """
        source = self.topic(topic_name)
        dlq = self.topic(topics.dlq(topic_name))
        self._consumes = True

        async def agent(stream: faust.StreamT[bytes]) -> None:
            async for message in stream.events():
                raw = message.value if isinstance(message.value, bytes | bytearray) else b""
                key = bytes(message.key) if isinstance(message.key, bytes | bytearray) else None

                async def give_up(exc: BaseException, attempts: int, m: Any = message) -> None:
                    await self._dead_letter(topic_name, dlq, m, exc, attempts=attempts)

                async def call(k: bytes | None = key, v: bytes = bytes(raw)) -> None:
                    await handler(k, v)

                await self._run_with_retries(topic_name, call, 1, on_give_up=give_up)

        agent.__name__ = f"{self.name}_{topic_name.replace('.', '_')}_raw"
        self.app.agent(source, name=agent.__name__, concurrency=concurrency)(agent)

    def consume_batches(
        self,
        topic_name: str,
        handler: BatchHandler,
        *,
        types: frozenset[str] | None = None,
        max_batch: int = 1000,
        within: float = 0.2,
    ) -> None:
        """Like `consume`, handing the handler up to `max_batch` valid events at a time."""
        source = self.topic(topic_name)
        dlq = self.topic(topics.dlq(topic_name))
        self._consumes = True

        async def agent(stream: faust.StreamT[bytes]) -> None:
            batches = stream.take_events(max_batch, within=within)  # type: ignore[attr-defined]
            async for messages in batches:
                await self._handle_batch(topic_name, dlq, messages, handler, types)

        agent.__name__ = f"{self.name}_{topic_name.replace('.', '_')}_batches"
        self.app.agent(source, name=agent.__name__)(agent)

    async def _handle_batch(
        self,
        topic_name: str,
        dlq: faust.TopicT,
        messages: Sequence[faust.EventT[bytes]],
        handler: BatchHandler,
        types: frozenset[str] | None,
    ) -> None:
        pairs = []
        for message in messages:
            event = await self._decode_or_dead_letter(topic_name, dlq, message, types)
            if event is not None:
                pairs.append((message, event))
        if not pairs:
            return
        batch = [event for _, event in pairs]
        if await self._run_with_retries(topic_name, lambda: handler(batch), len(batch)):
            return
        # The batch failed every attempt: go one event at a time, so a poison event is
        # dead-lettered alone and the rest still count.
        for message, event in pairs:
            await self._handle_decoded(topic_name, dlq, message, event, _single(handler))

    async def _decode_or_dead_letter(
        self,
        topic_name: str,
        dlq: faust.TopicT,
        message: faust.EventT[bytes],
        types: frozenset[str] | None,
    ) -> CloudEvent[Any] | None:
        raw = message.value
        try:
            if not isinstance(raw, bytes | bytearray):
                raise InvalidEvent([])
            event = decode_event(bytes(raw))
        except InvalidEvent as exc:
            await self._dead_letter(topic_name, dlq, message, exc, attempts=1)
            return None
        if types is not None and event.type not in types:
            return None  # a valid event this service has no business with
        return event

    async def _handle_one(
        self,
        topic_name: str,
        dlq: faust.TopicT,
        message: faust.EventT[bytes],
        handler: Handler,
        types: frozenset[str] | None,
    ) -> None:
        event = await self._decode_or_dead_letter(topic_name, dlq, message, types)
        if event is not None:
            await self._handle_decoded(topic_name, dlq, message, event, handler)

    async def _handle_decoded(
        self,
        topic_name: str,
        dlq: faust.TopicT,
        message: faust.EventT[bytes],
        event: CloudEvent[Any],
        handler: Handler,
    ) -> None:
        async def give_up(exc: BaseException, attempts: int) -> None:
            await self._dead_letter(topic_name, dlq, message, exc, attempts=attempts)

        await self._run_with_retries(topic_name, lambda: handler(event), 1, on_give_up=give_up)

    async def _run_with_retries(
        self,
        topic_name: str,
        call: Callable[[], Awaitable[None]],
        count: int,
        *,
        on_give_up: Callable[[BaseException, int], Awaitable[None]] | None = None,
    ) -> bool:
        """True when the call succeeded, or failed and `on_give_up` dealt with it."""
        for attempt in range(1, self.retry.attempts + 1):
            started = time.perf_counter()
            try:
                await call()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "handler_failed",
                    service=self.name,
                    topic=topic_name,
                    attempt=attempt,
                    error_type=type(exc).__name__,
                    error=str(exc)[:300],
                )
                if attempt == self.retry.attempts or isinstance(exc, PoisonMessage):
                    if on_give_up is not None:
                        await on_give_up(exc, attempt)
                        return True
                    return False
                await asyncio.sleep(self.retry.delay(attempt))
            else:
                HANDLER_SECONDS.labels(self.name, topic_name).observe(time.perf_counter() - started)
                EVENTS_CONSUMED.labels(self.name, topic_name).inc(count)
                return True
        return False

    async def _dead_letter(
        self,
        topic_name: str,
        dlq: faust.TopicT,
        message: faust.EventT[bytes],
        error: BaseException,
        *,
        attempts: int,
    ) -> None:
        DEAD_LETTERED.labels(self.name, topic_name, type(error).__name__).inc()
        log.warning(
            "dead_lettered",
            service=self.name,
            topic=topic_name,
            partition=message.message.partition,
            offset=message.message.offset,
            error_type=type(error).__name__,
            error=str(error)[:300],
        )
        raw = message.value if isinstance(message.value, bytes | bytearray) else b""
        future = await dlq.send(
            key=message.key,
            value=bytes(raw),
            headers=dead_letter_headers(error, attempts),
        )
        await future

    async def ready(self) -> tuple[bool, str]:
        """Ready once the worker runs, recovery is done, and (if it consumes) it has partitions.

        A producer-only app (its input read by a `BatchConsumer`) has no faust consumer and no
        tables: its own ready checks say when it is assigned and restored.
        """
        app = self.app
        if not app.producer or not getattr(app.producer, "_producer", None):
            return False, "starting"
        if not app.producer_only:
            if app.rebalancing:
                return False, "rebalancing"
            recovery = app.tables.recovery  # type: ignore[attr-defined]
            if app.in_recovery or not recovery.completed.is_set():
                return False, "recovering tables"
            if self._consumes and not app.consumer.assignment():
                return False, "no partitions assigned"
        for check in self._ready_checks:
            if not await check():
                return False, f"{getattr(check, '__name__', 'check')} failed"
        return True, "ready"


def _single(handler: BatchHandler) -> Handler:
    async def one(event: CloudEvent[Any]) -> None:
        await handler([event])

    return one


def create_service(name: str, settings: Settings, *, title: str | None = None) -> Service:
    """Build the faust app and FastAPI app of one service, wired to each other."""
    app = faust.App(
        f"motcua-{name}",
        broker=f"kafka://{settings.kafka_bootstrap}",
        store=settings.table_store,
        datadir=settings.data_dir or f"/tmp/motcua-{name}-data",
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        producer_acks=-1,
        # Table changelogs and outcome events go out in small bursts; a short linger batches them.
        producer_linger=0.005,
        producer_max_batch_size=512 * 1024,
        consumer_auto_offset_reset="earliest",
        broker_session_timeout=10,
        broker_heartbeat_interval=3,
        web_enabled=True,  # serve_asgi replaces the aiohttp server; no second port is bound
        stream_wait_empty=False,
        table_cleanup_interval=30.0,
    )
    api = FastAPI(title=title or f"motcua {name}", version="1.0")
    service = Service(name=name, settings=settings, app=app, api=api)
    add_operational_routes(api, service.ready)
    return service


def add_operational_routes(api: FastAPI, ready: Callable[[], Awaitable[tuple[bool, str]]]) -> None:
    """`/healthz`, `/readyz` and `/metrics`, the same for every service."""

    @api.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        ok, reason = await ready()
        return JSONResponse(
            {"status": "ready" if ok else "not ready", "reason": reason},
            status_code=200 if ok else 503,
        )

    @api.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


# A worker allocates hundreds of short-lived objects per event and keeps few cycles: collecting
# the youngest generation every 700 allocations (the default) cost a quarter of the metrics
# worker's CPU per event and a fifth of the SMS worker's (docs/benchmarks.md).
GC_THRESHOLDS = (50_000, 20, 100)


def run_service(service: Service, port: int) -> None:
    """Start the worker (blocking) with the FastAPI app served on `port` of the bind host."""
    gc.set_threshold(*GC_THRESHOLDS)
    gc.freeze()  # what start-up built lives as long as the process: no collection scans it
    from faust.contrib.asgi import serve_asgi

    serve_asgi(
        service.app, service.api, host=service.settings.bind_host, port=port, log_level="warning"
    )
    worker = faust.Worker(
        service.app, loglevel=service.settings.log_level.lower(), quiet=True, redirect_stdouts=False
    )
    # faust's terminal spinner sets the root logger to DEBUG so that it can spin on every record:
    # every aiokafka send would then build a log record that the handler throws away.
    worker.spinner = None
    worker.execute_from_commandline()
