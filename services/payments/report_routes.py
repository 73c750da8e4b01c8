"""The finance reports over HTTP (CONTRACT section 8: role `finance` or `admin`, a token's agency
scope limits every answer to its agencies' payments).

- `GET /v1/payments`: payments newest first, filtered by `from_date`/`to_date` (time of
  creation: a date is a whole Vietnamese day, both ends included; an RFC 3339 time with offset,
  `to_date` excluded), `agency`, `state`, `gateway` (each repeatable or comma-separated),
  `amount_min`/`amount_max` (VND, included) and `reference` (a dossier id or a gateway txn ref);
  `limit` (1..1000, default 100) rows per page and `cursor`, the `next_cursor` of the page
  before. Answer: `{"results": [...], "count", "next_cursor"}` (`next_cursor` null on the last
  page).
- `GET /v1/payments.csv`: the same rows (same filters, no paging) streamed as CSV, UTF-8 with a
  BOM (spreadsheet software then reads Vietnamese correctly), a header row first.
- `GET /v1/payments/totals`: per Vietnamese day the money arrived (`from_date`..`to_date`, plain
  dates, both included, default today, at most 366 days), agency and gateway: the number of
  payments, their amount, what was refunded of them and the net.

Bad parameters: **422** naming each (`errors`). Until this process's report file has once read
`payment.events` to its end: **503** with `Retry-After`.
"""

from __future__ import annotations

import asyncio
import codecs
import csv
import io
from collections.abc import AsyncIterator, Sequence
from datetime import datetime
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from services.common.auth import OperatorAuth, install_refusals
from services.common.operators import Operator, Role
from services.common.problems import invalid_query, problem
from services.common.tz import VIETNAM_TZ
from services.payments.domain import PaymentState
from services.payments.report_store import ReportStore
from services.payments.reports import (
    CSV_HEADER,
    MAX_LIMIT,
    csv_cells,
    parse_report_query,
    parse_totals_query,
    row_view,
    totals_view,
)

LIST_PATH = "/v1/payments"
CSV_PATH = "/v1/payments.csv"
TOTALS_PATH = "/v1/payments/totals"
CATCHING_UP_RETRY_AFTER_SECONDS = 5
CSV_CHUNK = 1000

_TEXT = {"type": "string"}
_TIME = {"type": ["string", "null"], "format": "date-time"}
ROW_PROPERTIES: dict[str, Any] = {
    "dossier_id": _TEXT,
    "agency_code": _TEXT,
    "state": {"enum": [state.value for state in PaymentState]},
    "gateway": _TEXT,
    "txn_ref": _TEXT,
    "amount_vnd": {"type": "integer"},
    "refunded_vnd": {"type": "integer"},
    "currency": _TEXT,
    "created_at": {"type": "string", "format": "date-time"},
    "settled_at": _TIME,
    "paid_at": _TIME,
    "updated_at": {"type": "string", "format": "date-time"},
    "version": {"type": "integer"},
}
LIST_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "results": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": ROW_PROPERTIES,
                "required": list(ROW_PROPERTIES),
            },
        },
        "count": {"type": "integer"},
        "next_cursor": {"type": ["string", "null"]},
    },
    "required": ["results", "count", "next_cursor"],
}
TOTAL_PROPERTIES: dict[str, Any] = {
    "day": {"type": "string", "format": "date"},
    "agency_code": _TEXT,
    "gateway": _TEXT,
    "paid_count": {"type": "integer"},
    "paid_vnd": {"type": "integer"},
    "refunded_vnd": {"type": "integer"},
    "net_vnd": {"type": "integer"},
}
TOTALS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "from_date": {"type": "string", "format": "date"},
        "to_date": {"type": "string", "format": "date"},
        "totals": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": TOTAL_PROPERTIES,
                "required": list(TOTAL_PROPERTIES),
            },
        },
    },
    "required": ["from_date", "to_date", "totals"],
}


def _param(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "description": description,
        "schema": schema,
    }


