"""Refunds finance starts: `POST /v1/payments/{dossier_id}/refunds` and the answer the worker
gives each (CONTRACT section 8: role `finance`; a token scoped to other agencies gets 404).

The request: header `Idempotency-Key` (required: **400** without it), body
`{"amount_vnd"?: int >= 1, "reason": one of domain.REFUND_REASONS}` (no amount: all that is left).
The refund's id derives from the dossier and the key (`domain.refund_id_for`), so the same key
always names the same refund.

1. The route checks the request, finds the payment (this member's ledger, else its Redis copy:
   404 when there is none in the token's scope), notes the request's body under its id (the same
   key with another body: **422**), and, unless the worker already answered this refund, asks it
   on `payments.callbacks` (`refund_asked`, keyed by dossier: in order with everything else that
   moves the payment).
2. The worker decides (`domain.decide_refund`, on the payment as its ledger holds it: one refund
   under way at a time, never more than was paid) and writes its answer here, once: accepted
   (the payment moves to `refund_requested`, `payment.refund_requested` is published), or
   refused with the problem to answer (409 a refund under way or nothing to refund, 422 more
   than is left).
3. The route waits for that answer (up to `ANSWER_WAIT_SECONDS`; else **503** with
   `Retry-After`: the same key asked again gets the answer) and answers **202** with the refund,
   or the problem. The same key asked again gets the same answer; two keys at once, at most one
   refund under way. Each answer is recorded as `audit.refund` (`succeeded` or `denied`), its
   event id derived from the refund's id (dossier and `Idempotency-Key`), not `X-Request-Id`:
   the same key asked again changes nothing and records that same event again, with the same
   id, as any retried operator request does (`services.common.audit`); `motcua audit` and other
   readers count it once, so one refund is one audit event however often it is asked.
4. The sweeper asks the gateway (the refund's id is the gateway's request id, so a repeat
   refunds nothing more); its answer moves the payment to `refunded` (all of it went back),
   `partially_refunded`, or `refund_failed` (`payment.refund_failed`, reason `gateway_refused`).
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any, Literal

import orjson
import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.exceptions import RedisError

from services.common import topics
from services.common.audit import AuditRecorder
from services.common.auth import OperatorAuth, install_refusals
from services.common.consumer import INFRASTRUCTURE_ERRORS
from services.common.coordination import Keys
from services.common.events import AuditAction, AuditOutcome, FieldError, errors_of
from services.common.kafka import DurablePublisher
from services.common.logging import get_logger
from services.common.operators import Operator, Role, may_see_agency
from services.common.problems import invalid_body, problem
from services.common.tz import VIETNAM_TZ
from services.payments.callbacks import CallbackMessage
from services.payments.domain import REFUND_REASONS, RefundRefused, refund_id_for, txn_ref_for
from services.payments.ledger import Ledger, LedgerRecord

log = get_logger("motcua.payments.refunds")

REFUNDS_PATH = "/v1/payments/{dossier_id}/refunds"
ANSWER_WAIT_SECONDS = 10.0
ANSWER_POLL_SECONDS = 0.1
RETRY_AFTER_SECONDS = 2
KEY_MAX = 200


class RefundAnswer(BaseModel):
    """The worker's answer to one refund: accepted, or the problem to answer."""

    model_config = ConfigDict(frozen=True)

    refund_id: str
    dossier_id: str
    accepted: bool
    amount_vnd: int | None = None  # accepted: what goes back
    reason: str | None = None
    status: int = 202
    title: str = ""
    detail: str = ""

    @classmethod
    def refused(cls, refund_id: str, dossier_id: str, why: RefundRefused) -> RefundAnswer:
        return cls(
            refund_id=refund_id,
            dossier_id=dossier_id,
            accepted=False,
            status=why.status,
            title=why.title,
            detail=why.detail,
        )


class RefundAnswers:
    """The worker's answers and the requests' bodies in Redis, by refund id, for `ttl` seconds."""

    def __init__(self, client: aioredis.Redis, keys: Keys, ttl_seconds: int) -> None:
        self._client = client
        self._keys = keys
        self._ttl = ttl_seconds

    def _answer_key(self, refund_id: str) -> str:
        return self._keys("payments", "refund", refund_id, "answer")

    def _request_key(self, refund_id: str) -> str:
        return self._keys("payments", "refund", refund_id, "request")

    async def get(self, refund_id: str) -> RefundAnswer | None:
        raw = await self._client.get(self._answer_key(refund_id))
        return RefundAnswer.model_validate_json(raw) if raw else None

    async def put(self, answer: RefundAnswer) -> RefundAnswer:
        """Keep `answer` unless one is there already; the one kept is returned."""
        key = self._answer_key(answer.refund_id)
        if await self._client.set(key, answer.model_dump_json(), nx=True, ex=self._ttl):
            return answer
        kept = await self.get(answer.refund_id)
        return kept or answer

    async def note_request(self, refund_id: str, body: bytes) -> bytes:
        """The body first noted for this refund (this one, when it is the first)."""
        key = self._request_key(refund_id)
        if await self._client.set(key, body, nx=True, ex=self._ttl):
            return body
        kept = await self._client.get(key)  # bytes: decode_responses is off
        return kept if isinstance(kept, bytes) else body


class RefundBody(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    amount_vnd: int | None = Field(default=None, ge=1, le=10**15, strict=True)
    reason: Literal[REFUND_REASONS]  # type: ignore[valid-type]


REQUEST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "amount_vnd": {"type": "integer", "minimum": 1, "maximum": 10**15},
        "reason": {"enum": list(REFUND_REASONS)},
    },
    "required": ["reason"],
    "additionalProperties": False,
}
ANSWER_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "refund_id": {"type": "string"},
        "dossier_id": {"type": "string"},
        "state": {"const": "refund_requested"},
        "amount_vnd": {"type": "integer"},
        "reason": {"type": "string"},
    },
    "required": ["refund_id", "dossier_id", "state", "amount_vnd", "reason"],
}


