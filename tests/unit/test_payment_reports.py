"""Finance reports over a real SQLite file: rows folded from the events `ledger.outgoing_event`
publishes, every filter checked against a recount in Python, pages that stay stable while new
payments arrive, daily totals by Vietnamese day, the file kept across a restart."""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import replace
from datetime import date, datetime, timedelta
from pathlib import Path

import orjson
import pytest

from services.common.tz import VIETNAM_TZ
from services.payments.domain import (
    Applied,
    Cause,
    GatewayAccount,
    Payment,
    PaymentState,
    apply,
    open_payment,
    order_for,
)
from services.payments.ledger import LedgerRecord, outgoing_event
from services.payments.report_store import ReportStore, claim_slot
from services.payments.reports import (
    ReportQuery,
    ReportRow,
    decode_cursor,
    encode_cursor,
    fold,
    micros,
    parse_report_query,
    parse_totals_query,
    vietnam_day,
)

AGENCIES = ("000.00.12.H34", "000.00.13.H34", "000.00.14.H34", "G01.H34")
GATEWAYS = {"vnpay": GatewayAccount("vnpay", "MOTCUA01"), "jsonpay": GatewayAccount("jsonpay", "J")}
START = datetime(2026, 10, 1, 6, 0, tzinfo=VIETNAM_TZ)
PATHS: dict[str, tuple[Cause, ...]] = {
    "requested": (),
    "succeeded": (Cause.GATEWAY_SUCCESS,),
    "failed": (Cause.GATEWAY_FAILURE,),
    "expired": (Cause.EXPIRY,),
    "refund_required": (Cause.EXPIRY, Cause.GATEWAY_SUCCESS),
    "refunded": (Cause.GATEWAY_SUCCESS, Cause.REFUND_CONFIRMED),
}


def events_of(
    dossier_id: str, agency: str, gateway: str, amount: int, at: datetime, path: str
) -> list[bytes]:
    """Every event payments publishes for one payment that went `path`'s way."""
    order = order_for(
        {
            "dossier_id": dossier_id,
            "agency_code": agency,
            "fee": {"amount_vnd": amount, "method": "online"},
        },
        account=GATEWAYS[gateway],
        submitted_at=at,
    )
    assert order is not None
    payment: Payment = open_payment(order, f"evt-{dossier_id}").payment
    moment = at
    for cause in PATHS[path]:
        moment += timedelta(minutes=7)
        outcome = apply(payment, cause, moment, f"ref-{dossier_id}-{cause}")
        assert isinstance(outcome, Applied), outcome
        payment = outcome.payment
    record = LedgerRecord(payment=payment, agency_code=agency, payment_url="https://pay/x")
    return [outgoing_event(record, version).to_json() for version in range(1, payment.version + 1)]


def random_payments(rng: random.Random, n: int, prefix: str = "D") -> list[list[bytes]]:
    out = []
    for i in range(n):
        out.append(
            events_of(
                f"{prefix}.{i:05d}-{rng.randrange(100)}",
                rng.choice(AGENCIES),
                rng.choice(sorted(GATEWAYS)),
                rng.choice((10_000, 25_000, 50_000, 150_000, 1_000_000)),
                # several payments share a second: the cursor must still split them
                START + timedelta(seconds=rng.randrange(0, 40 * 86400, 30)),
                rng.choice(sorted(PATHS)),
            )
        )
    return out


def load(store: ReportStore, payments: list[list[bytes]], start: int = 0) -> int:
    """Apply every event, as one partition would deliver them, from offset `start`."""
    records = [(0, start + i, raw) for i, raw in enumerate(e for p in payments for e in p)]
    for first in range(0, len(records), 500):
        store.apply(records[first : first + 500])
    return start + len(records)


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReportStore]:
    store = ReportStore(tmp_path_factory.mktemp("reports") / "r.sqlite", "test")
    load(store, random_payments(random.Random(19), 1500))
    yield store
    store.close()


def all_rows(store: ReportStore) -> list[ReportRow]:
    return [row for chunk in store.rows(ReportQuery()) for row in chunk]