_WHEN = {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}]}
_MANY = {"type": "array", "items": {"type": "string"}}
FILTERS = [
    _param("from_date", "created at or after (a date: from that Vietnamese day)", _WHEN),
    _param("to_date", "created before (a date: up to that Vietnamese day, included)", _WHEN),
    _param("agency", "agency code (repeatable)", _MANY),
    _param(
        "state",
        "payment state (repeatable)",
        {"type": "array", "items": {"enum": [s.value for s in PaymentState]}},
    ),
    _param("gateway", "gateway name (repeatable)", _MANY),
    _param("amount_min", "amount in VND, at least", {"type": "integer", "minimum": 0}),
    _param("amount_max", "amount in VND, at most", {"type": "integer", "minimum": 0}),
    _param("reference", "a dossier id or a gateway txn ref", _TEXT),
]
PAGING = [
    _param("limit", "rows per page", {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}),
    _param("cursor", "the next_cursor of the page before", _TEXT),
]
TOTALS_PARAMS = [
    _param(
        "from_date", "first Vietnamese day (default today)", {"type": "string", "format": "date"}
    ),
    _param(
        "to_date",
        "last Vietnamese day, included (default today)",
        {"type": "string", "format": "date"},
    ),
    _param("agency", "agency code (repeatable)", _MANY),
    _param("gateway", "gateway name (repeatable)", _MANY),
]
INVALID = {"description": "a parameter is malformed (the problem's `errors` name each)"}
CATCHING_UP = {"description": "the report is still being built; retry later"}


def params_of(request: Request) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        found.setdefault(name, []).append(value)
    return found


def catching_up() -> JSONResponse:
    return problem(
        503,
        "Report Catching Up",
        "this process is still reading the payment events into its report; retry later",
        retry_after=CATCHING_UP_RETRY_AFTER_SECONDS,
    )


def csv_line(cells: Sequence[str]) -> str:
    out = io.StringIO()
    csv.writer(out, lineterminator="\r\n").writerow(cells)
    return out.getvalue()


def register(api: FastAPI, store: ReportStore, operators: OperatorAuth) -> None:
    """The report routes on `api`; before the lookup `/v1/payments/{dossier_id}`, which would
    take `totals` for a dossier id."""
    install_refusals(api)
    finance = Depends(operators.requires(Role.FINANCE))

    @api.get(
        LIST_PATH,
        summary="Payments, filtered and paginated, newest first",
        openapi_extra={"parameters": FILTERS + PAGING},
        responses={
            200: {"content": {"application/json": {"schema": LIST_SCHEMA}}},
            422: INVALID,
            503: CATCHING_UP,
        },
    )
    async def list_payments(request: Request, operator: Operator = finance) -> Response:
        query = parse_report_query(params_of(request), operator.scope)
        if query.errors:
            return invalid_query(query.errors)
        if not store.complete:
            return catching_up()
        page = await asyncio.to_thread(store.page, query)
        return JSONResponse(
            {
                "results": [row_view(row) for row in page.rows],
                "count": len(page.rows),
                "next_cursor": page.next_cursor,
            }
        )

    @api.get(
        CSV_PATH,
        summary="The same payments as CSV (UTF-8 with BOM)",
        openapi_extra={"parameters": FILTERS},
        response_class=StreamingResponse,
        responses={
            200: {"content": {"text/csv": {"schema": {"type": "string"}}}},
            422: INVALID,
            503: CATCHING_UP,
        },
    )
    async def export_payments(request: Request, operator: Operator = finance) -> Response:
        query = parse_report_query(params_of(request), operator.scope, paged=False)
        if query.errors:
            return invalid_query(query.errors)
        if not store.complete:
            return catching_up()
        chunks = store.rows(query, CSV_CHUNK)

        async def lines() -> AsyncIterator[bytes]:
            yield codecs.BOM_UTF8 + csv_line(CSV_HEADER).encode()
            while (chunk := await asyncio.to_thread(next, chunks, None)) is not None:
                yield "".join(csv_line(csv_cells(row)) for row in chunk).encode()

        stamp = datetime.now(VIETNAM_TZ).strftime("%Y%m%d-%H%M%S")
        return StreamingResponse(
            lines(),
            media_type="text/csv; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="payments-{stamp}.csv"'},
        )

    @api.get(
        TOTALS_PATH,
        summary="Daily totals per agency and gateway (Vietnamese days of payment)",
        openapi_extra={"parameters": TOTALS_PARAMS},
        responses={
            200: {"content": {"application/json": {"schema": TOTALS_SCHEMA}}},
            422: INVALID,
            503: CATCHING_UP,
        },
    )
    async def daily_totals(request: Request, operator: Operator = finance) -> Response:
        today = datetime.now(VIETNAM_TZ).date()
        query = parse_totals_query(params_of(request), operator.scope, today)
        if query.errors:
            return invalid_query(query.errors)
        if not store.complete:
            return catching_up()
        found = await asyncio.to_thread(store.totals, query)
        return JSONResponse(
            {
                "from_date": query.first,
                "to_date": query.last,
                "totals": [totals_view(values) for values in found],
            }
        )
