"""A fake SMS gateway speaking the provider protocol of `services.sms.partner`, for dev, demo,
tests and benchmarks.

It serves `/v1/messages` (one message) and `/v1/messages/batch` (many, each with its own key;
injected errors then hit single messages of the batch, a timeout the whole call). It
deduplicates on `Idempotency-Key` like a real gateway, lists the latest messages it accepted
(`GET /v1/messages`, at most `SMS_SANDBOX_LATEST_KEPT`), counts what it did since the start
(`GET /v1/stats`), and sends signed delivery reports (CONTRACT section 6) to
`SMS_PUBLIC_URL/v1/webhooks/sms/{provider}`. Faults are set per run, from the environment
(`SMS_SANDBOX_ERROR_RATE`, ...) or with `PUT /v1/faults`: error rate, latency, timeouts (the
message is accepted, then the answer hangs), duplicate, out-of-order and undeliverable reports.

Memory follows the messages in flight: a message's idempotency key is kept until its delivery
reports are all sent (answered or given up) and `SANDBOX_RETAIN_SECONDS` passed since its last
change (accepted, a report sent, a repeated request), or earlier beyond `SANDBOX_RETAIN_FINISHED`
finished messages, the longest finished first, never before `SANDBOX_RETAIN_MIN_SECONDS`
(`sandboxes.retention`); a repeated request while the key is kept is a replay of the same
message, after it a new message, as at a gateway that no longer knows the key. The counts are
running integers and stay.

A message is a `Kept` (slots, its id an integer, strings shared where they repeat). Its reports
wait as the message itself in `waiting`, in the order accepted, until `report_delay_ms` passed
and a sender is free: only then are they drawn (final status, duplicate, stale ENROUTE) and their
bodies built, so the bodies held are those of at most `SMS_SANDBOX_REPORT_CONNECTIONS` reports
queued and as many being sent, however far the service answering them falls behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import httpx
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.due import DueIndex
from services.common.kept_json import dumps_kept
from services.common.logging import get_logger
from services.common.partner import IDEMPOTENCY_HEADER, http_client
from services.common.service import add_operational_routes, always_ready, serve_http
from services.common.settings import Settings
from services.common.signing import SIGNATURE_HEADER, sign_body
from services.sandboxes.retention import Retention
from services.sms.partner import BATCH_PATH, MAX_BATCH, MESSAGES_PATH

log = get_logger("motcua.sms.sandbox")

# How many of the latest accepted messages `GET /v1/messages` lists, unless set.
LATEST_KEPT = 25_000
# Messages per piece of the `GET /v1/messages` answer.
LISTED_CHUNK = 1000
# Delivery reports posted at once, unless set; as many more wait drawn, with their bodies.
SENDERS = 8


class Faults(BaseModel):
    error_rate: float = Field(default=0.0, ge=0, le=1)  # 503, nothing accepted
    timeout_rate: float = Field(default=0.0, ge=0, le=1)  # accepted, then no answer in time
    hang_seconds: float = Field(default=30.0, ge=0)
    latency_ms: float = Field(default=0.0, ge=0)
    reports: bool = True
    report_delay_ms: float = Field(default=100.0, ge=0)
    undeliverable_rate: float = Field(default=0.0, ge=0, le=1)
    duplicate_report_rate: float = Field(default=0.0, ge=0, le=1)
    out_of_order_rate: float = Field(default=0.0, ge=0, le=1)  # a stale ENROUTE after the final


class FaultsFromEnv(BaseSettings, Faults):
    model_config = SettingsConfigDict(env_prefix="SMS_SANDBOX_", env_file=None, extra="ignore")


class GatewaySettings(BaseSettings):
    """What a run sets besides the faults (`SMS_SANDBOX_LATEST_KEPT`,
    `SMS_SANDBOX_REPORT_CONNECTIONS`)."""

    model_config = SettingsConfigDict(env_prefix="SMS_SANDBOX_", env_file=None, extra="ignore")

    latest_kept: int = Field(default=LATEST_KEPT, ge=0)
    report_connections: int = Field(default=SENDERS, ge=1)  # delivery reports posted at once


class Message(BaseModel):
    to: str = Field(min_length=4)
    text: str = Field(min_length=1)
    sender: str = Field(min_length=1, max_length=11)
    reference: str = Field(min_length=1)
    metadata: dict[str, str] = Field(default_factory=dict)


class BatchMessage(Message):
    idempotency_key: str = Field(min_length=1, max_length=200)


class Batch(BaseModel):
    messages: list[BatchMessage] = Field(min_length=1, max_length=MAX_BATCH)


def utc_now() -> datetime:
    return datetime.now(UTC)


def _shared(text: str | None) -> str | None:
    """One string object per distinct value (templates, number suffixes: few values)."""
    return None if text is None else sys.intern(text)


class Kept:
    """A message the gateway accepted: what `GET /v1/messages` lists and its reports are made
    of, and how many of its reports are still to send (`reports_left`; one while they are not
    drawn yet) and, while they wait, when they are due (`due`, on the event loop's clock)."""

    __slots__ = (
        "accepted_at",
        "chars",
        "dossier_id",
        "due",
        "id",
        "key",
        "reference",
        "reports_left",
        "template",
        "to_suffix",
    )

    def __init__(self, key: str, message: Message) -> None:
        self.id = uuid.uuid4().int
        self.key = key
        self.reference = key if message.reference == key else message.reference
        self.dossier_id = message.metadata.get("dossier_id")
        self.template = _shared(message.metadata.get("template"))
        self.to_suffix = _shared(message.to[-2:])
        self.chars = len(message.text)
        self.accepted_at = time.time()
        self.reports_left = 0
        self.due = 0.0

    @property
    def message_id(self) -> str:
        return f"{self.id:032x}"

    def listed(self) -> dict[str, Any]:
        """The message as `GET /v1/messages` lists it."""
        return {
            "message_id": self.message_id,
            "idempotency_key": self.key,
            "reference": self.reference,
            "dossier_id": self.dossier_id,
            "template": self.template,
            "to_suffix": self.to_suffix,
            "chars": self.chars,
            "accepted_at": self.accepted_at,
        }


async def listed_json(provider: str, messages: list[Kept]) -> AsyncIterator[bytes]:
    """`{"provider": ..., "accepted": [...]}` in pieces of `LISTED_CHUNK` messages, so a long
    list is never whole in memory as dicts and JSON at once."""
    yield b'{"provider":' + orjson.dumps(provider) + b',"accepted":['
    for start in range(0, len(messages), LISTED_CHUNK):
        piece = orjson.dumps([m.listed() for m in messages[start : start + LISTED_CHUNK]])
        yield (b"," if start else b"") + piece[1:-1]
    yield b"]}"


def report_body(message: Kept, status: str, occurred_at: datetime) -> bytes:
    """A delivery report (CONTRACT section 6) under a new event id."""
    return dumps_kept(
        {
            "event_id": uuid.uuid4().hex,
            "message_id": message.message_id,
            "reference": message.reference,
            "dossier_id": message.dossier_id,
            "status": status,
            "occurred_at": occurred_at.isoformat(),
        }
    )


def draw_reports(message: Kept, faults: Faults, rand: Callable[[], float]) -> list[bytes]:
    """The reports of a message: its final status, maybe the same report again (the same event
    id), maybe a stale ENROUTE after it."""
    now = datetime.now(UTC)
    final = "UNDELIV" if rand() < faults.undeliverable_rate else "DELIVRD"
    first = report_body(message, final, now)
    bodies = [first]
    if rand() < faults.duplicate_report_rate:
        bodies.append(first)
    if rand() < faults.out_of_order_rate:
        bodies.append(report_body(message, "ENROUTE", now))  # older news, arriving late
    return bodies


class Gateway:
    """The fake gateway's messages and counts. `retention` and `clock` decide when a
    message whose reports are done is forgotten (`sweep`, run on every message accepted and
    every read of `/v1/messages` or `/v1/stats`)."""

    def __init__(
        self,
        provider: str,
        callback_url: str,
        secret: str,
        faults: Faults,
        retention: Retention = Retention(),
        clock: Callable[[], datetime] = utc_now,
        latest_kept: int = LATEST_KEPT,
        senders: int = SENDERS,
    ) -> None:
        self.provider = provider
        self.callback_url = callback_url
        self.secret = secret
        self.faults = faults
        self.retention = retention
        self.clock = clock
        self.by_key: dict[str, Kept] = {}  # messages kept, by idempotency key
        self.reporting = 0  # messages with delivery reports still to send
        self.retiring = DueIndex()  # keys with nothing left to send, by when they are forgotten
        self.accepted: deque[Kept] = deque(maxlen=latest_kept)
        self.counts = {
            "accepted": 0,
            "posts": 0,
            "batches": 0,
            "replays": 0,
            "errors": 0,
            "timeouts": 0,
            "reports": 0,
            "forgotten": 0,
        }
        # Messages whose reports are not drawn yet, in the order accepted (so by `due`).
        self.waiting: deque[Kept] = deque()
        self._arrived = asyncio.Event()
        # Drawn reports and their bodies, for the senders: at most SENDERS wait here.
        self.senders = senders
        self._outbox: asyncio.Queue[tuple[Kept, bytes]] = asyncio.Queue(maxsize=senders)
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._client = http_client(timeout=5.0, connections=self.senders)
        self._tasks = [asyncio.create_task(self._draw_due())]
        self._tasks += [asyncio.create_task(self._report_worker()) for _ in range(self.senders)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._client is not None:
            await self._client.aclose()

    def changed(self, message: Kept) -> None:
        """Something happened to the message: with no report left to send, it is forgotten
        `retention` after this moment."""
        due = None if message.reports_left else self.retention.due(self.clock())
        self.retiring.set(message.key, due)

    def sweep(self) -> None:
        """Forget the messages due (only those: no scan of what is kept)."""
        for key in self.retention.forget(self.retiring, self.clock()):
            message = self.by_key.get(key)
            if message is not None and not message.reports_left:
                del self.by_key[key]
                self.counts["forgotten"] += 1

    def _reported(self, message: Kept, reports: int) -> None:
        before = message.reports_left
        message.reports_left += reports
        if before and not message.reports_left:
            self.reporting -= 1
            if self.by_key.get(message.key) is message:
                self.changed(message)
        elif not before and message.reports_left:
            self.reporting += 1

    def accept(self, key: str, message: Message) -> tuple[Kept, bool]:
        self.sweep()
        found = self.by_key.get(key)
        if found is not None:
            self.counts["replays"] += 1
            if not found.reports_left:
                self.changed(found)
            return found, True
        kept = Kept(key, message)
        self.by_key[key] = kept
        self.accepted.append(kept)
        self.counts["accepted"] += 1
        if self.faults.reports:
            self._reported(kept, 1)  # the reports to come, one until they are drawn
            kept.due = asyncio.get_running_loop().time() + self.faults.report_delay_ms / 1000
            if not self.waiting:
                self._arrived.set()
            self.waiting.append(kept)
        else:
            self.changed(kept)
        return kept, False

    async def _draw_due(self) -> None:
        """Draw the reports of the waiting messages as they fall due, oldest first, handing
        them to the senders; while all the senders are busy the rest wait undrawn."""
        loop = asyncio.get_running_loop()
        while True:
            if not self.waiting:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            message = self.waiting[0]
            if (wait := message.due - loop.time()) > 0:
                await asyncio.sleep(wait)
                continue
            self.waiting.popleft()
            bodies = draw_reports(message, self.faults, random.random)
            self._reported(message, len(bodies) - 1)
            for body in bodies:
                await self._outbox.put((message, body))

    async def _report_worker(self) -> None:
        assert self._client is not None
        while True:
            message, body = await self._outbox.get()
            try:
                await self._send_report(body)
            finally:
                self._reported(message, -1)

    async def _send_report(self, body: bytes) -> None:
        assert self._client is not None
        for attempt in range(12):  # the service may be restarting: keep trying for a while
            try:
                response = await self._client.post(
                    self.callback_url,
                    content=body,
                    headers={
                        "content-type": "application/json",
                        SIGNATURE_HEADER: sign_body(body, self.secret),
                    },
                )
                if response.status_code < 500:
                    self.counts["reports"] += 1
                    return
            except (httpx.HTTPError, aiohttp.ClientError, TimeoutError):
                pass  # the service is away: try again below
            await asyncio.sleep(min(5.0, 0.2 * 2**attempt))


def create_app(gateway: Gateway) -> FastAPI:
    api = FastAPI(title=f"SMS gateway sandbox ({gateway.provider})")

    @api.on_event("startup")
    async def startup() -> None:
        gateway.start()

    @api.on_event("shutdown")
    async def shutdown() -> None:
        await gateway.stop()

    add_operational_routes(api, always_ready)

    @api.post(MESSAGES_PATH)
    async def send(request: Request) -> Response:
        gateway.counts["posts"] += 1
        faults = gateway.faults
        key = request.headers.get(IDEMPOTENCY_HEADER, "")
        if not key:
            return JSONResponse({"error": "Idempotency-Key required"}, status_code=400)
        try:
            message = Message.model_validate_json(await request.body())
        except ValidationError as exc:
            return JSONResponse({"error": str(exc)[:500]}, status_code=422)
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000 * (0.5 + random.random()))
        if random.random() < faults.error_rate:
            gateway.counts["errors"] += 1
            return JSONResponse({"error": "injected failure"}, status_code=503)
        kept, replayed = gateway.accept(key, message)
        if random.random() < faults.timeout_rate:
            gateway.counts["timeouts"] += 1
            await asyncio.sleep(faults.hang_seconds)  # accepted, but the answer comes too late
        return JSONResponse(
            {"message_id": kept.message_id, "status": "accepted", "replayed": replayed},
            status_code=202,
        )

    @api.post(BATCH_PATH)
    async def send_batch(request: Request) -> Response:
        gateway.counts["batches"] += 1
        faults = gateway.faults
        try:
            batch = Batch.model_validate_json(await request.body())
        except ValidationError as exc:
            return JSONResponse({"error": str(exc)[:500]}, status_code=422)
        if faults.latency_ms:
            await asyncio.sleep(faults.latency_ms / 1000 * (0.5 + random.random()))
        results: list[dict[str, Any]] = []
        for message in batch.messages:
            key = message.idempotency_key
            if random.random() < faults.error_rate:
                gateway.counts["errors"] += 1
                error = {"status": "failed", "retryable": True, "error": "injected failure"}
                results.append({"idempotency_key": key, **error})
                continue
            kept, replayed = gateway.accept(key, message)
            results.append(
                {
                    "idempotency_key": key,
                    "status": "accepted",
                    "message_id": kept.message_id,
                    "replayed": replayed,
                }
            )
        if random.random() < faults.timeout_rate:
            gateway.counts["timeouts"] += 1
            await asyncio.sleep(faults.hang_seconds)  # accepted, but the answer comes too late
        return Response(orjson.dumps({"results": results}), media_type="application/json")

    @api.get("/v1/messages")
    async def messages() -> Response:
        gateway.sweep()
        listing = listed_json(gateway.provider, list(gateway.accepted))
        return StreamingResponse(listing, media_type="application/json")

    @api.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        gateway.sweep()
        # `accepted` and the others count since the start (or the last DELETE /v1/messages);
        # `kept`: the idempotency keys remembered now; `reporting`: the messages with reports
        # still to send, `waiting` those not drawn yet
        return {
            "provider": gateway.provider,
            **gateway.counts,
            "kept": len(gateway.by_key),
            "reporting": gateway.reporting,
            "waiting": len(gateway.waiting),
        }

    @api.get("/v1/faults")
    async def get_faults() -> Faults:
        return gateway.faults

    @api.put("/v1/faults")
    async def put_faults(faults: Faults) -> Faults:
        gateway.faults = faults
        return faults

    @api.delete("/v1/messages")
    async def reset() -> dict[str, str]:
        # reports already owed still go out (`reporting` counts them until they have)
        gateway.by_key.clear()
        gateway.retiring.clear()
        gateway.accepted.clear()
        for name in gateway.counts:
            gateway.counts[name] = 0
        return {"status": "cleared"}

    return api


def run(provider: str, port: int, settings: Settings) -> None:
    faults = Faults.model_validate(FaultsFromEnv().model_dump())
    callback = f"{settings.sms_public_url.rstrip('/')}/v1/webhooks/sms/{provider}"
    retention = Retention.of(settings)
    run_settings = GatewaySettings()
    gateway = Gateway(
        provider,
        callback,
        settings.sms_secrets[0],
        faults,
        retention,
        latest_kept=run_settings.latest_kept,
        senders=run_settings.report_connections,
    )
    log.info("sms_sandbox_starting", provider=provider, port=port, faults=faults.model_dump())
    with contextlib.suppress(KeyboardInterrupt):
        serve_http(create_app(gateway), settings, port)


def run_primary(settings: Settings) -> None:
    run("primary", settings.sms_primary_sandbox_port, settings)


def run_secondary(settings: Settings) -> None:
    run("secondary", settings.sms_secondary_sandbox_port, settings)
