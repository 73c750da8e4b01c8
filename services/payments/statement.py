"""Daily reconciliation (đối soát) of a gateway's statement against the payments ledger, pure.

Statement file: CSV, UTF-8 (a BOM is tolerated), comma-separated, one header row naming the columns
(any order; extra columns are ignored), then one row per transaction that moved money on the day:

    txn_ref         our order reference (vnp_TxnRef); unique within the file
    transaction_no  the gateway's transaction number (vnp_TransactionNo)
    amount_vnd      integer VND, positive (not x100 as in vnp_Amount)
    status          succeeded | refunded   (the transaction's status when the file was cut)
    paid_at         RFC 3339 with offset, e.g. 2024-03-04T08:15:00+07:00
    bank_code       the paying bank (vnp_BankCode), may be empty

The day is a calendar day of Asia/Ho_Chi_Minh. The statement rows are taken as that day's; the
ledger's entries count for the day by their `paid_at` (the gateway's pay time, so both sides use the
same clock and a payment at 23:59:59 does not slip into the next day). Unpaid ledger entries
(requested, failed, expired) are only looked up, so a gateway success the ledger missed shows as a
status mismatch.

Every difference is reported once, with one of four kinds; a row whose amount and status both differ
gives one difference of each kind.
"""

from __future__ import annotations

import csv
import io
import re
from collections import Counter
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Literal

from services.common.events import FieldError
from services.common.tz import VIETNAM_TZ
from services.payments.domain import Payment, PaymentState, paid_at

STATEMENT_COLUMNS = ("txn_ref", "transaction_no", "amount_vnd", "status", "paid_at", "bank_code")
StatementStatus = Literal["succeeded", "refunded"]
LedgerStatus = Literal["succeeded", "refunded", "unpaid"]
_STATEMENT_STATUSES: frozenset[str] = frozenset({"succeeded", "refunded"})


class DifferenceKind(StrEnum):
    MISSING_IN_LEDGER = "missing_in_ledger"
    MISSING_IN_STATEMENT = "missing_in_statement"
    AMOUNT_MISMATCH = "amount_mismatch"
    STATUS_MISMATCH = "status_mismatch"


@dataclass(frozen=True)
class StatementRow:
    txn_ref: str
    transaction_no: str
    amount_vnd: int
    status: StatementStatus
    paid_at: datetime
    bank_code: str


@dataclass(frozen=True)
class LedgerEntry:
    txn_ref: str
    dossier_id: str
    amount_vnd: int
    status: LedgerStatus
    paid_at: datetime | None


@dataclass(frozen=True)
class Difference:
    kind: DifferenceKind
    txn_ref: str
    dossier_id: str | None  # None when the ledger has no such order
    transaction_no: str | None
    ledger_amount_vnd: int | None
    statement_amount_vnd: int | None
    ledger_status: LedgerStatus | None
    statement_status: StatementStatus | None


@dataclass(frozen=True)
class Reconciliation:
    gateway: str
    day: date
    differences: tuple[Difference, ...]
    statement_rows: int
    ledger_entries: int  # ledger entries paid on the day
    statement_amount_vnd: int
    ledger_amount_vnd: int


class StatementError(ValueError):
    def __init__(self, line: int, column: str | None, problem: str) -> None:
        self.line, self.column, self.problem = line, column, problem
        where = f"line {line}" + (f", column {column}" if column else "")
        super().__init__(f"statement {where}: {problem}")


# --- Statement file -----------------------------------------------------------------------------


def _amount(text: str, line: int) -> int:
    if not text.isascii() or not text.isdigit() or int(text) <= 0:
        raise StatementError(line, "amount_vnd", f"{text!r} is not a positive whole number of VND")
    return int(text)


def _status(text: str, line: int) -> StatementStatus:
    if text == "succeeded":
        return "succeeded"
    if text == "refunded":
        return "refunded"
    raise StatementError(line, "status", f"{text!r} is not one of {sorted(_STATEMENT_STATUSES)}")


def _timestamp(text: str, line: int) -> datetime:
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise StatementError(line, "paid_at", f"{text!r} is not an RFC 3339 time") from None
    if at.tzinfo is None:
        raise StatementError(line, "paid_at", f"{text!r} has no offset")
    return at


