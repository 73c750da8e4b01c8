"""The reconciliation run for operators (CONTRACT section 8, role `admin`): no shell needed.

`POST /v1/admin/reconciliations` with `{"date": "YYYY-MM-DD", "gateway"?: "vnpay"}` runs what
`motcua reconcile` and the nightly job run (`reconciliation.run_reconciliation`): the gateway's
statement of that Vietnamese day against the whole ledger (read from its changelog), the report
files under `PAYMENTS_RECONCILE_DIR`, one `payment.reconciliation_mismatch` per difference (the
same ids and bytes however often the day is run). The run is synchronous, one at a time per
process: the answer, **200**, is the summary (statement rows, ledger entries, `matched`,
`differences`, `by_kind`, totals) and the report's rows.

Each run is recorded as one `audit.reconciliation_run` on `audit.events` (actor the token's `sub`,
target `<gateway>/<date>`, outcome `succeeded` or `failed`). Answers besides 200: 401/403 as
CONTRACT 8; **422** naming the field (`/date` malformed or after today, `/gateway` unknown);
**503** with `Retry-After` when the gateway's statement cannot be fetched or the broker does not
answer; **502** when the gateway sent a statement that cannot be read (the problem names the line).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from datetime import date, datetime
from typing import Any

import orjson
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from services.common.audit import AuditRecorder
from services.common.auth import OperatorAuth, request_id
from services.common.consumer import INFRASTRUCTURE_ERRORS
from services.common.events import AuditAction, AuditOutcome
from services.common.logging import get_logger
from services.common.operators import Operator, Role
from services.common.partner import PartnerError
from services.common.problems import invalid_body, problem
from services.common.tz import VIETNAM_TZ
from services.payments.reconciliation import Outcome
from services.payments.statement import (
    RunRequest,
    StatementError,
    report_rows,
    run_request,
    summary,
)

log = get_logger("motcua.payments.admin")

RECONCILIATIONS_PATH = "/v1/admin/reconciliations"
STATEMENT_RETRY_AFTER_SECONDS = 60
BROKER_RETRY_AFTER_SECONDS = 5

Run = Callable[[str, date], Awaitable[Outcome]]  # (gateway, day) -> the run's outcome


def request_schema(gateways: tuple[str, ...]) -> dict[str, Any]:
    """The request body's JSON Schema: a day and, optionally, one of `gateways`."""
    return {
        "type": "object",
        "required": ["date"],
        "properties": {
            "date": {"type": "string", "format": "date", "description": "the Vietnamese day"},
            "gateway": {
                "type": "string",
                "enum": list(gateways),
                "description": "default: PAYMENTS_DEFAULT_GATEWAY",
            },
        },
    }


def target(wanted: RunRequest) -> str:
    return f"{wanted.gateway}/{wanted.day.isoformat()}"


def result_view(outcome: Outcome) -> dict[str, Any]:
    return {**summary(outcome.result), "report": report_rows(outcome.result)}


def register(
    api: FastAPI,
    auth: OperatorAuth,
    audit: AuditRecorder,
    run: Run,
    *,
    gateways: tuple[str, ...],
    default_gateway: str,
) -> None:
    """`POST /v1/admin/reconciliations` on `api` (refusals answered by `install_refusals`)."""
    admin = Depends(auth.requires(Role.ADMIN))
    one_at_a_time = asyncio.Lock()

    async def record(
        operator: Operator, wanted: RunRequest, outcome: AuditOutcome, rid: str
    ) -> None:
        await audit.record(
            operator, AuditAction.RECONCILIATION_RUN, target(wanted), outcome, request_id=rid
        )

    async def failed(
        operator: Operator, wanted: RunRequest, rid: str, answer: JSONResponse
    ) -> JSONResponse:
        with contextlib.suppress(*INFRASTRUCTURE_ERRORS):  # the broker is away: the 503 says so
            await record(operator, wanted, "failed", rid)
        return answer

    @api.post(
        RECONCILIATIONS_PATH,
        summary="Run the gateway reconciliation of one day",
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": request_schema(gateways)}},
            }
        },
        responses={
            200: {"description": "the run's summary and its report rows"},
            422: {"description": "a malformed or future date, an unknown gateway"},
            502: {"description": "the gateway's statement could not be read"},
            503: {"description": "the statement or the broker is unavailable; retry later"},
        },
    )
    async def reconcile_day(request: Request, operator: Operator = admin) -> JSONResponse:
        """Reconcile a gateway's statement of one day against the ledger (as the nightly job)."""
        try:
            body: object = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            body = None
        today = datetime.now(VIETNAM_TZ).date()
        wanted = run_request(body, today=today, gateways=gateways, default_gateway=default_gateway)
        if not isinstance(wanted, RunRequest):
            return invalid_body("Invalid Request", wanted)
        rid = request_id(request)
        async with one_at_a_time:
            try:
                outcome = await run(wanted.gateway, wanted.day)
            except PartnerError as exc:
                log.warning("statement_unavailable", gateway=wanted.gateway, error=str(exc)[:200])
                return await failed(
                    operator,
                    wanted,
                    rid,
                    problem(
                        503,
                        "Statement Unavailable",
                        f"the {wanted.gateway} statement of {wanted.day} could not be fetched "
                        f"({exc}); retry later",
                        retry_after=STATEMENT_RETRY_AFTER_SECONDS,
                    ),
                )
            except INFRASTRUCTURE_ERRORS as exc:
                return await failed(
                    operator,
                    wanted,
                    rid,
                    problem(
                        503,
                        "Broker Unavailable",
                        f"the ledger or the report could not be read or written: "
                        f"{type(exc).__name__}",
                        retry_after=BROKER_RETRY_AFTER_SECONDS,
                    ),
                )
            except (StatementError, ValueError) as exc:
                return await failed(
                    operator,
                    wanted,
                    rid,
                    problem(502, "Statement Unreadable", f"{wanted.gateway}: {exc}"[:500]),
                )
        try:
            await record(operator, wanted, "succeeded", rid)
        except INFRASTRUCTURE_ERRORS as exc:
            # The run is done (its events are idempotent); a retry records it again.
            return problem(
                503,
                "Broker Unavailable",
                f"the run is done but its audit record was not acknowledged: {type(exc).__name__}",
                retry_after=BROKER_RETRY_AFTER_SECONDS,
            )
        return JSONResponse(result_view(outcome))