def accepted_view(answer: RefundAnswer) -> dict[str, Any]:
    return {
        "refund_id": answer.refund_id,
        "dossier_id": answer.dossier_id,
        "state": "refund_requested",
        "amount_vnd": answer.amount_vnd,
        "reason": answer.reason,
    }


def invalid_refund(exc: ValidationError | None) -> JSONResponse:
    errors = (
        errors_of(exc)
        if exc is not None
        else [FieldError(pointer="", detail="the body is not a JSON object")]
    )
    return invalid_body("Invalid Refund", errors)


def register(
    api: FastAPI,
    ledger: Ledger,
    answers: RefundAnswers,
    publisher: DurablePublisher,
    operators: OperatorAuth,
    audit: AuditRecorder,
) -> None:
    install_refusals(api)
    finance = Depends(operators.requires(Role.FINANCE))

    async def find(dossier_id: str) -> LedgerRecord | None:
        record = ledger.get(dossier_id)
        if record is None:
            record = await ledger.snapshots.get(txn_ref_for(dossier_id))
        return record if record is not None and record.payment.dossier_id == dossier_id else None

    async def wait_answer(refund_id: str) -> RefundAnswer | None:
        deadline = time.monotonic() + ANSWER_WAIT_SECONDS
        while True:
            found = await answers.get(refund_id)
            if found is not None or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(ANSWER_POLL_SECONDS)

    @api.post(
        REFUNDS_PATH,
        summary="Refund a payment, in full or in part",
        status_code=202,
        openapi_extra={
            "parameters": [
                {
                    "name": "Idempotency-Key",
                    "in": "header",
                    "required": True,
                    "schema": {"type": "string", "minLength": 1, "maxLength": KEY_MAX},
                }
            ],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": REQUEST_SCHEMA}},
            },
        },
        responses={
            202: {
                "description": "the refund is asked of the gateway",
                "content": {"application/json": {"schema": ANSWER_SCHEMA}},
            },
            400: {"description": "no Idempotency-Key"},
            404: {"description": "no payment for this dossier"},
            409: {"description": "a refund is under way, or nothing is left to refund"},
            422: {"description": "a malformed body, more than is left, a key reused"},
            503: {"description": "the broker or Redis is away, or no answer yet; ask again"},
        },
    )
    async def refund(dossier_id: str, request: Request, operator: Operator = finance) -> Response:
        key = (request.headers.get("idempotency-key") or "").strip()
        if not key or len(key) > KEY_MAX:
            return problem(
                400,
                "Idempotency-Key Required",
                f"a refund needs a header Idempotency-Key of 1 to {KEY_MAX} characters",
            )
        raw = await request.body()
        try:
            value = orjson.loads(raw)
            body = RefundBody.model_validate(value) if isinstance(value, dict) else None
            if body is None:
                return invalid_refund(None)
        except orjson.JSONDecodeError:
            return invalid_refund(None)
        except ValidationError as exc:
            return invalid_refund(exc)
        refund_id = refund_id_for(dossier_id, key)
        try:
            record = await find(dossier_id)
            if record is None or not may_see_agency(operator, record.agency_code):
                return problem(404, "Not Found", "no payment for this dossier")
            fingerprint = orjson.dumps(body.model_dump(), option=orjson.OPT_SORT_KEYS)
            if await answers.note_request(refund_id, fingerprint) != fingerprint:
                return problem(
                    422,
                    "Idempotency-Key Reused",
                    "this Idempotency-Key was used for another refund of this payment",
                )
            answer = await answers.get(refund_id)
            if answer is None:
                message = CallbackMessage(
                    kind="refund_asked",
                    dossier_id=dossier_id,
                    at=datetime.now(VIETNAM_TZ),
                    ref=refund_id,
                    via="operator",
                    amount_vnd=body.amount_vnd,
                    reason=body.reason,
                )
                await publisher.publish(
                    [(topics.PAYMENT_CALLBACKS, dossier_id.encode(), message.to_bytes())]
                )
                answer = await wait_answer(refund_id)
        except (RedisError, OSError):
            return problem(
                503,
                "Service Unavailable",
                "Redis is away; ask again with the same key",
                retry_after=RETRY_AFTER_SECONDS,
            )
        except INFRASTRUCTURE_ERRORS as exc:
            return problem(
                503,
                "Broker Unavailable",
                f"the refund could not be asked for: {type(exc).__name__}; ask again",
                retry_after=RETRY_AFTER_SECONDS,
            )
        if answer is None:
            return problem(
                503,
                "Refund Not Answered Yet",
                "the refund is asked for; ask again with the same Idempotency-Key for its answer",
                retry_after=RETRY_AFTER_SECONDS,
            )
        outcome: AuditOutcome = "succeeded" if answer.accepted else "denied"
        try:
            # the same key, the same event (see the module's docstring)
            await audit.record(
                operator, AuditAction.REFUND, dossier_id, outcome, request_id=refund_id
            )
        except INFRASTRUCTURE_ERRORS as exc:
            return problem(
                503,
                "Broker Unavailable",
                f"the refund is answered but its audit record was not acknowledged "
                f"({type(exc).__name__}); ask again with the same Idempotency-Key",
                retry_after=RETRY_AFTER_SECONDS,
            )
        if not answer.accepted:
            return problem(answer.status, answer.title, answer.detail, refund_id=refund_id)
        return JSONResponse(accepted_view(answer), status_code=202)
