"""The operators' dead-letter endpoints (CONTRACT section 8, role `admin`): how many dead letters
wait on `<topic>.dlq` by error type, and putting them back on `<topic>` (`replay_dead_letters`,
the copy `motcua dlq-replay` makes), so an operator needs no shell.

A replay is recorded as one `audit.dead_letter_replay` event on `audit.events` (actor the token's
`sub`, target the topic, outcome `succeeded` or `failed`). A topic motcua does not consume is 404;
a broker that cannot be reached is 503 with `Retry-After`.
"""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse

from services.common.audit import AuditRecorder
from services.common.auth import OperatorAuth, request_id
from services.common.consumer import INFRASTRUCTURE_ERRORS
from services.common.dlq import DeadLetters, replay_dead_letters
from services.common.events import AuditAction
from services.common.operators import Operator, Role
from services.common.problems import problem
from services.common.topics import CONSUMER_TOPICS, dlq

BROKER_RETRY_AFTER_SECONDS = 5


def counted(found: DeadLetters) -> dict[str, Any]:
    return {
        "topic": found.topic,
        "dead_letters": found.found,
        "by_error_type": dict(sorted(found.by_error_type.items())),
    }


def unknown_topic(topic: str) -> JSONResponse:
    return problem(
        404,
        "Unknown Topic",
        f"{topic} is not a topic motcua consumes; dead letters are kept for "
        + ", ".join(CONSUMER_TOPICS),
    )


def broker_away(exc: BaseException) -> JSONResponse:
    return problem(
        503,
        "Broker Unavailable",
        f"the broker did not answer: {type(exc).__name__}",
        retry_after=BROKER_RETRY_AFTER_SECONDS,
    )


def register(api: FastAPI, auth: OperatorAuth, bootstrap: str, audit: AuditRecorder) -> None:
    """`GET /v1/admin/dead-letters/{topic}` and `POST /v1/admin/dead-letters/{topic}/replay`."""
    admin = Depends(auth.requires(Role.ADMIN))

    unknown: dict[int | str, dict[str, Any]] = {404: {"description": "not a topic motcua consumes"}}

    @api.get("/v1/admin/dead-letters/{topic}", responses=unknown)
    async def dead_letters(topic: str, operator: Operator = admin) -> JSONResponse:
        """The dead letters of `<topic>.dlq` not put back yet, by error type; copies nothing."""
        if topic not in CONSUMER_TOPICS:
            return unknown_topic(topic)
        try:
            found = await replay_dead_letters(bootstrap, topic, dry_run=True)
        except INFRASTRUCTURE_ERRORS as exc:
            return broker_away(exc)
        return JSONResponse(counted(found))

    @api.post("/v1/admin/dead-letters/{topic}/replay", responses=unknown)
    async def replay(
        topic: str,
        request: Request,
        limit: int | None = Query(default=None, ge=1),
        operator: Operator = admin,
    ) -> JSONResponse:
        """Put the dead letters of `<topic>.dlq` (at most `limit`) back on `<topic>`."""
        if topic not in CONSUMER_TOPICS:
            return unknown_topic(topic)
        rid = request_id(request)
        try:
            done = await replay_dead_letters(bootstrap, topic, limit=limit)
        except INFRASTRUCTURE_ERRORS as exc:
            # the broker is away: the 503 says so, also when this record cannot be written
            with contextlib.suppress(*INFRASTRUCTURE_ERRORS):
                await audit.record(
                    operator, AuditAction.DEAD_LETTER_REPLAY, topic, "failed", request_id=rid
                )
            return broker_away(exc)
        try:
            await audit.record(
                operator, AuditAction.DEAD_LETTER_REPLAY, topic, "succeeded", request_id=rid
            )
        except INFRASTRUCTURE_ERRORS as exc:
            return broker_away(exc)
        return JSONResponse({**counted(done), "copied": done.copied, "from": dlq(topic)})
