"""Finance reports, the pure part: one report row per payment folded from `payment.events`, the
query parameters of `GET /v1/payments` (and its CSV and totals) checked into values, the SQL
they stand for, and the opaque cursor. No I/O: `report_store.py` runs the SQL on SQLite.

- A row is folded from the payment's events by their `data.version` (the ledger's version: a
  repeat or an older copy changes nothing): `payment.requested` gives the agency and the time of
  creation, the first move out of `requested` the time of settlement, `paid_at` the time the
  money arrived (its Vietnamese day is the day of the totals), `payment.refunded` the refunded
  amount. Times are kept as integer microseconds since the epoch.
- The list is ordered newest first by (created_at, dossier_id), a key no later event changes;
  a page's cursor is the last row's key, so the next page starts strictly after it: paging stays
  stable (nothing repeated, nothing skipped) while new payments arrive.
- `from_date`/`to_date` bound the time of **creation** (the order's opening); a plain date is a
  whole Vietnamese day (`to_date` included), a timestamp needs an offset (`to_date` excluded).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import orjson

from services.common.params import ParamError
from services.common.tz import VIETNAM_TZ
from services.payments.domain import PaymentState

# payment.<type> -> the state it announces (other types, such as mismatches, fold nothing)
STATE_OF_TYPE: Mapping[str, PaymentState] = {
    f"payment.{state.value}": state for state in PaymentState
}
STATES = frozenset(state.value for state in PaymentState)
MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
MAX_TOTALS_DAYS = 366
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(moment: datetime) -> int:
    """Microseconds since the epoch (exact, unlike a float timestamp)."""
    delta = moment - EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_micros(value: int) -> datetime:
    return (EPOCH + timedelta(microseconds=value)).astimezone(VIETNAM_TZ)


def vietnam_day(value: int) -> str:
    return from_micros(value).date().isoformat()


@dataclass(frozen=True)
class ReportRow:
    """One payment as the reports show it."""

    dossier_id: str
    agency_code: str
    gateway: str
    txn_ref: str
    amount_vnd: int
    currency: str
    state: PaymentState
    version: int
    created_at: int  # microseconds; the order's opening (the event time of payment.requested)
    updated_at: int
    settled_at: int | None = None  # first move out of `requested`
    paid_at: int | None = None  # the money arrived
    refunded_vnd: int = 0

    @property
    def paid_day(self) -> str | None:
        return None if self.paid_at is None else vietnam_day(self.paid_at)


def _time(value: object) -> int | None:
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return micros(moment) if moment.tzinfo is not None else None


def fold(row: ReportRow | None, event: Mapping[str, Any]) -> ReportRow | None:
    """The row after `event` (a decoded CloudEvent of `payment.events`), or None when it changes
    nothing: another type, a version already folded, data without what a row needs."""
    state = STATE_OF_TYPE.get(str(event.get("type")))
    data = event.get("data")
    at = _time(event.get("time"))
    if state is None or not isinstance(data, Mapping) or at is None:
        return None
    if data.get("state") in STATES:  # refunds: `payment.refunded` is also a partial refund
        state = PaymentState(data["state"])
    version = data.get("version")
    dossier_id = data.get("dossier_id") or event.get("subject")
    if not isinstance(version, int) or not isinstance(dossier_id, str) or not dossier_id:
        return None
    if row is not None and version <= row.version:
        return None
    amount = data.get("amount_vnd")
    if row is None:
        if not isinstance(amount, int):
            return None
        row = ReportRow(
            dossier_id=dossier_id,
            agency_code=str(data.get("agency_code") or ""),
            gateway=str(data.get("gateway") or ""),
            txn_ref=str(data.get("txn_ref") or ""),
            amount_vnd=amount,
            currency=str(data.get("currency") or "VND"),
            state=state,
            version=version,
            created_at=at,
            updated_at=at,
        )
    else:
        row = replace(row, state=state, version=version, updated_at=at)
    if state == PaymentState.REQUESTED:
        row = replace(row, agency_code=str(data.get("agency_code") or row.agency_code))
        row = replace(row, created_at=at)
    elif row.settled_at is None:
        row = replace(row, settled_at=at)
    if row.paid_at is None and state in (PaymentState.SUCCEEDED, PaymentState.REFUND_REQUIRED):
        row = replace(row, paid_at=_time(data.get("paid_at")) or at)
    refunded = data.get("refunded_vnd")
    if isinstance(refunded, int):
        row = replace(row, refunded_vnd=refunded)
    elif state == PaymentState.REFUNDED:
        row = replace(row, refunded_vnd=row.amount_vnd)
    return row


# --- the query ----------------------------------------------------------------------------------


Key = tuple[int, str]  # (created_at, dossier_id), the order of the list


@dataclass(frozen=True)
class ReportQuery:
    """What a list (or its CSV) asks for. `agencies` None: every agency; empty: none at all."""

    agencies: frozenset[str] | None = None
    states: frozenset[str] = frozenset()
    gateways: frozenset[str] = frozenset()
    created_from: int | None = None  # included
    created_to: int | None = None  # excluded
    amount_min: int | None = None
    amount_max: int | None = None
    reference: str | None = None  # a dossier id or a gateway txn ref
    limit: int = DEFAULT_LIMIT
    after: Key | None = None  # the cursor: rows strictly after this key
    errors: tuple[ParamError, ...] = field(default=(), compare=False)


def encode_cursor(key: Key) -> str:
    return base64.urlsafe_b64encode(orjson.dumps([key[0], key[1]])).decode().rstrip("=")


def decode_cursor(cursor: str) -> Key | None:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        value = orjson.loads(raw)
    except (binascii.Error, ValueError):
        return None
    if (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], int)
        and isinstance(value[1], str)
    ):
        return value[0], value[1]
    return None


def _day_or_instant(name: str, raw: str, *, end: bool, errors: list[ParamError]) -> int | None:
    text = raw.strip().replace(" ", "+")
    try:
        day = date.fromisoformat(text)
    except ValueError:
        day = None
    if day is not None and len(text) == 10:
        start = datetime.combine(day + timedelta(days=1 if end else 0), datetime.min.time())
        return micros(start.replace(tzinfo=VIETNAM_TZ))
    try:
        moment = datetime.fromisoformat(text.upper())
    except ValueError:
        errors.append(ParamError(name, f"not a date (YYYY-MM-DD) nor an RFC 3339 time: {raw!r}"))
        return None
    if moment.tzinfo is None:
        errors.append(ParamError(name, "a time needs an offset (Z or +07:00)"))
        return None
    return micros(moment)


def _amount(name: str, raw: str | None, errors: list[ParamError]) -> int | None:
    if raw is None:
        return None
    if not raw.isdigit() or len(raw) > 15:
        errors.append(ParamError(name, f"not a whole number of VND: {raw!r}"))
        return None
    return int(raw)


def _values(params: Mapping[str, Sequence[str]], name: str) -> list[str]:
    """A repeatable parameter, also given comma-separated."""
    return [v.strip() for raw in params.get(name, ()) for v in raw.split(",") if v.strip()]


def _one(params: Mapping[str, Sequence[str]], name: str) -> str | None:
    found = params.get(name)
    return found[-1] if found else None


def parse_report_query(
    params: Mapping[str, Sequence[str]],
    scope: frozenset[str] | None,
    *,
    paged: bool = True,
) -> ReportQuery:
    """The list query `params` (name -> values) ask for, within the operator's agency `scope`
    (None: every agency). Problems are in `.errors` (one per parameter), never raised."""
    errors: list[ParamError] = []
    agencies: frozenset[str] | None = frozenset(_values(params, "agency")) or None
    if scope is not None:
        agencies = scope if agencies is None else agencies & scope
    states = frozenset(_values(params, "state"))
    unknown = sorted(states - {s.value for s in PaymentState})
    if unknown:
        known = ", ".join(s.value for s in PaymentState)
        errors.append(ParamError("state", f"unknown {', '.join(unknown)}; one of {known}"))
    created_from = created_to = None
    if (raw := _one(params, "from_date")) is not None:
        created_from = _day_or_instant("from_date", raw, end=False, errors=errors)
    if (raw := _one(params, "to_date")) is not None:
        created_to = _day_or_instant("to_date", raw, end=True, errors=errors)
    if created_from is not None and created_to is not None and created_to < created_from:
        errors.append(ParamError("to_date", "must not be before from_date"))
    amount_min = _amount("amount_min", _one(params, "amount_min"), errors)
    amount_max = _amount("amount_max", _one(params, "amount_max"), errors)
    if amount_min is not None and amount_max is not None and amount_max < amount_min:
        errors.append(ParamError("amount_max", "must not be below amount_min"))
    limit = DEFAULT_LIMIT
    after = None
    if paged:
        if (raw := _one(params, "limit")) is not None:
            if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
                errors.append(ParamError("limit", f"a whole number from 1 to {MAX_LIMIT}"))
            else:
                limit = int(raw)
        if (raw := _one(params, "cursor")) is not None:
            after = decode_cursor(raw)
            if after is None:
                errors.append(ParamError("cursor", "not a cursor this service gave"))
    reference = (_one(params, "reference") or "").strip() or None
    return ReportQuery(
        agencies=agencies,
        states=states,
        gateways=frozenset(_values(params, "gateway")),
        created_from=created_from,
        created_to=created_to,
        amount_min=amount_min,
        amount_max=amount_max,
        reference=reference,
        limit=limit,
        after=after,
        errors=tuple(errors),
    )


def _in(column: str, values: Iterable[str]) -> tuple[str, list[Any]]:
    ordered = sorted(values)
    if len(ordered) == 1:
        return f"{column} = ?", ordered
    return f"{column} IN ({', '.join('?' * len(ordered))})", list(ordered)


def split_on(query: ReportQuery) -> list[ReportQuery]:
    """The query as one query per agency when it names several: each then walks its own
    (agency, created_at, dossier_id) index in order, and the pages are merged (a single query
    with `IN` would sort every matching row)."""
    if query.agencies is None or len(query.agencies) < 2:
        return [query]
    return [replace(query, agencies=frozenset({agency})) for agency in sorted(query.agencies)]


def page_sql(query: ReportQuery) -> tuple[str, list[Any]]:
    """`SELECT` of one page (limit + 1 rows, to know whether another follows), newest first."""
    clauses: list[str] = []
    args: list[Any] = []

    def add(clause: str, *values: Any) -> None:
        clauses.append(clause)
        args.extend(values)

    if query.agencies is not None:
        if not query.agencies:
            add("0")
        else:
            clause, values = _in("agency_code", query.agencies)
            add(clause, *values)
    for column, wanted in (("state", query.states), ("gateway", query.gateways)):
        if wanted:
            clause, values = _in(column, wanted)
            add(clause, *values)
    if query.created_from is not None:
        add("created_at >= ?", query.created_from)
    if query.created_to is not None:
        add("created_at < ?", query.created_to)
    if query.amount_min is not None:
        add("amount_vnd >= ?", query.amount_min)
    if query.amount_max is not None:
        add("amount_vnd <= ?", query.amount_max)
    if query.reference is not None:
        add("(dossier_id = ? OR txn_ref = ?)", query.reference, query.reference)
    if query.after is not None:
        add("(created_at, dossier_id) < (?, ?)", query.after[0], query.after[1])
    where = " AND ".join(clauses) or "1"
    sql = (
        f"SELECT {', '.join(COLUMNS)} FROM payments WHERE {where} "
        "ORDER BY created_at DESC, dossier_id DESC LIMIT ?"
    )
    return sql, [*args, query.limit + 1]


COLUMNS = (
    "dossier_id",
    "agency_code",
    "gateway",
    "txn_ref",
    "amount_vnd",
    "currency",
    "state",
    "version",
    "created_at",
    "updated_at",
    "settled_at",
    "paid_at",
    "refunded_vnd",
)


def row_values(row: ReportRow) -> tuple[Any, ...]:
    """The row in `COLUMNS` order, then its paid day (the stored columns)."""
    return (
        row.dossier_id,
        row.agency_code,
        row.gateway,
        row.txn_ref,
        row.amount_vnd,
        row.currency,
        row.state.value,
        row.version,
        row.created_at,
        row.updated_at,
        row.settled_at,
        row.paid_at,
        row.refunded_vnd,
        row.paid_day,
    )


def row_of(values: Sequence[Any]) -> ReportRow:
    """A row from a `SELECT` of `COLUMNS`."""
    named = dict(zip(COLUMNS, values, strict=False))
    named["state"] = PaymentState(named["state"])
    return ReportRow(**named)


def merged_page(query: ReportQuery, pages: Iterable[Sequence[ReportRow]]) -> Page:
    """One page from the pages of `split_on(query)` (each up to limit + 1 rows)."""
    rows = sorted(
        (row for page in pages for row in page),
        key=key_of,
        reverse=True,
    )
    shown = rows[: query.limit]
    more = len(rows) > query.limit
    return Page(shown, encode_cursor(key_of(shown[-1])) if more and shown else None)


def key_of(row: ReportRow) -> Key:
    return row.created_at, row.dossier_id


@dataclass(frozen=True)
class Page:
    rows: list[ReportRow]
    next_cursor: str | None


def _iso(value: int | None) -> str | None:
    return None if value is None else from_micros(value).isoformat()


def row_view(row: ReportRow) -> dict[str, Any]:
    """A row as the list answers it (times in Vietnam's offset)."""
    return {
        "dossier_id": row.dossier_id,
        "agency_code": row.agency_code,
        "state": row.state.value,
        "gateway": row.gateway,
        "txn_ref": row.txn_ref,
        "amount_vnd": row.amount_vnd,
        "refunded_vnd": row.refunded_vnd,
        "currency": row.currency,
        "created_at": _iso(row.created_at),
        "settled_at": _iso(row.settled_at),
        "paid_at": _iso(row.paid_at),
        "updated_at": _iso(row.updated_at),
        "version": row.version,
    }


CSV_HEADER = (
    "dossier_id",
    "agency_code",
    "state",
    "gateway",
    "txn_ref",
    "amount_vnd",
    "refunded_vnd",
    "currency",
    "created_at",
    "settled_at",
    "paid_at",
)
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _cell(value: object) -> str:
    """A CSV cell; text a spreadsheet would run as a formula is quoted with a leading '."""
    if value is None:
        return ""
    text = str(value)
    return "'" + text if isinstance(value, str) and text.startswith(_FORMULA) else text


def csv_cells(row: ReportRow) -> list[str]:
    view = row_view(row)
    return [_cell(view[name]) for name in CSV_HEADER]


# --- daily totals -------------------------------------------------------------------------------


@dataclass(frozen=True)
class TotalsQuery:
    """Days [first, last] of money received (Vietnamese days), by agency and gateway."""

    first: str
    last: str
    agencies: frozenset[str] | None
    gateways: frozenset[str]
    errors: tuple[ParamError, ...] = field(default=(), compare=False)


def parse_totals_query(
    params: Mapping[str, Sequence[str]], scope: frozenset[str] | None, today: date
) -> TotalsQuery:
    """`from_date`/`to_date` (plain dates, both included; default: today), agencies, gateways."""
    errors: list[ParamError] = []
    days: dict[str, date] = {}
    for name in ("from_date", "to_date"):
        raw = _one(params, name)
        try:
            days[name] = date.fromisoformat(raw) if raw is not None else today
        except ValueError:
            errors.append(ParamError(name, f"not a date (YYYY-MM-DD): {raw!r}"))
    first, last = days.get("from_date", today), days.get("to_date", today)
    if last < first:
        errors.append(ParamError("to_date", "must not be before from_date"))
    elif (last - first).days >= MAX_TOTALS_DAYS:
        errors.append(ParamError("to_date", f"at most {MAX_TOTALS_DAYS} days at once"))
    agencies: frozenset[str] | None = frozenset(_values(params, "agency")) or None
    if scope is not None:
        agencies = scope if agencies is None else agencies & scope
    return TotalsQuery(
        first.isoformat(),
        last.isoformat(),
        agencies,
        frozenset(_values(params, "gateway")),
        tuple(errors),
    )


def totals_sql(query: TotalsQuery) -> tuple[str, list[Any]]:
    clauses = ["paid_day BETWEEN ? AND ?"]
    args: list[Any] = [query.first, query.last]
    if query.agencies is not None:
        if query.agencies:
            clause, values = _in("agency_code", query.agencies)
            clauses.append(clause)
            args.extend(values)
        else:
            clauses.append("0")
    if query.gateways:
        clause, values = _in("gateway", query.gateways)
        clauses.append(clause)
        args.extend(values)
    sql = (
        "SELECT paid_day, agency_code, gateway, COUNT(*), SUM(amount_vnd), SUM(refunded_vnd) "
        f"FROM payments WHERE {' AND '.join(clauses)} "
        "GROUP BY paid_day, agency_code, gateway ORDER BY paid_day, agency_code, gateway"
    )
    return sql, args


def totals_view(values: Sequence[Any]) -> dict[str, Any]:
    day, agency, gateway, count, paid, refunded = values
    return {
        "day": day,
        "agency_code": agency,
        "gateway": gateway,
        "paid_count": count,
        "paid_vnd": paid,
        "refunded_vnd": refunded,
        "net_vnd": paid - refunded,
    }
