"""A fake SMS gateway speaking the provider protocol of `services.sms.partner`, for dev, demo,
tests and benchmarks.

It serves `/v1/messages` (one message) and `/v1/messages/batch` (many, each with its own key;
injected errors then hit single messages of the batch, a timeout the whole call). It
deduplicates on `Idempotency-Key` like a real gateway, lists the latest messages it accepted
(`GET /v1/messages`, at most `LATEST_KEPT`), counts what it did since the start (`GET /v1/stats`),
and sends signed delivery reports (CONTRACT section 6) to
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
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import aiohttp
import httpx
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
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

# How many of the latest accepted messages `GET /v1/messages` lists.
LATEST_KEPT = 100_000


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
    ) -> None:
        self.provider = provider
        self.callback_url = callback_url
        self.secret = secret
        self.faults = faults
        self.retention = retention
        self.clock = clock
        self.by_key: dict[str, dict[str, Any]] = {}  # messages kept, by idempotency key
        self.reporting: dict[str, int] = {}  # key → delivery reports not sent yet
        self.retiring = DueIndex()  # keys with nothing left to send, by when they are forgotten
        self.accepted: deque[dict[str, Any]] = deque(maxlen=latest_kept)
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
        self._reports: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        self._client: httpx.AsyncClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._client = http_client(timeout=5.0, connections=16)
        self._tasks = [asyncio.create_task(self._report_worker()) for _ in range(8)]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._client is not None:
            await self._client.aclose()

    def changed(self, key: str) -> None:
        """Something happened to the message: with no report left to send, it is forgotten
        `retention` after this moment."""
        due = None if key in self.reporting else self.retention.due(self.clock())
        self.retiring.set(key, due)

    def sweep(self) -> None:
        """Forget the messages due (only those: no scan of what is kept)."""
        for key in self.retention.forget(self.retiring, self.clock()):
            if key not in self.reporting and self.by_key.pop(key, None) is not None:
                self.counts["forgotten"] += 1

    def _reported(self, key: str, reports: int) -> None:
        left = self.reporting.get(key, 0) + reports
        if left > 0:
            self.reporting[key] = left
        else:
            self.reporting.pop(key, None)
            if key in self.by_key:
                self.changed(key)

    def accept(self, key: str, message: Message) -> tuple[dict[str, Any], bool]:
        self.sweep()
        found = self.by_key.get(key)
        if found is not None:
            self.counts["replays"] += 1
            if key not in self.reporting:
                self.changed(key)
            return found, True
        record = {
            "message_id": uuid.uuid4().hex,
            "idempotency_key": key,
            "reference": message.reference,
            "dossier_id": message.metadata.get("dossier_id"),
            "template": message.metadata.get("template"),
            "to_suffix": message.to[-2:],
            "chars": len(message.text),
            "accepted_at": time.time(),
        }
        self.by_key[key] = record
        self.accepted.append(record)
        self.counts["accepted"] += 1
        if self.faults.reports:
            self._reported(key, 1)  # the reports to come, one until they are drawn
            asyncio.get_running_loop().call_later(
                self.faults.report_delay_ms / 1000, self._queue_reports, key, record
            )
        else:
            self.changed(key)
        return record, False

    def _queue_reports(self, key: str, record: dict[str, Any]) -> None:
        faults = self.faults
        final = "UNDELIV" if random.random() < faults.undeliverable_rate else "DELIVRD"
        first = self._report(record, final)
        bodies = [first]
        if random.random() < faults.duplicate_report_rate:
            bodies.append(first)  # the same event id again
        if random.random() < faults.out_of_order_rate:
            bodies.append(self._report(record, "ENROUTE"))  # older news, arriving late
        for body in bodies:
            self._reports.put_nowait((key, body))
        self._reported(key, len(bodies) - 1)

    def _report(self, record: dict[str, Any], status: str) -> bytes:
        return dumps_kept(  # queued until a worker sends it
            {
                "event_id": uuid.uuid4().hex,
                "message_id": record["message_id"],
                "reference": record["reference"],
                "dossier_id": record["dossier_id"],
                "status": status,
                "occurred_at": datetime.now(UTC).isoformat(),
            }
        )

    async def _report_worker(self) -> None:
        assert self._client is not None
        while True:
            key, body = await self._reports.get()
            try:
                await self._send_report(body)
            finally:
                self._reported(key, -1)

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
        record, replayed = gateway.accept(key, message)
        if random.random() < faults.timeout_rate:
            gateway.counts["timeouts"] += 1
            await asyncio.sleep(faults.hang_seconds)  # accepted, but the answer comes too late
        return JSONResponse(
            {"message_id": record["message_id"], "status": "accepted", "replayed": replayed},
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
            record, replayed = gateway.accept(key, message)
            results.append(
                {
                    "idempotency_key": key,
                    "status": "accepted",
                    "message_id": record["message_id"],
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
        return Response(
            orjson.dumps({"provider": gateway.provider, "accepted": list(gateway.accepted)}),
            media_type="application/json",
        )

    @api.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        gateway.sweep()
        # `accepted` and the others count since the start (or the last DELETE /v1/messages);
        # `kept`: the idempotency keys remembered now
        return {"provider": gateway.provider, **gateway.counts, "kept": len(gateway.by_key)}

    @api.get("/v1/faults")
    async def get_faults() -> Faults:
        return gateway.faults

    @api.put("/v1/faults")
    async def put_faults(faults: Faults) -> Faults:
        gateway.faults = faults
        return faults

    @api.delete("/v1/messages")
    async def reset() -> dict[str, str]:
        gateway.by_key.clear()
        gateway.reporting.clear()
        gateway.retiring.clear()
        gateway.accepted.clear()
        for name in gateway.counts:
            gateway.counts[name] = 0
        return {"status": "cleared"}

    return api


def run(provider: str, port: int, settings: Settings) -> None:
    faults = Faults.model_validate(FaultsFromEnv().model_dump())
    callback = f"{settings.sms_public_url.rstrip('/')}/v1/webhooks/sms/{provider}"
    gateway = Gateway(provider, callback, settings.sms_secrets[0], faults, Retention.of(settings))
    log.info("sms_sandbox_starting", provider=provider, port=port, faults=faults.model_dump())
    with contextlib.suppress(KeyboardInterrupt):
        serve_http(create_app(gateway), settings, port)


def run_primary(settings: Settings) -> None:
    run("primary", settings.sms_primary_sandbox_port, settings)


def run_secondary(settings: Settings) -> None:
    run("secondary", settings.sms_secondary_sandbox_port, settings)
