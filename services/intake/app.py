"""Intake: the front door for portals (CONTRACT section 4).

Authenticate, read and validate the batch, refuse foreign sources, rate-limit, sort out
duplicates, publish to `dossier.events` with acks=all, and only then answer 202.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from pydantic import BaseModel

from services.common import topics
from services.common.coordination import Keys, TokenBucket, connect
from services.common.kafka import BrokerUnavailable, DurablePublisher, ensure_topics
from services.common.logging import get_logger
from services.common.problems import problem as common_problem
from services.common.service import add_operational_routes
from services.common.settings import Portal, Settings, hash_key
from services.intake.domain import (
    BatchInvalid,
    Candidate,
    EventError,
    canonical_json,
    digest_of,
    foreign_sources,
    read_batch,
    triage,
)

log = get_logger("motcua.intake")

REQUESTS = Counter("motcua_intake_requests_total", "Intake requests by status", ["status"])
EVENTS = Counter("motcua_intake_events_total", "Events by outcome", ["source", "outcome"])

PENDING = b"p:"  # marks a claim whose publication is under way


class Accepted(BaseModel):
    accepted: int
    duplicates: int


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    """A problem details response, counted by status."""
    REQUESTS.labels(str(status)).inc()
    return common_problem(status, title, detail, **extra)


def find_portal(portals: Sequence[Portal], authorization: str | None) -> Portal | None:
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    digest = hash_key(key.strip())
    found = None
    for portal in portals:  # look at every portal: timing must not tell which one matched
        if hmac.compare_digest(digest, portal.key_sha256):
            found = portal
    return found


class TooLarge(Exception):
    pass


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class StillPublishing(Exception):
    """Another request is publishing the same events right now."""


# For each key: claim it with `p:<digest>` if free, else report what it holds. Keys and digests
# travel as one newline-joined argument each and the answer as one string: with 500 events a
# request, packing and parsing 1,000 separate arguments cost more than the script itself.
# (Keys of one call may fall in different slots: this needs a single Redis, not a cluster.)
_CLAIM = """
local ttl = ARGV[1]
local digests = {}
for d in string.gmatch(ARGV[3], '[^\\n]+') do digests[#digests + 1] = d end
local out = {}
local i = 0
for key in string.gmatch(ARGV[2], '[^\\n]+') do
  i = i + 1
  local held = redis.call('GET', key)
  if held then
    out[i] = held
  else
    redis.call('SET', key, 'p:' .. digests[i], 'EX', ttl)
    out[i] = ''
  end
end
return table.concat(out, '\\n')
"""
_CONFIRM = """
local ttl = ARGV[1]
local digests = {}
for d in string.gmatch(ARGV[3], '[^\\n]+') do digests[#digests + 1] = d end
local i = 0
for key in string.gmatch(ARGV[2], '[^\\n]+') do
  i = i + 1
  redis.call('SET', key, digests[i], 'EX', ttl)
end
return i
"""


@dataclass
class Claim:
    """What claiming a batch found: ours to publish, duplicates, conflicts, or others' pending."""

    ours: list[Candidate]
    held: dict[str, str]
    pending: bool


class EventLedger:
    """What intake has published: (source, id) → content hash, kept in Redis.

    A claim is written as `p:<hash>` before publishing and turned into `<hash>` after the
    broker acked, so two requests racing with the same event never both publish it, and a
    failed publication leaves nothing behind.
    """

    def __init__(self, client: aioredis.Redis, keys: Keys, ttl_seconds: int, wait: float) -> None:
        self._client = client
        self._keys = keys
        self._ttl = ttl_seconds
        self._wait = wait
        self._claim = client.register_script(_CLAIM)
        self._confirm = client.register_script(_CONFIRM)

    def key(self, source: str, event_id: str) -> str:
        # Hashed: fixed size, and free of the separators the claim script splits on.
        digest = hashlib.sha256(f"{source}\x00{event_id}".encode()).hexdigest()[:32]
        return self._keys("intake", "event", digest)

    async def claim(self, candidates: Sequence[Candidate]) -> Claim:
        if not candidates:
            return Claim([], {}, pending=False)
        answer = await self._claim(
            args=[int(self._wait) + 60, *self._joined(candidates)],
        )
        answers = answer.decode().split("\n")
        ours: list[Candidate] = []
        held: dict[str, str] = {}
        pending = False
        for candidate, value in zip(candidates, answers, strict=True):
            if not value:
                ours.append(candidate)
            elif value.startswith(PENDING.decode()):
                pending = True
            else:
                held[candidate.key] = value
        return Claim(ours, held, pending)

    async def confirm(self, candidates: Sequence[Candidate]) -> None:
        if candidates:
            await self._confirm(args=[self._ttl, *self._joined(candidates)])

    @staticmethod
    def _joined(candidates: Sequence[Candidate]) -> tuple[str, str]:
        return "\n".join(c.key for c in candidates), "\n".join(c.digest for c in candidates)

    async def release(self, candidates: Sequence[Candidate]) -> None:
        if candidates:
            await self._client.delete(*(c.key for c in candidates))


def create_app(settings: Settings) -> FastAPI:
    publisher = DurablePublisher(settings.kafka_bootstrap, timeout=settings.publish_timeout_seconds)
    client = connect(settings)
    keys = Keys(settings.redis_namespace)
    ledger = EventLedger(
        client, keys, settings.dedupe_ttl_seconds, wait=settings.publish_timeout_seconds
    )
    buckets = {
        p.source: TokenBucket(client, keys("intake", "rate"), p.rate_per_second, p.burst)
        for p in settings.portals
    }

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            await ensure_topics(
                settings.kafka_bootstrap,
                [
                    t
                    for t in topics.declared_topics(settings.topic_partitions)
                    if t.name == topics.DOSSIER_EVENTS
                ],
                settings.topic_replication,
            )
        except Exception as exc:  # intake still starts, and answers 503 until the broker is up
            log.warning("topics_not_ensured", error_type=type(exc).__name__)
        yield
        await publisher.close()
        await client.aclose()

    api = FastAPI(
        title="motcua intake",
        version="1.0",
        description="Portals publish dossier events here (CloudEvents 1.0, structured JSON).",
        lifespan=lifespan,
    )

    async def ready() -> tuple[bool, str]:
        try:
            await client.ping()
        except Exception:
            return False, "redis unreachable"
        if not await publisher.connected():
            return False, "kafka unreachable"
        return True, "ready"

    add_operational_routes(api, ready)

    @api.post(
        "/v1/events",
        status_code=202,
        response_model=Accepted,
        responses={
            401: {"description": "missing or wrong portal key"},
            403: {"description": "an event's source is not the key's own"},
            409: {"description": "a known (source, id) with different content"},
            413: {"description": "body over the size limit"},
            422: {"description": "invalid events; `errors` names each by index and pointer"},
            429: {"description": "over the portal's rate; see Retry-After"},
            503: {"description": "broker or Redis unreachable; nothing was accepted"},
        },
    )
    async def post_events(request: Request) -> Any:
        """Publish one envelope or an array of at most 500 to `dossier.events`."""
        portal = find_portal(settings.portals, request.headers.get("authorization"))
        if portal is None:
            return problem(401, "Unauthorized", "a valid portal key is required (Bearer)")
        try:
            body = await read_body(request, settings.max_body_bytes)
        except TooLarge:
            return problem(
                413, "Payload Too Large", f"the body is over {settings.max_body_bytes} bytes"
            )
        try:
            events = read_batch(body)
        except BatchInvalid as exc:
            return problem(422, "Invalid events", exc.detail, errors=_items(exc.errors))
        foreign = foreign_sources(events, portal.source)
        if foreign:
            return problem(403, "Forbidden", "events from another source", errors=_items(foreign))
        try:
            wait = await buckets[portal.source].take(portal.source, cost=len(events))
            if wait > 0:
                return problem(
                    429,
                    "Too Many Requests",
                    f"over the rate of {portal.source}",
                    retry_after=max(1, math.ceil(wait)),
                )
            return await _publish(events)
        except StillPublishing:
            return problem(
                503,
                "Service Unavailable",
                "the same events are being published by another request; retry",
                retry_after=1,
            )
        except BrokerUnavailable:
            log.warning("broker_unavailable", source=portal.source, events=len(events))
            return problem(
                503,
                "Service Unavailable",
                "the broker did not acknowledge; nothing was accepted",
                retry_after=2,
            )
        except (aioredis.RedisError, OSError):
            return problem(
                503,
                "Service Unavailable",
                "Redis is unreachable; nothing was accepted",
                retry_after=2,
            )

    async def _publish(events: Sequence[Any]) -> Any:
        encoded = [canonical_json(e) for e in events]
        candidates = [
            Candidate(i, ledger.key(e.source, e.id), digest_of(raw), e)
            for i, (e, raw) in enumerate(zip(events, encoded, strict=True))
        ]
        within = triage(candidates, {})
        if within.conflicts:
            return problem(
                409,
                "Conflict",
                "an event id appears twice with different content",
                errors=_items(within.conflicts),
            )
        deadline = asyncio.get_running_loop().time() + settings.publish_timeout_seconds
        while True:
            claim = await ledger.claim(within.new)
            if not claim.pending:
                break
            # Another request is publishing some of these right now: wait for its verdict.
            await ledger.release(claim.ours)
            if asyncio.get_running_loop().time() > deadline:
                raise StillPublishing
            await asyncio.sleep(0.05)
        earlier = triage(within.new, claim.held)
        if earlier.conflicts:
            await ledger.release(claim.ours)
            return problem(
                409,
                "Conflict",
                "an event id was reused with different content",
                errors=_items(earlier.conflicts),
            )
        try:
            await publisher.publish(
                [(topics.DOSSIER_EVENTS, c.event.key, encoded[c.index]) for c in claim.ours]
            )
        except BaseException:
            await ledger.release(claim.ours)
            raise
        await ledger.confirm(claim.ours)
        duplicates = within.duplicates + earlier.duplicates
        source = events[0].source
        EVENTS.labels(source, "accepted").inc(len(claim.ours))
        EVENTS.labels(source, "duplicate").inc(duplicates)
        REQUESTS.labels("202").inc()
        return JSONResponse(
            {"accepted": len(claim.ours), "duplicates": duplicates}, status_code=202
        )

    return api


def _items(errors: Sequence[EventError]) -> list[dict[str, Any]]:
    return [e.as_problem_item() for e in errors]


def run(settings: Settings) -> None:
    import uvicorn

    uvicorn.run(
        create_app(settings),
        host=settings.bind_host,
        port=settings.intake_port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )
