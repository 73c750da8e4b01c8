"""A fake portal receiving the portals service's callbacks (CONTRACT section 9), for dev, demo,
tests and benchmarks.

- `POST /callbacks` (and `/callbacks/{anything}`) receives a delivery: its `X-Motcua-Signature`
  is verified against the secrets it knows (`signing.verify_body`), it is recorded by
  `X-Motcua-Delivery` (every attempt, and whether its signature held), and answered as the
  faults say: `fail_next` (the next N deliveries get `fail_status`), `fail_rate`, `timeout_rate`
  (the answer hangs `hang_seconds`), `latency_ms`, `down` (every delivery gets 503).
  A delivery with a bad or missing signature gets 401.
- `POST /v1/subscribe {"portals_url", "portal_key", "types"?, "path"?}` subscribes this sandbox
  at the portals service (`PUT /v1/subscription` with that key, its URL `/callbacks[/path]` on
  this sandbox) and keeps the secret it answers; `PUT /v1/secrets {"secrets": [...]}` sets them.
- `GET /v1/received` the figures (`attempts`, `unique`, `bad_signatures`, `by_type`) and the
  latest deliveries; `GET /v1/received/{delivery_id}` one delivery's attempts and body;
  `DELETE /v1/received` forgets them. `PUT /v1/faults` sets the faults (`GET` reads them).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import Counter, OrderedDict
from typing import Any

import httpx
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.logging import get_logger
from services.common.service import add_operational_routes, always_ready, serve_http
from services.common.settings import Settings
from services.common.signing import SIGNATURE_HEADER, SignatureRejected, verify_body

log = get_logger("motcua.portal.sandbox")

DELIVERY_HEADER = "X-Motcua-Delivery"
KEPT = 10_000  # deliveries remembered (the oldest forgotten first)
DEFAULT_TYPES = ["payment.*", "postal.*", "sms.*", "dossier.overdue"]


class Faults(BaseModel):
    fail_next: int = Field(default=0, ge=0)
    fail_status: int = Field(default=500, ge=300, le=599)
    fail_rate: float = Field(default=0.0, ge=0, le=1)
    timeout_rate: float = Field(default=0.0, ge=0, le=1)
    hang_seconds: float = Field(default=30.0, ge=0)
    latency_ms: float = Field(default=0.0, ge=0)
    down: bool = False


class FaultsFromEnv(BaseSettings, Faults):
    model_config = SettingsConfigDict(env_prefix="PORTAL_SANDBOX_", env_file=None, extra="ignore")


class Subscribe(BaseModel):
    portals_url: str = Field(min_length=1)
    portal_key: str = Field(min_length=1)
    types: list[str] = Field(default_factory=lambda: list(DEFAULT_TYPES))
    path: str = ""
    public_url: str = ""  # where the portals service reaches this sandbox (default: its own)


class Secrets(BaseModel):
    secrets: list[str]


class Receiver:
    def __init__(self, faults: Faults, port: int) -> None:
        self.faults = faults
        self.port = port
        self.secrets: list[str] = []
        self.deliveries: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.counts: Counter[str] = Counter()
        self.by_type: Counter[str] = Counter()

    def record(self, delivery_id: str, body: bytes, verified: bool, answered: int) -> None:
        self.counts["attempts"] += 1
        entry = self.deliveries.get(delivery_id)
        if entry is None:
            kind = ""
            with contextlib.suppress(Exception):
                kind = str(orjson.loads(body).get("type", ""))
            entry = {"id": delivery_id, "type": kind, "attempts": [], "body": body.decode()}
            self.deliveries[delivery_id] = entry
            if len(self.deliveries) > KEPT:
                self.deliveries.popitem(last=False)
        entry["attempts"].append({"at": time.time(), "verified": verified, "answered": answered})
        if answered < 300 and verified and not entry.get("accepted"):
            entry["accepted"] = True
            self.counts["unique"] += 1
            self.by_type[entry["type"]] += 1

    def answer(self) -> tuple[int, float]:
        """The status to answer and how long to wait first."""
        f = self.faults
        if f.down:
            return 503, 0.0
        if f.fail_next > 0:
            f.fail_next -= 1
            return f.fail_status, 0.0
        wait = f.latency_ms / 1000
        if random.random() < f.timeout_rate:
            return 200, f.hang_seconds
        if random.random() < f.fail_rate:
            return f.fail_status, wait
        return 200, wait


def create_app(receiver: Receiver) -> FastAPI:
    api = FastAPI(title="portal sandbox")
    add_operational_routes(api, always_ready)

    async def receive(request: Request) -> Response:
        body = await request.body()
        delivery_id = request.headers.get(DELIVERY_HEADER, "")
        try:
            verify_body(body, request.headers.get(SIGNATURE_HEADER), receiver.secrets)
            verified = True
        except SignatureRejected as exc:
            verified = False
            reason = exc.reason
        if not verified:
            receiver.counts["bad_signatures"] += 1
            receiver.record(delivery_id, body, False, 401)
            return JSONResponse({"error": reason}, status_code=401)
        status, wait = receiver.answer()
        if wait:
            await asyncio.sleep(wait)
        receiver.record(delivery_id, body, True, status)
        if status >= 300:
            return JSONResponse({"error": "injected failure"}, status_code=status)
        return JSONResponse({"status": "received"})

    api.add_route("/callbacks", receive, methods=["POST"])
    api.add_route("/callbacks/{name:path}", receive, methods=["POST"])

    @api.post("/v1/subscribe")
    async def subscribe(request: Request) -> Response:
        try:
            ask = Subscribe.model_validate_json(await request.body())
        except ValidationError as exc:
            return JSONResponse({"error": str(exc)[:500]}, status_code=422)
        own = ask.public_url.rstrip("/") or f"http://127.0.0.1:{receiver.port}"
        url = f"{own}/callbacks" + (f"/{ask.path.strip('/')}" if ask.path.strip("/") else "")
        async with httpx.AsyncClient(timeout=10.0) as client:
            answer = await client.put(
                f"{ask.portals_url.rstrip('/')}/v1/subscription",
                json={"url": url, "types": ask.types},
                headers={"Authorization": f"Bearer {ask.portal_key}"},
            )
        if answer.status_code != 200:
            return JSONResponse(
                {"error": "the portals service refused", "answer": answer.json()},
                status_code=502,
            )
        receiver.secrets = [answer.json()["secret"], *receiver.secrets][:3]
        return JSONResponse({"url": url, "types": ask.types})

    @api.put("/v1/secrets")
    async def set_secrets(secrets: Secrets) -> dict[str, int]:
        receiver.secrets = list(secrets.secrets)
        return {"secrets": len(receiver.secrets)}

    @api.get("/v1/received")
    async def received(limit: int = 100) -> dict[str, Any]:
        latest = list(receiver.deliveries.values())[-max(0, min(limit, KEPT)) :]
        return {
            "attempts": receiver.counts["attempts"],
            "unique": receiver.counts["unique"],
            "bad_signatures": receiver.counts["bad_signatures"],
            "by_type": dict(receiver.by_type),
            "deliveries": [
                {
                    "id": d["id"],
                    "type": d["type"],
                    "attempts": len(d["attempts"]),
                    "accepted": bool(d.get("accepted")),
                }
                for d in latest
            ],
        }

    @api.get("/v1/received/{delivery_id}")
    async def one(delivery_id: str) -> Response:
        entry = receiver.deliveries.get(delivery_id)
        if entry is None:
            return JSONResponse({"error": "never received"}, status_code=404)
        return JSONResponse(entry)

    @api.delete("/v1/received")
    async def forget() -> dict[str, str]:
        receiver.deliveries.clear()
        receiver.counts.clear()
        receiver.by_type.clear()
        return {"status": "cleared"}

    @api.get("/v1/faults")
    async def get_faults() -> dict[str, Any]:
        return receiver.faults.model_dump()

    @api.put("/v1/faults")
    async def put_faults(faults: Faults) -> dict[str, Any]:
        receiver.faults = faults
        return faults.model_dump()

    return api


def run(settings: Settings) -> None:
    faults = Faults.model_validate(FaultsFromEnv().model_dump())
    receiver = Receiver(faults, settings.portal_sandbox_port)
    log.info("portal_sandbox_starting", port=settings.portal_sandbox_port)
    with contextlib.suppress(KeyboardInterrupt):
        serve_http(create_app(receiver), settings, settings.portal_sandbox_port)
