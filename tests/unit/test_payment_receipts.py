"""Receipt numbers: per agency and year, without gaps, the same number for a request asked
again; the request each successful payment asks for; the event an agency's e-receipt system
reads."""

from __future__ import annotations

from datetime import datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from services.common.tz import VIETNAM_TZ
from services.payments.domain import Applied, Cause, GatewayAccount, apply, open_payment, order_for
from services.payments.ledger import LedgerRecord, receipt_request
from services.payments.receipts import RECENT, AgencyReceipts, ReceiptRequest, issue, receipt_event

NEW_YEAR = datetime(2027, 1, 1, tzinfo=VIETNAM_TZ)


def request(dossier: str, paid_at: datetime, agency: str = "000.00.12.H34") -> ReceiptRequest:
    return ReceiptRequest(
        dossier_id=dossier,
        agency_code=agency,
        amount_vnd=150_000,
        paid_at=paid_at,
        txn_ref=f"T{dossier}",
        gateway="vnpay",
    )


@given(st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=200))
def test_numbers_have_no_gaps_and_a_repeat_keeps_its_number(picks: list[int]) -> None:
    state = AgencyReceipts()
    numbers: dict[str, tuple[int, int]] = {}
    for pick in picks:
        # dossiers 0-19 paid in 2026 (Vietnam time: 23:30 on 31 December), 20-40 in 2027
        paid = NEW_YEAR - timedelta(minutes=30) if pick < 20 else NEW_YEAR + timedelta(hours=1)
        state, receipt = issue(state, request(f"D{pick}", paid))
        given_before = numbers.setdefault(f"D{pick}", (receipt.year, receipt.number))
        assert given_before == (receipt.year, receipt.number)
    for year in (2026, 2027):
        got = sorted(n for y, n in numbers.values() if y == year)
        assert got == list(range(1, len(got) + 1))
        assert state.last.get(year, 0) == len(got)


def test_a_payment_at_23_30_utc_on_31_december_is_next_year_s_receipt() -> None:
    utc_evening = datetime.fromisoformat("2026-12-31T17:30:00+00:00")  # 00:30 in Vietnam
    _, receipt = issue(AgencyReceipts(), request("D1", utc_evening))
    assert (receipt.year, receipt.receipt_no) == (2027, "2027-0000001")


def test_the_state_stays_bounded() -> None:
    state = AgencyReceipts()
    for i in range(RECENT + 50):
        state, _ = issue(state, request(f"D{i}", NEW_YEAR))
    assert len(state.recent) == RECENT and state.last == {2027: RECENT + 50}
    assert len(state.to_bytes()) < 200_000


def test_the_receipt_event_is_the_same_however_often_issued() -> None:
    state, first = issue(AgencyReceipts(), request("D1", NEW_YEAR))
    _, again = issue(state, request("D1", NEW_YEAR))
    assert receipt_event(first).to_json() == receipt_event(again).to_json()
    data = receipt_event(first).data.model_dump()
    assert (data["receipt_no"], data["agency_code"], data["amount_vnd"]) == (
        "2027-0000001",
        "000.00.12.H34",
        150_000,
    )


def test_only_the_success_of_a_payment_asks_for_a_receipt() -> None:
    order = order_for(
        {
            "dossier_id": "000.00.12.H34-270101-0001",
            "agency_code": "000.00.12.H34",
            "fee": {"amount_vnd": 150_000, "method": "online"},
        },
        account=GatewayAccount("vnpay", "M"),
        submitted_at=NEW_YEAR,
    )
    assert order is not None
    payment = open_payment(order, "e").payment
    moved = apply(payment, Cause.GATEWAY_SUCCESS, NEW_YEAR + timedelta(minutes=3), "TXN")
    assert isinstance(moved, Applied)
    record = LedgerRecord(payment=moved.payment, agency_code="000.00.12.H34", payment_url="u")
    assert receipt_request(record, 1) is None
    asked = receipt_request(record, 2)
    assert asked is not None and asked.paid_at == NEW_YEAR + timedelta(minutes=3)
