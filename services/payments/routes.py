"""The payments service's HTTP routes besides the IPN webhook.

- `GET /pay/{txn_ref}`: the short payment link an SMS carries, redirected (302) to the gateway's
  payment page (from the order's Redis copy, else the ledger: 404 only when the ledger is sure
  there is no such order, 503 with `Retry-After` when it cannot tell);
- `GET /v1/payments/return`: the page a browser returns to from the gateway (display only; the
  result is the gateway's IPN or a query);
- `GET /v1/payments/{dossier_id}`: a dossier's payment, its state and history (the ledger of
  this member, else the order's Redis copy), for an operator with the role `finance` or
  `admin` (CONTRACT section 8: 401 without a valid token, 403 without the role); a token scoped
  to other agencies than the dossier's gets the same 404 as a dossier without a payment.

The first two are the applicant's and stay open.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse, RedirectResponse, Response
from redis.exceptions import RedisError

from services.common.auth import OperatorAuth, install_refusals
from services.common.operators import Operator, Role, may_see_agency
from services.common.problems import PROBLEM, problem
from services.common.webhooks import PROBLEM_SCHEMA
from services.payments.domain import PaymentState, txn_ref_for
from services.payments.ledger import PAY_PATH, Ledger, LedgerRecord

RETURN_PATH = "/v1/payments/return"
LOOKUP_PATH = "/v1/payments/{dossier_id}"
REDIS_RETRY_AFTER_SECONDS = 2


def lookup_view(record: LedgerRecord) -> dict[str, Any]:
    p = record.payment
    return {
        "dossier_id": p.dossier_id,
        "state": p.state.value,
        "gateway": p.gateway,
        "txn_ref": p.txn_ref,
        "amount_vnd": p.amount_vnd,
        "currency": p.currency,
        "payment_url": record.payment_url,
        "created_at": p.created_at.isoformat(),
        "expires_at": p.expires_at.isoformat(),
        "version": p.version,
        "history": [h.model_dump(mode="json") for h in p.history],
    }


NOT_FOUND: dict[str, Any] = {"content": {PROBLEM: {"schema": PROBLEM_SCHEMA}}}
# What `lookup_view` answers, for the OpenAPI document: every field, always.
LOOKUP_PROPERTIES: dict[str, Any] = {
    "dossier_id": {"type": "string"},
    "state": {"enum": [state.value for state in PaymentState]},
    "gateway": {"type": "string"},
    "txn_ref": {"type": "string"},
    "amount_vnd": {"type": "integer", "minimum": 1},
    "currency": {"type": "string"},
    "payment_url": {"type": "string"},
    "created_at": {"type": "string", "format": "date-time"},
    "expires_at": {"type": "string", "format": "date-time"},
    "version": {"type": "integer"},
    "history": {"type": "array", "items": {"type": "object"}},
}
LOOKUP_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": LOOKUP_PROPERTIES,
    "required": list(LOOKUP_PROPERTIES),
}


def cannot_tell() -> JSONResponse:
    return problem(
        503,
        "Service Unavailable",
        "the order's copy cannot be read now and this member does not hold its ledger; retry",
        retry_after=REDIS_RETRY_AFTER_SECONDS,
    )


def register(api: FastAPI, ledger: Ledger, operators: OperatorAuth) -> None:
    snapshots = ledger.snapshots
    install_refusals(api)
    finance = Depends(operators.requires(Role.FINANCE))

    @api.get(
        PAY_PATH,
        summary="Short payment link: redirects to the gateway's page",
        response_class=RedirectResponse,
        status_code=302,
        responses={
            302: {
                "description": "to the gateway's payment page",
                "headers": {
                    "Location": {
                        "description": "the gateway's payment page",
                        "schema": {"type": "string"},
                    }
                },
            },
            404: {"description": "no such order", **NOT_FOUND},
            503: {"description": "the order cannot be looked up now; retry"},
        },
    )
    async def pay(txn_ref: str) -> Response:
        try:
            record = await snapshots.get(txn_ref)
        except (RedisError, OSError):
            record = None
        if record is None:
            found = ledger.lookup(txn_ref)
            if found.record is None:
                if not found.complete:
                    return cannot_tell()
                return problem(404, "Not Found", "no open payment for this link")
            record = found.record
        return RedirectResponse(record.payment_url, status_code=302)

    @api.get(RETURN_PATH, summary="Browser return page (display only)")
    async def browser_return() -> dict[str, str]:
        return {"message": "Thank you. The result is confirmed by the gateway separately."}

    @api.get(
        LOOKUP_PATH,
        summary="A dossier's payment, state and history",
        responses={
            200: {"content": {"application/json": {"schema": LOOKUP_SCHEMA}}},
            404: {"description": "no payment for this dossier", **NOT_FOUND},
        },
    )
    async def lookup(dossier_id: str, operator: Operator = finance) -> Response:
        record = ledger.get(dossier_id)
        if record is None:
            try:
                record = await snapshots.get(txn_ref_for(dossier_id))
            except (RedisError, OSError):
                return cannot_tell()
        if (
            record is None
            or record.payment.dossier_id != dossier_id
            or not may_see_agency(operator, record.agency_code)
        ):
            return problem(404, "Not Found", "no payment for this dossier")
        return JSONResponse(lookup_view(record))
