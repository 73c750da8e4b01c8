"""Daily reconciliation: every difference exactly once, and nothing on a matching day."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.events import FieldError
from services.common.tz import VIETNAM_TZ
from services.payments.domain import (
    Applied,
    Cause,
    GatewayAccount,
    PaymentState,
    apply,
    open_payment,
    order_for,
)
from services.payments.statement import (
    REPORT_COLUMNS,
    DifferenceKind,
    LedgerEntry,
    RunRequest,
    StatementError,
    StatementRow,
    StatementStatus,
    ledger_entry,
    matched,
    parse_statement,
    reconcile,
    report_csv,
    report_rows,
    run_request,
    statement_csv,
    summary,
)

K = DifferenceKind
DAY = date(2024, 3, 4)
NOON = datetime(2024, 3, 4, 12, 0, tzinfo=VIETNAM_TZ)


def pair(
    i: int, amount: int = 150_000, status: str = "succeeded", at: datetime = NOON
) -> tuple[StatementRow, LedgerEntry]:
    ref = f"REF{i:04d}"
    row = StatementRow(ref, f"{14_000_000 + i}", amount, status, at, "NCB")  # type: ignore[arg-type]
    entry = LedgerEntry(ref, f"D-{i}", amount, status, at)  # type: ignore[arg-type]
    return row, entry


def matching_day(n: int) -> tuple[list[StatementRow], list[LedgerEntry]]:
    pairs = [pair(i, 10_000 * (i + 1), "refunded" if i % 4 == 3 else "succeeded") for i in range(n)]
    return [r for r, _ in pairs], [e for _, e in pairs]


def kinds(statement: list[StatementRow], ledger: list[LedgerEntry]) -> list[tuple[K, str]]:
    return [(d.kind, d.txn_ref) for d in reconcile(DAY, statement, ledger).differences]


def test_exact_match_reports_nothing() -> None:
    statement, ledger = matching_day(8)
    result = reconcile(DAY, statement, ledger)
    assert result.differences == ()
    assert report_csv(result) == ",".join(REPORT_COLUMNS) + "\n"
    assert summary(result) == {
        "gateway": "vnpay",
        "date": "2024-03-04",
        "statement_rows": 8,
        "ledger_entries": 8,
        "matched": 8,
        "differences": 0,
        "by_kind": {k.value: 0 for k in K},
        "totals": {"statement_amount_vnd": 360_000, "ledger_amount_vnd": 360_000},
    }


def test_missing_in_ledger() -> None:
    statement, ledger = matching_day(3)
    assert kinds(statement, ledger[1:]) == [(K.MISSING_IN_LEDGER, "REF0000")]
    [diff] = reconcile(DAY, statement, ledger[1:]).differences
    assert diff.dossier_id is None and diff.statement_amount_vnd == 10_000


def test_missing_in_statement() -> None:
    statement, ledger = matching_day(3)
    assert kinds(statement[:2], ledger) == [(K.MISSING_IN_STATEMENT, "REF0002")]


def test_amount_mismatch() -> None:
    statement, ledger = matching_day(3)
    statement[1] = dataclasses.replace(statement[1], amount_vnd=20_001)
    [diff] = reconcile(DAY, statement, ledger).differences
    assert (diff.kind, diff.txn_ref, diff.dossier_id) == (K.AMOUNT_MISMATCH, "REF0001", "D-1")
    assert (diff.ledger_amount_vnd, diff.statement_amount_vnd) == (20_000, 20_001)


def test_status_mismatch() -> None:
    statement, ledger = matching_day(3)
    statement[0] = dataclasses.replace(statement[0], status="refunded")
    assert kinds(statement, ledger) == [(K.STATUS_MISMATCH, "REF0000")]


def test_amount_and_status_both_differ_gives_one_of_each() -> None:
    statement, ledger = matching_day(2)
    statement[0] = dataclasses.replace(statement[0], status="refunded", amount_vnd=1)
    assert kinds(statement, ledger) == [
        (K.AMOUNT_MISMATCH, "REF0000"),
        (K.STATUS_MISMATCH, "REF0000"),
    ]


def test_success_the_ledger_missed_is_a_status_mismatch() -> None:
    row, entry = pair(1)
    unpaid = dataclasses.replace(entry, status="unpaid", paid_at=None)
    [diff] = reconcile(DAY, [row], [unpaid]).differences
    assert (diff.kind, diff.ledger_status, diff.statement_status) == (
        K.STATUS_MISMATCH,
        "unpaid",
        "succeeded",
    )


def test_unpaid_and_other_days_are_not_expected_in_the_statement() -> None:
    _, unpaid = pair(1)
    _, yesterday = pair(2, at=NOON - timedelta(days=1))
    _, tomorrow = pair(3, at=NOON + timedelta(days=1))
    ledger = [dataclasses.replace(unpaid, status="unpaid", paid_at=None), yesterday, tomorrow]
    assert reconcile(DAY, [], ledger).differences == ()


def test_day_boundaries_are_those_of_hanoi() -> None:
    last_second = datetime(2024, 3, 4, 16, 59, 59, tzinfo=UTC)  # 23:59:59 in Hanoi
    next_day = datetime(2024, 3, 4, 17, 0, 0, tzinfo=UTC)  # 00:00:00 on the 5th in Hanoi
    first_second = datetime(2024, 3, 3, 17, 0, 0, tzinfo=UTC)  # 00:00:00 on the 4th in Hanoi
    ledger = [pair(1, at=last_second)[1], pair(2, at=next_day)[1], pair(3, at=first_second)[1]]
    assert kinds([], ledger) == [
        (K.MISSING_IN_STATEMENT, "REF0001"),
        (K.MISSING_IN_STATEMENT, "REF0003"),
    ]


def test_duplicates_are_refused() -> None:
    row, entry = pair(1)
    with pytest.raises(ValueError, match="twice"):
        reconcile(DAY, [row, row], [entry])
    with pytest.raises(ValueError, match="twice"):
        reconcile(DAY, [row], [entry, entry])


def test_ledger_entry_from_payments() -> None:
    data = {
        "dossier_id": "D-1",
        "agency_code": "A",
        "fee": {"amount_vnd": 50_000, "method": "online"},
    }
    order = order_for(
        data, account=GatewayAccount("vnpay", "M"), submitted_at=NOON - timedelta(hours=1)
    )
    assert order is not None
    payment = open_payment(order, "ce").payment
    assert ledger_entry(payment).status == "unpaid"
    expired = apply(payment, Cause.EXPIRY, NOON, "timer")
    assert isinstance(expired, Applied)
    late = apply(expired.payment, Cause.GATEWAY_SUCCESS, NOON + timedelta(minutes=1), "t1")
    assert isinstance(late, Applied) and late.payment.state == PaymentState.REFUND_REQUIRED
    entry = ledger_entry(late.payment)
    # The gateway holds the money until the refund: it counts as succeeded.
    assert entry == LedgerEntry(
        order.txn_ref, "D-1", 50_000, "succeeded", NOON + timedelta(minutes=1)
    )
    refunded = apply(late.payment, Cause.REFUND_CONFIRMED, NOON + timedelta(days=1), "r1")
    assert isinstance(refunded, Applied)
    assert ledger_entry(refunded.payment).status == "refunded"
    assert ledger_entry(refunded.payment).paid_at == NOON + timedelta(minutes=1)


# --- Files and outputs --------------------------------------------------------------------------

SAMPLE = (
    "\ufefftxn_ref,transaction_no,amount_vnd,status,paid_at,bank_code,extra\n"
    "REF0001,14000001,150000,succeeded,2024-03-04T08:15:00+07:00,NCB,x\n"
    "REF0002,14000002,20000,refunded,2024-03-04T01:15:00+00:00,,y\n"
)


def test_parse_statement() -> None:
    rows = parse_statement(SAMPLE)
    assert rows == (
        StatementRow(
            "REF0001",
            "14000001",
            150_000,
            "succeeded",
            datetime(2024, 3, 4, 8, 15, tzinfo=VIETNAM_TZ),
            "NCB",
        ),
        StatementRow(
            "REF0002",
            "14000002",
            20_000,
            "refunded",
            datetime(2024, 3, 4, 1, 15, tzinfo=UTC),
            "",
        ),
    )
    assert parse_statement(statement_csv(rows)) == rows


@pytest.mark.parametrize(
    ("text", "line", "column"),
    [
        ("txn_ref,amount_vnd\n", 1, None),
        (SAMPLE.replace("150000", "150000.5"), 2, "amount_vnd"),
        (SAMPLE.replace("150000", "0"), 2, "amount_vnd"),
        (SAMPLE.replace("refunded", "pending"), 3, "status"),
        (SAMPLE.replace("2024-03-04T08:15:00+07:00", "2024-03-04T08:15:00"), 2, "paid_at"),
        (SAMPLE.replace("2024-03-04T08:15:00+07:00", "04/03/2024"), 2, "paid_at"),
        (SAMPLE.replace("REF0002", "REF0001"), 3, "txn_ref"),
        (SAMPLE.replace("14000002", ""), 3, "transaction_no"),
    ],
)
def test_statement_errors_name_line_and_column(text: str, line: int, column: str | None) -> None:
    with pytest.raises(StatementError) as caught:
        parse_statement(text)
    assert (caught.value.line, caught.value.column) == (line, column)
    assert f"line {line}" in str(caught.value)


def test_report_and_summary() -> None:
    statement, ledger = matching_day(4)
    statement[0] = dataclasses.replace(statement[0], amount_vnd=1)
    extra_row, _ = pair(99)
    result = reconcile(DAY, [*statement[:3], extra_row], ledger, gateway="vnpay")
    rows = report_rows(result)
    assert [(r["kind"], r["txn_ref"]) for r in rows] == [
        ("amount_mismatch", "REF0000"),
        ("missing_in_statement", "REF0003"),
        ("missing_in_ledger", "REF0099"),
    ]
    assert rows[2]["dossier_id"] == "" and rows[0]["dossier_id"] == "D-0"
    assert all(set(r) == set(REPORT_COLUMNS) for r in rows)
    lines = report_csv(result).splitlines()
    assert lines[0] == ",".join(REPORT_COLUMNS)
    assert lines[1] == "amount_mismatch,REF0000,D-0,14000000,10000,1,succeeded,succeeded"
    body = summary(result)
    assert json.loads(json.dumps(body)) == body
    assert body["differences"] == 3
    assert body["by_kind"] == {
        "missing_in_ledger": 1,
        "missing_in_statement": 1,
        "amount_mismatch": 1,
        "status_mismatch": 0,
    }
    assert body["totals"] == {"statement_amount_vnd": 200_001, "ledger_amount_vnd": 100_000}


# --- Property: exactly the injected differences -------------------------------------------------


@st.composite
def day_with_injected_differences(
    draw: st.DrawFn,
) -> tuple[list[StatementRow], list[LedgerEntry], set[tuple[K, str]]]:
    n = draw(st.integers(min_value=0, max_value=40))
    statement, ledger = matching_day(n)
    # Noise that must not count: unpaid orders and payments of other days.
    unpaid = [pair(500 + i)[1] for i in range(3)]
    ledger += [dataclasses.replace(e, status="unpaid", paid_at=None) for e in unpaid]
    ledger.append(pair(600, at=NOON + timedelta(days=1))[1])
    targets = draw(st.lists(st.integers(0, max(n - 1, 0)), unique=True, max_size=n))
    injected: set[tuple[K, str]] = set()
    dropped_rows: set[int] = set()
    dropped_entries: set[int] = set()
    for i in targets:
        kind = draw(st.sampled_from(list(K)))
        ref = statement[i].txn_ref
        injected.add((kind, ref))
        if kind == K.MISSING_IN_LEDGER:
            dropped_entries.add(i)
        elif kind == K.MISSING_IN_STATEMENT:
            dropped_rows.add(i)
        elif kind == K.AMOUNT_MISMATCH:
            changed = statement[i].amount_vnd + draw(st.integers(1, 1_000_000))
            statement[i] = dataclasses.replace(statement[i], amount_vnd=changed)
        else:
            flipped: StatementStatus = (
                "refunded" if statement[i].status == "succeeded" else "succeeded"
            )
            statement[i] = dataclasses.replace(statement[i], status=flipped)
    statement = [r for i, r in enumerate(statement) if i not in dropped_rows]
    ledger = [e for i, e in enumerate(ledger) if i not in dropped_entries]
    return draw(st.permutations(statement)), draw(st.permutations(ledger)), injected


@given(day_with_injected_differences())
def test_reports_exactly_the_injected_differences(
    case: tuple[list[StatementRow], list[LedgerEntry], set[tuple[K, str]]],
) -> None:
    statement, ledger, injected = case
    result = reconcile(DAY, statement, ledger)
    found = [(d.kind, d.txn_ref) for d in result.differences]
    assert len(found) == len(set(found))  # each once
    assert set(found) == injected
    assert sum(summary(result)["by_kind"].values()) == len(injected)  # type: ignore[attr-defined]


# --- a run asked for over HTTP (POST /v1/admin/reconciliations) -----------------------------------

GATEWAYS = ("vnpay", "jsonpay")


def asked(body: object, today: date = DAY) -> RunRequest | list[FieldError]:
    return run_request(body, today=today, gateways=GATEWAYS, default_gateway="vnpay")


def test_a_run_request_takes_a_past_or_todays_date_and_a_known_gateway() -> None:
    assert asked({"date": "2024-03-04"}) == RunRequest("vnpay", DAY)
    assert asked({"date": "2024-03-03", "gateway": "jsonpay"}) == RunRequest(
        "jsonpay", date(2024, 3, 3)
    )


@pytest.mark.parametrize(
    ("body", "pointers", "says"),
    [
        ({}, ["/date"], "required"),
        ({"date": "2024-03-05"}, ["/date"], "future"),
        ({"date": "2024-13-01"}, ["/date"], "not a calendar day"),
        ({"date": "20240304"}, ["/date"], "YYYY-MM-DD"),
        ({"date": "2024-3-4"}, ["/date"], "YYYY-MM-DD"),
        ({"date": 20240304}, ["/date"], "YYYY-MM-DD"),
        ({"date": "2024-03-04", "gateway": "momo"}, ["/gateway"], "momo"),
        ({"date": "yesterday", "gateway": 1}, ["/date", "/gateway"], "yesterday"),
        ([], [""], "JSON object"),
        (None, [""], "JSON object"),
    ],
)
def test_a_bad_run_request_names_each_bad_field(
    body: object, pointers: list[str], says: str
) -> None:
    errors = asked(body)
    assert isinstance(errors, list)
    assert [e.pointer for e in errors] == pointers
    assert says in errors[0].detail


def test_matched_counts_the_statement_rows_without_a_difference() -> None:
    statement, ledger = matching_day(6)
    assert matched(reconcile(DAY, statement, ledger)) == 6
    statement[0] = dataclasses.replace(statement[0], amount_vnd=1, status="refunded")
    extra, _ = pair(99)
    # one row with two differences, one row the ledger lacks, one ledger entry not in the file
    result = reconcile(DAY, [*statement[:-1], extra], ledger)
    assert len(result.differences) == 4
    assert matched(result) == result.statement_rows - 2 == 4
    assert summary(result)["matched"] == 4
