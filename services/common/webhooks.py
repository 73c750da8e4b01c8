"""The one door for partners' webhooks (banks, the post office, SMS gateways).

Every call goes the same way, whatever the partner:

1. **bounded**: a declared Content-Length over the cap is refused before anything is read, and a
   streamed body is read only up to the cap (`read_body`): the 413 goes out then, and the
   server throws away whatever else the client still sends, never holding more than a chunk;
2. **verified** on the raw bytes by the partner's verifier;
3. **parsed** by the partner's parser into a `Callback`: the partner's event id, the callback
   topic's key (the dossier id) and the bytes that topic carries;
4. **claimed** once by that event id, atomically, in one Redis round trip that also reads the
   record the decision needs, if any (`claims.Claims`);
5. **decided** by the partner (by default: accept); a refusal releases the claim;
6. **written** to the callback topic (acks=all), and only then **answered**; the claim is
   confirmed in the background, many claims in one round trip.
   Anything unexpected after the claim releases it and answers "retry" (never a 500).
   A copy arriving while the first is being written is asked to retry; a copy after it is a
   duplicate; a failed write releases the claim so the partner's retry gets through.

A partner supplies only its verifier, its parser and (optionally) its decision; the intake's
owner supplies the reply format (the bank's protocol answers HTTP 200 with a code, the post
office and the SMS gateways get JSON with a status).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

import orjson
from prometheus_client import Counter
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from services.common.claims import Claim, Claims
from services.common.counter_series import CounterSeries
from services.common.kafka import BrokerUnavailable, DurablePublisher
from services.common.logging import get_logger
from services.common.problems import problem
from services.common.signing import SIGNATURE_HEADER, SignatureRejected, verify_body

log = get_logger("motcua.webhooks")

MAX_WEBHOOK_BYTES = 64 * 1024

WEBHOOK_CALLS = Counter(
    "motcua_webhook_calls_total",
    "Partner webhook calls by outcome",
    ["service", "partner", "outcome"],
)
_WEBHOOK_CALLS = CounterSeries(WEBHOOK_CALLS)


class Outcome(StrEnum):
    ACCEPTED = "accepted"  # written to the callback topic
    DUPLICATE = "duplicate"  # this event id was accepted before
    IN_FLIGHT = "in_flight"  # another copy is being written right now: retry
    TOO_LARGE = "too_large"
    UNAUTHORIZED = "unauthorized"  # signature missing, wrong or stale
    MALFORMED = "malformed"
    UNKNOWN_PARTNER = "unknown_partner"
    REFUSED = "refused"  # the partner's decision said no (unknown order, wrong amount, ...)
    UNAVAILABLE = "unavailable"  # Redis or the broker away: nothing was accepted, retry


# --- bounded bodies ------------------------------------------------------------------------------


class BodyTooLarge(Exception):
    """The body is over the cap; nothing more of it was read."""


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused as soon as it is known to be over `limit` bytes: a declared
    Content-Length before reading, a streamed (chunked) body as soon as it crosses the limit."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


# --- what a partner supplies ---------------------------------------------------------------------


@dataclass(frozen=True)
class InboundCall:
    """What a partner's call brought, untouched: the raw query string, body and headers."""

    query: bytes
    body: bytes
    headers: Mapping[str, str]


