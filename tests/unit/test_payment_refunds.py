"""Refunds finance asks for: the decision and the state machine (never more back than was paid,
one refund under way at a time), the events they publish and the report rows they fold into, and
the real VNPAY adapter against the bank sandbox (over `httpx.ASGITransport`): a partial refund,
the same refund asked again, a refusal."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.coordination import Keys
from services.common.settings import Settings
from services.common.tz import VIETNAM_TZ
from services.payments.callbacks import CallbackMessage
from services.payments.domain import (
    Applied,
    Cause,
    GatewayAccount,
    Payment,
    PaymentState,
    RefundRefused,
    apply,
    decide_refund,
    open_payment,
    order_for,
    pending_refund,
    refund_cause,
    refund_id_for,
    refundable_vnd,
    refunded_vnd,
    refunds_itself,
)
from services.payments.ledger import LedgerRecord, outgoing_event
from services.payments.partner import VnpayGateway
from services.payments.refunds import RefundAnswer, RefundAnswers
from services.payments.reports import ReportRow, fold
from services.payments.settings import PaymentsSettings
from services.sandboxes.bank import Sandbox, SandboxConfig, create_app
from tests.unit.test_payments_worker import Rig, submission
from tests.unit.test_payments_worker import paid as paid_message

S = PaymentState
AT = datetime(2026, 11, 20, 9, 0, tzinfo=VIETNAM_TZ)
AMOUNT = 150_000


def paid(amount: int = AMOUNT) -> Payment:
    order = order_for(
        {
            "dossier_id": "000.00.12.H34-261120-0001",
            "agency_code": "000.00.12.H34",
            "fee": {"amount_vnd": amount, "method": "online"},
        },
        account=GatewayAccount("vnpay", "MOTCUADEV"),
        submitted_at=AT,
    )
    assert order is not None
    opened = open_payment(order, "evt-1").payment
    moved = apply(opened, Cause.GATEWAY_SUCCESS, AT + timedelta(minutes=2), "TXN1")
    assert isinstance(moved, Applied)
    return moved.payment


def ask(payment: Payment, amount: int | None, ref: str) -> Payment | RefundRefused:
    decided = decide_refund(payment, amount)
    if isinstance(decided, RefundRefused):
        return decided
    moved = apply(payment, Cause.REFUND_ASKED, AT, ref, "overcharged", decided)
    assert isinstance(moved, Applied) and moved.changed
    return moved.payment


def answer(payment: Payment, confirmed: bool) -> Payment:
    pending = pending_refund(payment)
    assert pending is not None
    cause = refund_cause(payment, confirmed)
    moved = apply(payment, cause, AT, pending.event_ref, None, pending.amount_vnd)
    assert isinstance(moved, Applied) and moved.changed
    return moved.payment


def test_partial_refunds_then_the_rest_then_nothing() -> None:
    payment = ask(paid(), 50_000, "R1")
    assert isinstance(payment, Payment) and payment.state == S.REFUND_REQUESTED
    busy = decide_refund(payment, 1)
    assert isinstance(busy, RefundRefused) and busy.status == 409  # one under way at a time
    payment = answer(payment, confirmed=True)
    assert (payment.state, refunded_vnd(payment), refundable_vnd(payment)) == (
        S.PARTIALLY_REFUNDED,
        50_000,
        100_000,
    )
    too_much = decide_refund(payment, 100_001)
    assert isinstance(too_much, RefundRefused) and too_much.status == 422
    assert "100000 VND left" in too_much.detail
    payment = ask(payment, None, "R2")  # no amount: all that is left
    assert isinstance(payment, Payment) and payment.history[-1].amount_vnd == 100_000
    payment = answer(payment, confirmed=True)
    assert (payment.state, refunded_vnd(payment)) == (S.REFUNDED, AMOUNT)
    done = decide_refund(payment, None)
    assert isinstance(done, RefundRefused) and done.status == 409


def test_a_refused_refund_keeps_the_money_and_may_be_asked_again() -> None:
    payment = ask(paid(), None, "R1")
    assert isinstance(payment, Payment)
    payment = answer(payment, confirmed=False)
    assert (payment.state, refunded_vnd(payment), refundable_vnd(payment)) == (
        S.REFUND_FAILED,
        0,
        AMOUNT,
    )
    assert decide_refund(payment, 10_000) == 10_000


def test_an_unpaid_payment_has_nothing_to_refund() -> None:
    opened = paid().model_copy(update={"state": S.EXPIRED})
    refused = decide_refund(opened, None)
    assert isinstance(refused, RefundRefused) and refused.status == 409


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["ask", "confirm", "refuse"]),
            st.one_of(st.none(), st.integers(min_value=-5, max_value=AMOUNT + 10)),
        ),
        max_size=25,
    )
)
def test_no_sequence_of_refunds_hands_back_more_than_was_paid(
    steps: list[tuple[str, int | None]],
) -> None:
    payment = paid()
    for i, (step, amount) in enumerate(steps):
        if step == "ask":
            after = ask(payment, amount, f"R{i}")
            if isinstance(after, Payment):
                payment = after
        elif payment.state == S.REFUND_REQUESTED:
            payment = answer(payment, confirmed=step == "confirm")
        assert 0 <= refunded_vnd(payment) <= AMOUNT
        assert (payment.state == S.REFUNDED) == (refunded_vnd(payment) == AMOUNT)
    assert payment.version == len(payment.history)


def test_a_refund_s_events_name_it_and_the_report_folds_them() -> None:
    payment = ask(paid(), 40_000, "R1")
    assert isinstance(payment, Payment)
    payment = answer(payment, confirmed=True)
    record = LedgerRecord(payment=payment, agency_code="000.00.12.H34", payment_url="https://p")
    events = [outgoing_event(record, v) for v in range(1, payment.version + 1)]
    assert [e.type for e in events] == [
        "payment.requested",
        "payment.succeeded",
        "payment.refund_requested",
        "payment.refunded",
    ]
    asked, refunded = (e.data.model_dump(mode="json") for e in events[2:])
    assert (asked["refund_id"], asked["refund_amount_vnd"], asked["reason"]) == (
        "R1",
        40_000,
        "overcharged",
    )
    assert (refunded["state"], refunded["refunded_vnd"]) == ("partially_refunded", 40_000)
    row: ReportRow | None = None
    for event in events:
        row = fold(row, orjson.loads(event.to_json())) or row
    assert row is not None
    assert (row.state, row.refunded_vnd, row.amount_vnd) == (S.PARTIALLY_REFUNDED, 40_000, AMOUNT)


def test_the_same_key_names_the_same_refund() -> None:
    one = refund_id_for("D-1", "key-a")
    assert one == refund_id_for("D-1", "key-a") != refund_id_for("D-1", "key-b")
    assert one != refund_id_for("D-2", "key-a") and one.isalnum() and len(one) == 32


# --- the VNPAY adapter against the bank sandbox ---------------------------------------------------


@pytest.fixture
async def bank() -> AsyncIterator[tuple[VnpayGateway, Sandbox]]:
    settings = Settings()
    api = create_app(settings, SandboxConfig(outcomes={"00": 1.0}), lambda: datetime.now(UTC))
    sandbox: Sandbox = api.state.sandbox
    gateway = VnpayGateway(
        settings,
        PaymentsSettings(),
        transport=httpx.ASGITransport(app=api),
    )
    yield gateway, sandbox
    await gateway.aclose()
    await sandbox.client.aclose()


def sandbox_order(sandbox: Sandbox, payment: Payment) -> None:
    order, _ = sandbox.register(
        gateway="vnpay",
        txn_ref=payment.txn_ref,
        merchant=payment.merchant,
        amount_vnd=payment.amount_vnd,
        currency="VND",
        order_info=f"Thanh toan le phi ho so {payment.dossier_id}",
        expires_at=payment.expires_at,
    )
    order.status = "paid"


async def test_the_bank_refunds_part_once_however_often_asked(
    bank: tuple[VnpayGateway, Sandbox],
) -> None:
    gateway, sandbox = bank
    payment = paid()
    sandbox_order(sandbox, payment)
    assert await gateway.refund(payment, 50_000, "REFUND1")
    assert await gateway.refund(payment, 50_000, "REFUND1")  # the same refund again
    order = sandbox.orders[payment.txn_ref]
    assert (order.refunded_vnd, order.status, order.refunds) == (50_000, "paid", 1)
    assert not await gateway.refund(payment, 100_001, "REFUND2")  # more than is left
    assert await gateway.refund(payment, 100_000, "REFUND3")
    assert (order.refunded_vnd, order.status) == (AMOUNT, "refunded")


async def test_the_bank_may_refuse_a_refund(bank: tuple[VnpayGateway, Sandbox]) -> None:
    gateway, sandbox = bank
    sandbox.config = SandboxConfig(outcomes={"00": 1.0}, refuse_refunds=1.0)
    payment = paid()
    sandbox_order(sandbox, payment)
    assert not await gateway.refund(payment, 10_000, "REFUND1")
    assert sandbox.orders[payment.txn_ref].refunded_vnd == 0


def test_a_dossier_closed_after_payment_owes_its_fee_back() -> None:
    closed = apply(paid(), Cause.DOSSIER_CLOSED, AT, "evt-withdrawn", "dossier_withdrawn")
    assert isinstance(closed, Applied) and closed.event_type == "payment.refund_required"
    owed = closed.payment
    assert not refunds_itself(owed, agency_refunds_automatically=False)  # finance confirms
    assert refunds_itself(owed, agency_refunds_automatically=True)
    assert decide_refund(owed, None) == AMOUNT
    record = LedgerRecord(payment=owed, agency_code="000.00.12.H34", payment_url="https://p")
    event = outgoing_event(record, owed.version)
    assert event.data.model_dump()["reason"] == "dossier_withdrawn"


def test_late_money_goes_back_by_itself_and_finance_may_not_refund_it_twice() -> None:
    expired = paid().model_copy(update={"state": S.EXPIRED})
    late = apply(expired, Cause.GATEWAY_SUCCESS, AT + timedelta(hours=1), "TXN-LATE")
    assert isinstance(late, Applied) and late.payment.state == S.REFUND_REQUIRED
    assert refunds_itself(late.payment, agency_refunds_automatically=False)
    refused = decide_refund(late.payment, None)
    assert isinstance(refused, RefundRefused) and refused.status == 409


# --- the worker deciding refunds, in order with the dossier's other inputs -----------------------


class MemoryAnswers(RefundAnswers):
    def __init__(self) -> None:
        super().__init__(None, Keys("test"), 60)  # type: ignore[arg-type]
        self.kept: dict[str, RefundAnswer] = {}

    async def get(self, refund_id: str) -> RefundAnswer | None:
        return self.kept.get(refund_id)

    async def put(self, answer: RefundAnswer) -> RefundAnswer:
        return self.kept.setdefault(answer.refund_id, answer)


def asked(dossier_id: str, ref: str, amount: int | None) -> CallbackMessage:
    return CallbackMessage(
        kind="refund_asked",
        dossier_id=dossier_id,
        at=datetime.now(VIETNAM_TZ),
        ref=ref,
        via="operator",
        amount_vnd=amount,
        reason="overcharged",
    )


def answered(dossier_id: str, ref: str, ok: bool) -> CallbackMessage:
    return CallbackMessage(
        kind="refund_confirmed" if ok else "refund_refused",
        dossier_id=dossier_id,
        at=datetime.now(VIETNAM_TZ),
        ref=ref,
        via="timer",
        reason=None if ok else "gateway_refused",
    )


async def test_the_worker_answers_each_refund_once_and_in_order() -> None:
    rig = Rig()
    answers = MemoryAnswers()
    rig.worker.answers = answers
    d = "000.00.12.H34-261120-0009"
    await rig.worker.on_batch([submission(d), paid_message(d)])
    # two refunds asked in one poll: the first is under way, the second refused
    await rig.worker.on_batch([asked(d, "R1", 50_000), asked(d, "R2", 10_000)])
    assert answers.kept["R1"].accepted and answers.kept["R1"].amount_vnd == 50_000
    assert (answers.kept["R2"].accepted, answers.kept["R2"].status) == (False, 409)
    # the same refund asked again: the same answer, nothing moves
    version = rig.ledger.get(d).payment.version  # type: ignore[union-attr]
    await rig.worker.on_batch([asked(d, "R1", 50_000)])
    assert rig.ledger.get(d).payment.version == version  # type: ignore[union-attr]
    # the gateway's answer, told twice
    await rig.worker.on_batch([answered(d, "R1", True), answered(d, "R1", True)])
    assert rig.ledger.get(d).payment.state == S.PARTIALLY_REFUNDED  # type: ignore[union-attr]
    # accepted, but the poll that took it failed: handled again, it is taken with its amount
    answers.kept["R3"] = RefundAnswer(
        refund_id="R3", dossier_id=d, accepted=True, amount_vnd=30_000, reason="other"
    )
    await rig.worker.on_batch([asked(d, "R3", 999_999)])
    taken = rig.ledger.get(d).payment  # type: ignore[union-attr]
    assert (taken.state, taken.history[-1].amount_vnd) == (S.REFUND_REQUESTED, 30_000)
    await rig.worker.on_batch([answered(d, "R3", False)])
    assert rig.ledger.get(d).payment.state == S.REFUND_FAILED  # type: ignore[union-attr]
    assert [t for t, _ in rig.types(d)] == [
        "payment.requested",
        "payment.succeeded",
        "payment.refund_requested",
        "payment.refunded",
        "payment.refund_requested",
        "payment.refund_failed",
    ]