def matches(row: ReportRow, q: ReportQuery) -> bool:
    return (
        (q.agencies is None or row.agency_code in q.agencies)
        and (not q.states or row.state.value in q.states)
        and (not q.gateways or row.gateway in q.gateways)
        and (q.created_from is None or row.created_at >= q.created_from)
        and (q.created_to is None or row.created_at < q.created_to)
        and (q.amount_min is None or row.amount_vnd >= q.amount_min)
        and (q.amount_max is None or row.amount_vnd <= q.amount_max)
        and (q.reference is None or q.reference in (row.dossier_id, row.txn_ref))
    )


def every_page(store: ReportStore, query: ReportQuery) -> list[ReportRow]:
    seen: list[ReportRow] = []
    while True:
        page = store.page(query)
        assert len(page.rows) <= query.limit
        seen.extend(page.rows)
        if page.next_cursor is None:
            return seen
        query = replace(query, after=decode_cursor(page.next_cursor))


def test_a_row_follows_its_payment_and_ignores_repeats_and_older_versions() -> None:
    events = [
        orjson.loads(e) for e in events_of("A.1", AGENCIES[0], "vnpay", 50_000, START, "refunded")
    ]
    row: ReportRow | None = None
    for event in events:
        row = fold(row, event) or row
    assert row is not None
    assert (row.state, row.version, row.agency_code, row.refunded_vnd) == (
        PaymentState.REFUNDED,
        3,
        AGENCIES[0],
        50_000,
    )
    assert row.created_at == micros(START)
    assert row.paid_at == row.settled_at == micros(START + timedelta(minutes=7))
    assert fold(row, events[1]) is None  # a repeat of version 2
    assert fold(row, events[2]) is None  # version 3 again
    assert fold(None, {"type": "payment.callback_rejected", "data": {}}) is None


def test_every_filter_pages_exactly_the_recounted_rows(filled: ReportStore) -> None:
    rows = all_rows(filled)
    assert len(rows) == 1500
    rng = random.Random(7)
    some = rng.sample(rows, 3)
    queries: list[dict[str, list[str]]] = [
        {},
        {"agency": [AGENCIES[1]]},
        {"agency": [f"{AGENCIES[0]},{AGENCIES[2]}"], "state": ["succeeded", "refunded"]},
        {"gateway": ["jsonpay"], "amount_min": ["25000"], "amount_max": ["150000"]},
        {"from_date": ["2026-10-05"], "to_date": ["2026-10-09"]},
        {"from_date": ["2026-10-05T10:00:00+07:00"], "to_date": ["2026-10-20T03:00:00Z"]},
        {"state": ["refund_required"], "agency": [AGENCIES[3]]},
        {"reference": [some[0].dossier_id]},
        {"reference": [some[1].txn_ref]},
        {"agency": ["nobody"]},
    ]
    for params in queries:
        for limit in ("7", "100"):
            query = parse_report_query({**params, "limit": [limit]}, None)
            assert not query.errors, query.errors
            expected = sorted(
                (r for r in rows if matches(r, query)),
                key=lambda r: (r.created_at, r.dossier_id),
                reverse=True,
            )
            assert every_page(filled, query) == expected, params


def test_a_scoped_operator_sees_only_its_agencies(filled: ReportStore) -> None:
    scope = frozenset(AGENCIES[:2])
    everything = every_page(filled, parse_report_query({"limit": ["50"]}, scope))
    assert {r.agency_code for r in everything} == scope
    assert len(everything) == sum(1 for r in all_rows(filled) if r.agency_code in scope)
    outside = parse_report_query({"agency": [AGENCIES[3]]}, scope)
    assert filled.page(outside).rows == []


def test_pages_stay_stable_while_new_payments_arrive(tmp_path: Path) -> None:
    store = ReportStore(tmp_path / "r.sqlite", "test")
    rng = random.Random(3)
    offset = load(store, random_payments(rng, 300, "OLD"))
    before = {r.dossier_id for r in all_rows(store)}
    query = parse_report_query({"limit": ["20"]}, None)
    seen: list[str] = []
    round_ = 0
    while True:
        page = store.page(query)
        seen.extend(r.dossier_id for r in page.rows)
        # new payments, some of them dated inside the range already paged through
        offset = load(store, random_payments(rng, 15, f"NEW{round_}"), offset)
        round_ += 1
        if page.next_cursor is None:
            break
        query = replace(query, after=decode_cursor(page.next_cursor))
    assert len(seen) == len(set(seen)), "a row came twice"
    assert before <= set(seen), "a row that was there all along was skipped"