class Rejected(Exception):
    """Raised by a verifier (signature) or a parser (shape) with the reason to tell the partner."""

    def __init__(self, reason: str, *, detail: Any = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Callback:
    """A verified call, parsed: claimed by `event_id`, written as (`key`, `value`)."""

    event_id: str
    key: bytes
    value: bytes
    read: str | None = None  # a Redis key the decision needs, read in the claim's round trip
    parsed: Any = None  # the partner's own view of it, for its decision and reply


@dataclass(frozen=True)
class Decision:
    """The partner's verdict on a claimed callback; `detail` is handed to the reply."""

    accept: bool
    value: bytes | None = None  # replaces `Callback.value` when given
    detail: Any = None
    key: bytes | None = None  # replaces `Callback.key` when given (known once the record is read)


ACCEPT = Decision(accept=True)


class WebhookPartner(Protocol):
    """A partner's side of the door; it may also have `async decide(callback, record) ->
    Decision`, whether to accept a callback given the record read with its claim, and, for the
    OpenAPI document (`webhook_operations`), `body_schema` (the JSON Schema of its body) and
    `media_type` (when not `application/json`)."""

    name: str

    def verify(self, call: InboundCall) -> None:
        """Raise `Rejected` unless the call is authentic (on the raw bytes)."""

    def parse(self, call: InboundCall) -> Callback:
        """Raise `Rejected` for a body the partner should not have sent."""


Reply = Callable[[Outcome, str, Any], Response]


class SignedBodyVerifier:
    """`X-Motcua-Signature` over the raw body (CONTRACT section 6), any of `secrets` (rotation)."""

    def __init__(self, secrets: list[str], tolerance_seconds: int) -> None:
        self.secrets = secrets
        self.tolerance_seconds = tolerance_seconds

    def __call__(self, call: InboundCall) -> None:
        try:
            verify_body(
                call.body,
                call.headers.get(SIGNATURE_HEADER),
                self.secrets,
                tolerance_seconds=self.tolerance_seconds,
            )
        except SignatureRejected as exc:
            raise Rejected(exc.reason) from None


# --- the door -------------------------------------------------------------------------------------


class WebhookIntake:
    """One service's webhook route: `partners` by the path parameter `path_param`."""

    def __init__(
        self,
        service: str,
        partners: Mapping[str, WebhookPartner],
        *,
        path_param: str,
        topic: str,
        claims: Claims,
        claim_key: Callable[[str, str], str],
        publisher: DurablePublisher,
        reply: Reply,
        max_body_bytes: int = MAX_WEBHOOK_BYTES,
        in_flight_wait: float = 0.0,
    ) -> None:
        self.service = service
        self.partners = dict(partners)
        self.path_param = path_param
        self.topic = topic
        self.claims = claims
        self.claim_key = claim_key  # (partner, event id) -> Redis key
        self.publisher = publisher
        self.reply = reply
        self.max_body_bytes = max_body_bytes
        # how long a copy that finds another copy being written asks the claim again (backing
        # off) for that copy's verdict before it answers "in flight"; 0 answers at once
        self.in_flight_wait = in_flight_wait

    async def endpoint(self, request: Request) -> Response:
        """The Starlette endpoint (`Service.webhook(path, intake.endpoint)`)."""
        name = str(request.path_params.get(self.path_param, ""))
        partner = self.partners.get(name)
        if partner is None:
            return self._answer("unknown", Outcome.UNKNOWN_PARTNER, f"unknown {self.path_param}")
        try:
            body = await read_body(request, self.max_body_bytes)
        except BodyTooLarge:
            return self._answer(name, Outcome.TOO_LARGE, f"body over {self.max_body_bytes} bytes")
        return await self.handle(
            partner, InboundCall(request.scope.get("query_string", b""), body, request.headers)
        )

    async def handle(self, partner: WebhookPartner, call: InboundCall) -> Response:
        name = partner.name
        try:
            partner.verify(call)
        except Rejected as exc:
            return self._answer(name, Outcome.UNAUTHORIZED, exc.reason, exc.detail)
        except Exception as exc:  # the verifier failed on its own: refused, not a 500
            log.error("webhook_unverifiable", partner=name, error_type=type(exc).__name__)
            return self._answer(name, Outcome.UNAUTHORIZED, "the signature could not be checked")
        try:
            callback = partner.parse(call)
        except Rejected as exc:
            return self._answer(name, Outcome.MALFORMED, exc.reason, exc.detail)
        except Exception as exc:  # the parser failed on its own: refused, not a 500
            log.error("webhook_unreadable", partner=name, error_type=type(exc).__name__)
            return self._answer(name, Outcome.MALFORMED, "the body could not be read")
        key = self.claim_key(name, callback.event_id)
        try:
            claim = await self._claim_settled(key, callback)
        except (RedisError, OSError) as exc:
            log.warning("webhook_redis_unavailable", partner=name, error_type=type(exc).__name__)
            return self._answer(name, Outcome.UNAVAILABLE, "Redis is unreachable; retry")
        try:
            return await self._decide_and_write(partner, callback, key, claim)
        except BrokerUnavailable as exc:
            log.warning("callback_not_durable", partner=name, error=str(exc)[:200])
            await self._release(key, claim.claimed)
            return self._answer(name, Outcome.UNAVAILABLE, "the broker is unreachable; retry")
        except Exception as exc:  # nothing was accepted: the partner retries, never sees a 500
            log.error(
                "webhook_failed",
                partner=name,
                error_type=type(exc).__name__,
                error=str(exc)[:200],
            )
            await self._release(key, claim.claimed)
            return self._answer(name, Outcome.UNAVAILABLE, "not accepted; retry")

    async def _claim_settled(self, key: str, callback: Callback) -> Claim:
        """Claim `key`; while another copy is being written, ask again (5 ms doubling to 200 ms)
        for at most `in_flight_wait` seconds, so that copy's verdict decides: durable (this one
        is a duplicate) or failed (this one is written)."""
        claim = await self.claims.claim(key, read=callback.read)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.in_flight_wait
        delay = 0.005
        while claim.pending and not claim.claimed and loop.time() + delay <= deadline:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.2)
            claim = await self.claims.claim(key, read=callback.read)
        return claim

    async def _decide_and_write(
        self, partner: WebhookPartner, callback: Callback, key: str, claim: Claim
    ) -> Response:
        name = partner.name
        decision = ACCEPT
        decide: Callable[[Callback, bytes | None], Awaitable[Decision]] | None = getattr(
            partner, "decide", None
        )
        if decide is not None:
            decision = await decide(callback, claim.record)
        if not decision.accept:
            await self._release(key, claim.claimed)
            return self._answer(name, Outcome.REFUSED, "refused", decision.detail)
        if not claim.claimed:
            if claim.pending:
                return self._answer(name, Outcome.IN_FLIGHT, "being written; retry")
            return self._answer(name, Outcome.DUPLICATE, "seen before", decision.detail)
        value = decision.value if decision.value is not None else callback.value
        record_key = decision.key if decision.key is not None else callback.key
        await self.publisher.publish([(self.topic, record_key, value)])
        self.claims.confirm_soon(key)  # durable already: the reply need not wait for it
        return self._answer(name, Outcome.ACCEPTED, "accepted", decision.detail)

    async def _release(self, key: str, claimed: bool) -> None:
        if claimed:
            with contextlib.suppress(RedisError, OSError):
                await self.claims.release(key)

    def responses(self) -> dict[str, Any]:
        """The OpenAPI responses of this door's replies: `json_reply`'s; a door with another
        reply format says its own."""
        return JSON_REPLY_RESPONSES

    def _answer(self, partner: str, outcome: Outcome, reason: str, detail: Any = None) -> Response:
        _WEBHOOK_CALLS(self.service, partner, outcome.value).inc()
        return self.reply(outcome, reason, detail)