def parse_statement(text: str) -> tuple[StatementRow, ...]:
    """Rows of a statement file; StatementError names the line and column of the first problem."""
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff")))
    missing = [c for c in STATEMENT_COLUMNS if c not in (reader.fieldnames or ())]
    if missing:
        raise StatementError(1, None, f"header lacks {', '.join(missing)}")
    rows: list[StatementRow] = []
    seen: set[str] = set()
    for record in reader:
        line = reader.line_num
        values = {c: (record.get(c) or "").strip() for c in STATEMENT_COLUMNS}
        for column in ("txn_ref", "transaction_no", "amount_vnd", "status", "paid_at"):
            if not values[column]:
                raise StatementError(line, column, "empty")
        if values["txn_ref"] in seen:
            raise StatementError(line, "txn_ref", f"{values['txn_ref']!r} appears twice")
        seen.add(values["txn_ref"])
        rows.append(
            StatementRow(
                txn_ref=values["txn_ref"],
                transaction_no=values["transaction_no"],
                amount_vnd=_amount(values["amount_vnd"], line),
                status=_status(values["status"], line),
                paid_at=_timestamp(values["paid_at"], line),
                bank_code=values["bank_code"],
            )
        )
    return tuple(rows)


def statement_csv(rows: Iterable[StatementRow]) -> str:
    """The file `parse_statement` reads (the sandbox writes its statements with this)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(STATEMENT_COLUMNS)
    for r in rows:
        stamp = r.paid_at.isoformat()
        writer.writerow([r.txn_ref, r.transaction_no, r.amount_vnd, r.status, stamp, r.bank_code])
    return out.getvalue()


# --- Ledger -------------------------------------------------------------------------------------

_LEDGER_STATUS: Mapping[PaymentState, LedgerStatus] = {
    PaymentState.SUCCEEDED: "succeeded",
    # The gateway still holds the money until the refund goes through.
    PaymentState.REFUND_REQUIRED: "succeeded",
    PaymentState.REFUNDED: "refunded",
    # Part of the money, or none yet, went back: the gateway's transaction is still a success.
    PaymentState.REFUND_REQUESTED: "succeeded",
    PaymentState.PARTIALLY_REFUNDED: "succeeded",
    PaymentState.REFUND_FAILED: "succeeded",
    PaymentState.REQUESTED: "unpaid",
    PaymentState.FAILED: "unpaid",
    PaymentState.EXPIRED: "unpaid",
}


def ledger_entry(payment: Payment) -> LedgerEntry:
    return LedgerEntry(
        txn_ref=payment.txn_ref,
        dossier_id=payment.dossier_id,
        amount_vnd=payment.amount_vnd,
        status=_LEDGER_STATUS[payment.state],
        paid_at=paid_at(payment),
    )


def local_day(at: datetime) -> date:
    return at.astimezone(VIETNAM_TZ).date()


# --- Comparison ---------------------------------------------------------------------------------


def _unique(entries: Iterable[LedgerEntry]) -> dict[str, LedgerEntry]:
    by_ref: dict[str, LedgerEntry] = {}
    for entry in entries:
        if entry.txn_ref in by_ref:
            raise ValueError(f"ledger holds txn_ref {entry.txn_ref!r} twice")
        by_ref[entry.txn_ref] = entry
    return by_ref


def _paid_on(entry: LedgerEntry, day: date) -> bool:
    paid = entry.paid_at
    return entry.status != "unpaid" and paid is not None and local_day(paid) == day


def _compare(row: StatementRow, entry: LedgerEntry | None) -> list[Difference]:
    def diff(kind: DifferenceKind) -> Difference:
        return Difference(
            kind=kind,
            txn_ref=row.txn_ref,
            dossier_id=entry.dossier_id if entry else None,
            transaction_no=row.transaction_no,
            ledger_amount_vnd=entry.amount_vnd if entry else None,
            statement_amount_vnd=row.amount_vnd,
            ledger_status=entry.status if entry else None,
            statement_status=row.status,
        )

    if entry is None:
        return [diff(DifferenceKind.MISSING_IN_LEDGER)]
    found = []
    if entry.amount_vnd != row.amount_vnd:
        found.append(diff(DifferenceKind.AMOUNT_MISMATCH))
    if entry.status != row.status:
        found.append(diff(DifferenceKind.STATUS_MISMATCH))
    return found


def reconcile(
    day: date,
    statement: Iterable[StatementRow],
    ledger: Iterable[LedgerEntry],
    *,
    gateway: str = "vnpay",
) -> Reconciliation:
    """Compare the day's statement with the ledger (which may hold more than that day)."""
    rows = tuple(statement)
    if len({r.txn_ref for r in rows}) != len(rows):
        raise ValueError("statement holds a txn_ref twice")
    by_ref = _unique(ledger)
    on_day = [e for e in by_ref.values() if _paid_on(e, day)]
    in_statement = {r.txn_ref for r in rows}

    differences = [d for r in rows for d in _compare(r, by_ref.get(r.txn_ref))]
    differences += [
        Difference(
            kind=DifferenceKind.MISSING_IN_STATEMENT,
            txn_ref=e.txn_ref,
            dossier_id=e.dossier_id,
            transaction_no=None,
            ledger_amount_vnd=e.amount_vnd,
            statement_amount_vnd=None,
            ledger_status=e.status,
            statement_status=None,
        )
        for e in on_day
        if e.txn_ref not in in_statement
    ]
    kinds = list(DifferenceKind)
    differences.sort(key=lambda d: (d.txn_ref, kinds.index(d.kind)))
    return Reconciliation(
        gateway=gateway,
        day=day,
        differences=tuple(differences),
        statement_rows=len(rows),
        ledger_entries=len(on_day),
        statement_amount_vnd=sum(r.amount_vnd for r in rows),
        ledger_amount_vnd=sum(e.amount_vnd for e in on_day),
    )


