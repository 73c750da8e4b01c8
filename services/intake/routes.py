"""`POST /v1/events`: the front door for portals (CONTRACT section 4).

Authenticate, read the body (capped) and validate the batch, refuse foreign sources, rate-limit,
sort out duplicates (`ledger.EventLedger`), publish to `dossier.events` with acks=all, and only
then answer 202.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Mapping, Sequence
from typing import Any

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from pydantic import BaseModel

from services.common import topics
from services.common.coordination import TokenBucket
from services.common.kafka import BrokerUnavailable, DurablePublisher
from services.common.logging import get_logger
from services.common.problems import problem as common_problem
from services.common.settings import Portal, hash_key
from services.common.webhooks import BodyTooLarge, read_body
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
from services.intake.ledger import EventLedger, StillPublishing

log = get_logger("motcua.intake")

REQUESTS = Counter("motcua_intake_requests_total", "Intake requests by status", ["status"])
EVENTS = Counter("motcua_intake_events_total", "Events by outcome", ["source", "outcome"])


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


def _items(errors: Sequence[EventError]) -> list[dict[str, Any]]:
    return [e.as_problem_item() for e in errors]


def register(
    api: FastAPI,
    *,
    portals: Sequence[Portal],
    max_body_bytes: int,
    ledger: EventLedger,
    buckets: Mapping[str, TokenBucket],
    publisher: DurablePublisher,
) -> None:
    """`POST /v1/events` on `api`: `buckets` rate-limit by portal source."""

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
        portal = find_portal(portals, request.headers.get("authorization"))
        if portal is None:
            return problem(401, "Unauthorized", "a valid portal key is required (Bearer)")
        try:
            body = await read_body(request, max_body_bytes)
        except BodyTooLarge:
            return problem(413, "Payload Too Large", f"the body is over {max_body_bytes} bytes")
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
            return await publish_once(events)
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

    async def publish_once(events: Sequence[Any]) -> JSONResponse:
        """Publish the events never accepted before; 409 for a known id with other content."""
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
        claim = await ledger.claim_settled(within.new)
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