STATUS_OF: dict[Outcome, int] = {
    Outcome.ACCEPTED: 200,
    Outcome.DUPLICATE: 200,
    Outcome.IN_FLIGHT: 503,
    Outcome.TOO_LARGE: 413,
    Outcome.UNAUTHORIZED: 401,
    Outcome.MALFORMED: 422,
    Outcome.UNKNOWN_PARTNER: 404,
    Outcome.REFUSED: 422,
    Outcome.UNAVAILABLE: 503,
}


# `{"status": "accepted"}` and `{"status": "duplicate"}`, serialised once
_STATUS_BODIES = {
    outcome: orjson.dumps({"status": outcome.value})
    for outcome in (Outcome.ACCEPTED, Outcome.DUPLICATE)
}


def json_reply(outcome: Outcome, reason: str, detail: Any = None) -> Response:
    """The reply of the partners speaking CONTRACT section 6's JSON webhooks: `{"status": ...}`
    (`accepted`, `duplicate`, or `rejected` with a reason); a 503 (Redis or the broker away, or
    a copy in flight) is `application/problem+json` with `Retry-After`."""
    status = STATUS_OF[outcome]
    fixed = _STATUS_BODIES.get(outcome)
    if fixed is not None:
        return Response(fixed, status_code=status, media_type="application/json")
    if status == 503:  # not the partner's fault: a problem document (RFC 9457) says retry
        return problem(503, "Service Unavailable", reason, retry_after=1)
    body: dict[str, Any] = {"status": "rejected", "reason": reason}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status)