# --- Outputs ------------------------------------------------------------------------------------

REPORT_COLUMNS = (
    "kind",
    "txn_ref",
    "dossier_id",
    "transaction_no",
    "ledger_amount_vnd",
    "statement_amount_vnd",
    "ledger_status",
    "statement_status",
)


def report_rows(result: Reconciliation) -> list[dict[str, str]]:
    """One row per difference, every REPORT_COLUMNS key present ('' for unknown)."""

    def cell(value: object) -> str:
        return "" if value is None else str(value)

    return [
        {
            "kind": d.kind.value,
            "txn_ref": d.txn_ref,
            "dossier_id": cell(d.dossier_id),
            "transaction_no": cell(d.transaction_no),
            "ledger_amount_vnd": cell(d.ledger_amount_vnd),
            "statement_amount_vnd": cell(d.statement_amount_vnd),
            "ledger_status": cell(d.ledger_status),
            "statement_status": cell(d.statement_status),
        }
        for d in result.differences
    ]


def report_csv(result: Reconciliation) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(report_rows(result))
    return out.getvalue()


def matched(result: Reconciliation) -> int:
    """Statement rows that agree with the ledger (no difference names their txn ref)."""
    differing = {
        d.txn_ref for d in result.differences if d.kind != DifferenceKind.MISSING_IN_STATEMENT
    }
    return result.statement_rows - len(differing)


def summary(result: Reconciliation) -> dict[str, object]:
    """JSON-able summary: counts per kind (all kinds present) and the day's totals."""
    counts = Counter(d.kind for d in result.differences)
    return {
        "gateway": result.gateway,
        "date": result.day.isoformat(),
        "statement_rows": result.statement_rows,
        "ledger_entries": result.ledger_entries,
        "matched": matched(result),
        "differences": len(result.differences),
        "by_kind": {kind.value: counts[kind] for kind in DifferenceKind},
        "totals": {
            "statement_amount_vnd": result.statement_amount_vnd,
            "ledger_amount_vnd": result.ledger_amount_vnd,
        },
    }


# --- A run asked for over HTTP ------------------------------------------------------------------

_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


@dataclass(frozen=True)
class RunRequest:
    gateway: str
    day: date


def run_request(
    body: object, *, today: date, gateways: Collection[str], default_gateway: str
) -> RunRequest | list[FieldError]:
    """The run a request body `{"date": "YYYY-MM-DD", "gateway"?}` asks for, or what is wrong
    with it, field by field. `today` is the Vietnamese calendar day: a later day has no
    statement yet; the default gateway is taken when none is named."""
    if not isinstance(body, Mapping):
        return [
            FieldError(pointer="", detail='the body must be a JSON object {"date": "YYYY-MM-DD"}')
        ]
    errors: list[FieldError] = []
    day: date | None = None
    text = body.get("date")
    if text is None:
        errors.append(
            FieldError(pointer="/date", detail="required: the day to reconcile, YYYY-MM-DD")
        )
    elif not isinstance(text, str) or not _DAY.fullmatch(text):
        errors.append(
            FieldError(pointer="/date", detail=f"{text!r} is not a day written YYYY-MM-DD")
        )
    else:
        try:
            day = date.fromisoformat(text)
        except ValueError:
            errors.append(FieldError(pointer="/date", detail=f"{text!r} is not a calendar day"))
        else:
            if day > today:
                errors.append(
                    FieldError(
                        pointer="/date",
                        detail=f"{text} is in the future (today is {today.isoformat()})",
                    )
                )
    gateway = body.get("gateway", default_gateway)
    if not isinstance(gateway, str) or gateway not in gateways:
        errors.append(
            FieldError(
                pointer="/gateway",
                detail=f"{gateway!r} is not a gateway; known: {', '.join(sorted(gateways))}",
            )
        )
    if errors or day is None or not isinstance(gateway, str):
        return errors
    return RunRequest(gateway=gateway, day=day)
