"""A fake SMS gateway speaking the provider protocol of `services.sms.partner`, for dev, demo,
tests and benchmarks.

It serves `/v1/messages` (one message) and `/v1/messages/batch` (many, each with its own key;
injected errors then hit single messages of the batch, a timeout the whole call). It
deduplicates on `Idempotency-Key` like a real gateway, records every message it accepted
(`GET /v1/messages`, `GET /v1/stats`), and sends signed delivery reports (CONTRACT section 6) to
`SMS_PUBLIC_URL/v1/webhooks/sms/{provider}`. Faults are set per run, from the environment
(`SMS_SANDBOX_ERROR_RATE`, ...) or with `PUT /v1/faults`: error rate, latency, timeouts (the
message is accepted, then the answer hangs), duplicate, out-of-order and undeliverable reports.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import aiohttp
import httpx
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.logging import get_logger
from services.common.partner import IDEMPOTENCY_HEADER, http_client
from services.common.service import add_operational_routes, always_ready, serve_http
from services.common.settings import Settings
from services.common.signing import SIGNATURE_HEADER, sign_body
from services.sms.partner import BATCH_PATH, MAX_BATCH, MESSAGES_PATH

log = get_logger("motcua.sms.sandbox")


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


class Gateway:
    def __init__(self, provider: str, callback_url: str, secret: str, faults: Faults) -> None:
        self.provider = provider
        self.callback_url = callback_url
        self.secret = secret
        self.faults = faults
        self.by_key: dict[str, dict[str, Any]] = {}
        self.accepted: list[dict[str, Any]] = []
        self.counts = {
            "posts": 0,
            "batches": 0,
            "replays": 0,
            "errors": 0,
            "timeouts": 0,
            "reports": 0,
        }
        self._reports: asyncio.Queue[bytes] = asyncio.Queue()
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

    def accept(self, key: str, message: Message) -> tuple[dict[str, Any], bool]:
        found = self.by_key.get(key)
        if found is not None:
            self.counts["replays"] += 1
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
        if self.faults.reports:
            asyncio.get_running_loop().call_later(
                self.faults.report_delay_ms / 1000, self._queue_reports, record
            )
        return record, False

    def _queue_reports(self, record: dict[str, Any]) -> None:
        faults = self.faults
        final = "UNDELIV" if random.random() < faults.undeliverable_rate else "DELIVRD"
        first = self._report(record, final)
        self._reports.put_nowait(first)
        if random.random() < faults.duplicate_report_rate:
            self._reports.put_nowait(first)  # the same event id again
        if random.random() < faults.out_of_order_rate:
            self._reports.put_nowait(self._report(record, "ENROUTE"))  # older news, arriving late

    def _report(self, record: dict[str, Any], status: str) -> bytes:
        return orjson.dumps(
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
            body = await self._reports.get()
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
                        break
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
        return Response(
            orjson.dumps({"provider": gateway.provider, "accepted": gateway.accepted}),
            media_type="application/json",
        )

    @api.get("/v1/stats")
    async def stats() -> dict[str, Any]:
        return {"provider": gateway.provider, "accepted": len(gateway.accepted), **gateway.counts}

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
        gateway.accepted.clear()
        for name in gateway.counts:
            gateway.counts[name] = 0
        return {"status": "cleared"}

    return api


def run(provider: str, port: int, settings: Settings) -> None:
    faults = Faults.model_validate(FaultsFromEnv().model_dump())
    callback = f"{settings.sms_public_url.rstrip('/')}/v1/webhooks/sms/{provider}"
    gateway = Gateway(provider, callback, settings.sms_secrets[0], faults)
    log.info("sms_sandbox_starting", provider=provider, port=port, faults=faults.model_dump())
    with contextlib.suppress(KeyboardInterrupt):
        serve_http(create_app(gateway), settings, port)


def run_primary(settings: Settings) -> None:
    run("primary", settings.sms_primary_sandbox_port, settings)


def run_secondary(settings: Settings) -> None:
    run("secondary", settings.sms_secondary_sandbox_port, settings)