# --- the door, documented (OpenAPI) ---------------------------------------------------------------

# A partner says what its body is with `body_schema` (a JSON Schema) and `media_type` (default
# `application/json`); without them the body is documented as a generic JSON object.
GENERIC_BODY_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "The partner's own JSON body, verified on its raw bytes before it is read.",
}
RETRY_AFTER: dict[str, Any] = {
    "Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}
}
PROBLEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "RFC 9457 problem details",
    "properties": {
        "type": {"type": "string"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
    },
    "required": ["type", "title", "status", "detail"],
}
_REJECTED: dict[str, Any] = {
    "application/json": {
        "schema": {
            "type": "object",
            "properties": {
                "status": {"const": "rejected"},
                "reason": {"type": "string"},
                "detail": {},
            },
            "required": ["status", "reason"],
        }
    }
}


def unavailable_response(what: str) -> dict[str, Any]:
    """The OpenAPI response of a 503 `application/problem+json` with `Retry-After`."""
    return {
        "description": what,
        "headers": RETRY_AFTER,
        "content": {"application/problem+json": {"schema": PROBLEM_SCHEMA}},
    }


JSON_REPLY_RESPONSES: dict[str, Any] = {
    "200": {
        "description": "accepted (written to the callback topic), or a duplicate of one that was",
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {"status": {"enum": ["accepted", "duplicate"]}},
                    "required": ["status"],
                }
            }
        },
    },
    "401": {"description": "signature missing, wrong or stale", "content": _REJECTED},
    "404": {"description": "no such partner on this path", "content": _REJECTED},
    "413": {
        "description": f"body over {MAX_WEBHOOK_BYTES} bytes (refused before it is read)",
        "content": _REJECTED,
    },
    "422": {
        "description": "malformed body, or refused by the partner's decision",
        "content": _REJECTED,
    },
    "503": unavailable_response(
        "Redis or the broker away, or a copy of this call being written: nothing was accepted; "
        "retry after Retry-After"
    ),
}


def webhook_operations(intake: WebhookIntake, methods: Sequence[str]) -> dict[str, Any]:
    """The OpenAPI path item of `intake`'s route answering `methods`: the partner path
    parameter, each partner's body, and every reply the door can give (`intake.responses()`)."""
    names = sorted(intake.partners)
    content: dict[str, Any] = {}
    for name in names:
        partner = intake.partners[name]
        media_type = str(getattr(partner, "media_type", "application/json"))
        schema = getattr(partner, "body_schema", None) or GENERIC_BODY_SCHEMA
        schemas = content.setdefault(media_type, {"schema": {"oneOf": []}})["schema"]["oneOf"]
        if schema not in schemas:
            schemas.append(schema)
    for entry in content.values():  # one schema needs no `oneOf`
        if len(entry["schema"]["oneOf"]) == 1:
            entry["schema"] = entry["schema"]["oneOf"][0]
    item: dict[str, Any] = {}
    for method in methods:
        operation: dict[str, Any] = {
            "tags": ["webhooks"],
            "summary": f"{intake.service}: a partner's callback ({', '.join(names)})",
            "description": (
                "A partner's webhook through the one door (`services.common.webhooks`): bounded "
                f"to {intake.max_body_bytes} bytes, verified on the raw bytes, parsed, claimed "
                f"once by the partner's event id and written to `{intake.topic}` before the "
                "answer."
            ),
            "operationId": f"{intake.service}_webhook_{method.lower()}",
            "parameters": [
                {
                    "name": intake.path_param,
                    "in": "path",
                    "required": True,
                    "schema": {"type": "string", "enum": names},
                }
            ],
            "responses": intake.responses(),
        }
        if method.upper() == "GET":  # a partner calling with GET sends its fields as a query
            operation["parameters"] += [
                {"name": field, "in": "query", "required": False, "schema": {"type": "string"}}
                for field in sorted(
                    {f for n in names for f in getattr(intake.partners[n], "query_parameters", ())}
                )
            ]
        else:
            operation["requestBody"] = {"required": True, "content": content}
        item[method.lower()] = operation
    return item
