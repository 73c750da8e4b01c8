"""`POST /v1/events`: the front door for portals (CONTRACT section 4).

Authenticate, read the body (capped) and validate the batch, refuse foreign sources, rate-limit,
seal the personal fields (`personal.Sealer`, CONTRACT section 10), sort out duplicates
(`ledger.EventLedger`), publish to `dossier.events` with acks=all, and only then answer 202.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import redis.asyncio as aioredis
from fastapi import FastAPI, Request, Security
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from pydantic import BaseModel

from services.common import topics, tracing
from services.common.auth import PORTAL_KEY_BEARER
from services.common.coordination import TokenBucket
from services.common.data_keys import KeysUnavailable
from services.common.events import json_schemas
from services.common.kafka import BrokerUnavailable, DurablePublisher
from services.common.logging import get_logger
from services.common.problems import problem as common_problem
from services.common.settings import Portal, hash_key
from services.common.webhooks import BodyTooLarge, read_body
from services.intake.domain import (
    JSON_MEDIA_TYPES,
    MAX_BATCH,
    PORTAL_TYPES,
    BatchInvalid,
    Candidate,
    EventError,
    digest_of,
    foreign_sources,
    read_batch,
    traced_bytes,
    triage,
    unsupported_media_type,
)
from services.intake.ledger import EventLedger, LedgerRestoring, StillPublishing
from services.intake.personal import LOST, PersonalDataErased, Sealer

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


class PortalDirectory(Protocol):
    """Where the portal of a key's hash is found: the current keys
    (`portal_keys_view.PortalKeys`)."""

    def find(self, key_sha256: str) -> Portal | None: ...


def find_portal(portals: PortalDirectory, authorization: str | None) -> Portal | None:
    """The portal whose active key the `Authorization: Bearer` header carries."""
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return portals.find(hash_key(key.strip()))


def _items(errors: Sequence[EventError]) -> list[dict[str, Any]]:
    return [e.as_problem_item() for e in errors]


def _inline(node: Any, defs: Mapping[str, Any]) -> Any:
    """`node` with every `#/$defs/...` reference replaced by its definition."""
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return _inline(defs[ref.removeprefix("#/$defs/")], defs)
        return {k: _inline(v, defs) for k, v in node.items()}
    if isinstance(node, list):
        return [_inline(v, defs) for v in node]
    return node


def events_body_schema() -> dict[str, Any]:
    """The JSON Schema of `POST /v1/events`'s body, for the OpenAPI document: one envelope of a
    type a portal may post, or an array of 1 to `MAX_BATCH` of them (`docs/events.schema.json`
    holds every type). Timestamps must also lie within 2000-01-01 .. now + 10 years."""
    defs = json_schemas()["$defs"]
    envelope = {"oneOf": [_inline(defs[t], defs) for t in sorted(PORTAL_TYPES)]}
    return {
        "oneOf": [
            envelope,
            {"type": "array", "minItems": 1, "maxItems": MAX_BATCH, "items": envelope},
        ]
    }


def register(
    api: FastAPI,
    *,
    portals: PortalDirectory,
    max_body_bytes: int,
    ledger: EventLedger,
    buckets: Mapping[str, TokenBucket],
    publisher: DurablePublisher,
    sealer: Sealer,
) -> None:
    """`POST /v1/events` on `api`: `portals` finds a key's portal, `buckets` rate-limit by portal
    source, `sealer` seals the personal fields before publication."""
    body_schema = events_body_schema()

    @api.post(
        "/v1/events",
        status_code=202,
        # declares the portal-key scheme in the document; `find_portal` checks the key
        dependencies=[Security(PORTAL_KEY_BEARER)],
        response_model=Accepted,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {media: {"schema": body_schema} for media in JSON_MEDIA_TYPES},
            }
        },
        responses={
            401: {"description": "missing or wrong portal key"},
            403: {"description": "an event's source is not the key's own"},
            409: {
                "description": "a known (source, id) with different content, or personal data "
                "of a dossier whose personal data was erased"
            },
            413: {"description": "body over the size limit"},
            415: {"description": "Content-Type not JSON; `expected` lists the media types"},
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
        unsupported = unsupported_media_type(request.headers.get("content-type"))
        if unsupported is not None:
            return problem(
                415, "Unsupported Media Type", unsupported, expected=list(JSON_MEDIA_TYPES)
            )
        try:
            body = await read_body(request, max_body_bytes)
        except BodyTooLarge:
            return problem(413, "Payload Too Large", f"the body is over {max_body_bytes} bytes")
        try:
            events = read_batch(body, now=datetime.now(UTC))
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
        except PersonalDataErased as exc:
            return problem(
                409,
                "Conflict",
                "the personal data of these dossiers was erased; it is not accepted again",
                errors=[
                    {
                        "index": i,
                        "pointer": "/data/applicant",
                        "detail": f"the personal data of dossier {d!r} was erased",
                    }
                    for i, d in zip(exc.indexes, exc.dossier_ids, strict=True)
                ],
            )
        except KeysUnavailable:
            return problem(
                503,
                "Service Unavailable",
                "the dossiers' data keys cannot be read now; nothing was accepted",
                retry_after=2,
            )
        except StillPublishing:
            return problem(
                503,
                "Service Unavailable",
                "the same events are being published by another request; retry",
                retry_after=1,
            )
        except LedgerRestoring:
            return problem(
                503,
                "Service Unavailable",
                "intake is restoring its record of accepted events from dossier.events; retry",
                retry_after=5,
            )
        except BrokerUnavailable:
            log.warning("broker_unavailable", source=portal.source, events=len(events))
            return problem(
                503,
                "Service Unavailable",
                "the broker did not acknowledge; nothing was accepted: retry with the same events, "
                "each is published once",
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
        """Publish the events never accepted before; 409 for a known id with other content.
        The data keys a batch's sealing made are claimed with its events (one Redis round trip)
        and written before them; a key another replica is making, or one an earlier write may
        have landed (`Sealer.settle`), is waited for, and the batch sealed again with it
        (`Sealer.write_keys`), at most once: it is known then."""
        for _ in range(2):
            sealed = await sealer.seal(events)
            encoded = sealed.encoded
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
            try:
                claim = await ledger.claim_settled(within.new, sealer.claims(sealed))
            except BaseException:
                await sealer.release(sealed)
                raise
            try:
                answers = await sealer.settle(sealed, claim.side)
            except BaseException:
                await ledger.release(claim.ours)
                await sealer.release(sealed)
                raise
            earlier = triage(within.new, claim.held)
            # sealed with a key of ours where another replica's is coming: no verdict yet
            if earlier.conflicts and LOST not in answers:
                await ledger.release(claim.ours)
                await sealer.release(sealed)
                return problem(
                    409,
                    "Conflict",
                    "an event id was reused with different content",
                    errors=_items(earlier.conflicts),
                )
            try:
                keys_written = await sealer.write_keys(sealed, answers)
            except BaseException:
                await ledger.release(claim.ours)
                raise
            if keys_written:
                break
            await ledger.release(claim.ours)
        else:
            raise KeysUnavailable("the dossiers' data keys changed hands twice")
        sent_at_ms = int(time.time() * 1000)
        traced = tracing.current_attributes()  # the request's trace context, when it records
        try:
            await publisher.publish(
                [
                    (topics.DOSSIER_EVENTS, c.event.key, traced_bytes(encoded[c.index], traced))
                    for c in claim.ours
                ]
            )
        except BrokerUnavailable as exc:
            if exc.maybe_sent:  # they may still land: the next request with them checks
                await ledger.hold_uncertain(claim.ours, sent_at_ms)
            else:
                await ledger.release(claim.ours)
            raise
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