def test_daily_totals_match_a_recount_by_vietnamese_day(filled: ReportStore) -> None:
    query = parse_totals_query(
        {"from_date": ["2026-10-03"], "to_date": ["2026-10-25"]}, None, date(2026, 11, 1)
    )
    assert not query.errors
    expected: dict[tuple[str, str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for row in all_rows(filled):
        day = row.paid_day
        if day is not None and "2026-10-03" <= day <= "2026-10-25":
            sums = expected[(day, row.agency_code, row.gateway)]
            sums[0] += 1
            sums[1] += row.amount_vnd
            sums[2] += row.refunded_vnd
    found = {(d, a, g): [c, p, r] for d, a, g, c, p, r in filled.totals(query)}
    assert found == expected
    assert any(r > 0 for _, _, r in found.values())
    # A payment at 23:30 UTC belongs to the next Vietnamese day.
    assert vietnam_day(micros(datetime.fromisoformat("2026-10-03T23:30:00+00:00"))) == "2026-10-04"


@pytest.mark.parametrize(
    ("params", "parameter"),
    [
        ({"state": ["paid"]}, "state"),
        ({"from_date": ["yesterday"]}, "from_date"),
        ({"to_date": ["2026-10-05T10:00:00"]}, "to_date"),
        ({"from_date": ["2026-10-05"], "to_date": ["2026-10-01"]}, "to_date"),
        ({"amount_min": ["-5"]}, "amount_min"),
        ({"amount_min": ["500"], "amount_max": ["10"]}, "amount_max"),
        ({"limit": ["0"]}, "limit"),
        ({"limit": ["5000"]}, "limit"),
        ({"cursor": ["not-a-cursor"]}, "cursor"),
    ],
)
def test_a_bad_parameter_is_named(params: dict[str, list[str]], parameter: str) -> None:
    errors = parse_report_query(params, None).errors
    assert [e.parameter for e in errors] == [parameter]


def test_a_cursor_round_trips_and_a_forged_one_is_refused() -> None:
    key = (micros(START), "000.00.12.H34-1")
    assert decode_cursor(encode_cursor(key)) == key
    assert decode_cursor(encode_cursor(key)[:-2]) is None
    assert decode_cursor("W10") is None  # "[]"


def test_bad_totals_ranges_are_named() -> None:
    today = date(2026, 11, 1)
    assert [e.parameter for e in parse_totals_query({"to_date": ["x"]}, None, today).errors] == [
        "to_date"
    ]
    far = {"from_date": ["2024-01-01"], "to_date": ["2026-01-01"]}
    assert [e.parameter for e in parse_totals_query(far, None, today).errors] == ["to_date"]


def test_the_file_survives_a_restart_and_another_source_rebuilds_it(tmp_path: Path) -> None:
    path = tmp_path / "r.sqlite"
    store = ReportStore(path, "broker-a/ns")
    end = load(store, random_payments(random.Random(5), 40))
    store.mark_complete()
    store.close()
    again = ReportStore(path, "broker-a/ns")
    assert again.complete and again.count() == 40 and again.offsets() == {0: end}
    again.close()
    other = ReportStore(path, "broker-b/ns")
    assert not other.complete and other.count() == 0 and other.offsets() == {}
    other.close()


def test_undecodable_events_only_move_the_offset(tmp_path: Path) -> None:
    store = ReportStore(tmp_path / "r.sqlite", "test")
    assert store.apply([(2, 10, b"not json"), (2, 11, None), (2, 12, b"[1]")]) == 0
    assert store.offsets() == {2: 13} and store.count() == 0


def test_two_processes_on_one_disk_take_different_files(tmp_path: Path) -> None:
    first, lock1 = claim_slot(tmp_path)
    second, lock2 = claim_slot(tmp_path)
    assert first != second
    lock1.close()
    third, lock3 = claim_slot(tmp_path)
    assert third == first  # a restarted process finds its file again
    lock2.close()
    lock3.close()
