"""Retirement of settled payments: when a payment's story is over (`domain.retire_at`), the
`retire` message that takes its record out of the ledger, and what a late input for a retired
order does: a submission read again opens no second order, a repeated IPN is answered 02 and
changes nothing, a success after the order closed is still refunded."""

from __future__ import annotations

from datetime import datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from services.common.tz import VIETNAM_TZ
from services.payments.callbacks import CallbackMessage, decode_callback
from services.payments.domain import (
    LIVE_STATES,
    HistoryEntry,
    Payment,
    PaymentState,
    Retirement,
    RspCode,
    retire_at,
    txn_ref_for,
)
from services.payments.ledger import LedgerRecord, record_retire_at
from services.payments.settings import PaymentsSettings
from services.payments.sweeper import Sweeper
from services.payments.webhook import GatewayIpn
from tests.unit.test_payments_worker import Rig, Sent, callback, paid, submission, success

T0 = datetime(2026, 11, 26, 9, 0, tzinfo=VIETNAM_TZ)
RETIREMENT = Retirement(after=timedelta(days=35), late_window=timedelta(days=1))


def payment(state: PaymentState, last: datetime) -> Payment:
    return Payment(
        dossier_id="D-1",
        txn_ref=txn_ref_for("D-1"),
        gateway="vnpay",
        merchant="M",
        amount_vnd=1000,
        created_at=T0,
        expires_at=T0 + timedelta(minutes=15),
        state=state,
        version=2,
        history=(
            HistoryEntry(state=PaymentState.REQUESTED, cause="order_created", at=T0, event_ref="e"),
            HistoryEntry(state=state, cause="x", at=last, event_ref="f"),
        ),
    )


@given(st.sampled_from(list(PaymentState)), st.integers(0, 100 * 24 * 60))
def test_a_payment_leaves_only_once_settled_past_its_late_window_and_grace(
    state: PaymentState, minutes: int
) -> None:
    last = T0 + timedelta(minutes=minutes)
    p = payment(state, last)
    moment = retire_at(p, RETIREMENT)
    if state in LIVE_STATES:  # an open order, money to hand back: never
        assert moment is None
        return
    late_end = p.expires_at + RETIREMENT.late_window
    assert moment == max(last, late_end) + RETIREMENT.after
    record = LedgerRecord(payment=p, agency_code="A", payment_url="u", published_version=1)
    assert record_retire_at(record, RETIREMENT) is None  # its events not all published yet
    done = record.model_copy(update={"published_version": p.version})
    assert record_retire_at(done, RETIREMENT) == moment


def test_the_retirement_settings_follow_the_late_queries() -> None:
    conf = PaymentsSettings(
        PAYMENTS_RETIRE_AFTER_SECONDS=60, PAYMENTS_LATE_QUERY_OFFSETS_SECONDS="900,7200"
    )
    assert conf.retirement == Retirement(timedelta(seconds=60), timedelta(seconds=7200))


def later(rig: Rig, dossier_id: str) -> datetime:
    """A moment past the record's retirement, set as the worker's clock."""
    kept = rig.ledger.get(dossier_id)
    assert kept is not None
    moment = record_retire_at(kept, rig.ledger.retirement)
    assert moment is not None and rig.ledger.retiring.due_at(dossier_id) == moment
    rig.worker.clock = lambda: moment + timedelta(seconds=1)
    return moment


def retire(dossier_id: str) -> CallbackMessage:
    return CallbackMessage(
        kind="retire", dossier_id=dossier_id, at=datetime.now(VIETNAM_TZ), ref="retire"
    )


async def retired_rig(dossier_id: str) -> tuple[Rig, datetime]:
    rig = Rig()
    await rig.worker.on_batch([submission(dossier_id)])
    assert rig.ledger.retiring.due_at(dossier_id) is None  # open
    await rig.worker.on_batch([paid(dossier_id)])
    await rig.ledger.table.save()
    moment = later(rig, dossier_id)
    rig.snapshots.saved.clear()  # the copy saved at retirement is the one that counts
    await rig.worker.on_batch([retire(dossier_id)])
    return rig, moment


async def test_the_sweeper_sends_retire_when_due_and_the_worker_retires() -> None:
    rig = Rig()
    dossier_id = "000.00.12.H34-261126-0001"
    await rig.worker.on_batch([submission(dossier_id)])
    await rig.worker.on_batch([paid(dossier_id)])
    await rig.ledger.table.save()
    moment = later(rig, dossier_id)

    # Not yet due: the worker keeps it even when asked.
    rig.worker.clock = lambda: moment - timedelta(seconds=1)
    await rig.worker.on_batch([retire(dossier_id)])
    assert rig.ledger.get(dossier_id) is not None

    sent = Sent()
    sweeper = Sweeper(rig.ledger.table, {"vnpay": rig.gateway}, rig.conf, sent, rig.ledger.retiring)
    await sweeper.retire_due(moment + timedelta(seconds=1))
    (message,) = [decode_callback(v or b"") for _, _, v in sent.messages]
    assert message.kind == "retire" and message.dossier_id == dossier_id
    assert rig.ledger.retiring.due_at(dossier_id) is None  # handed out once

    rig.worker.clock = lambda: moment + timedelta(seconds=1)
    rig.snapshots.saved.clear()
    await rig.worker.on_batch([message])
    assert rig.ledger.get(dossier_id) is None
    await rig.ledger.table.save()  # what the consumer does before its commit
    _, key, value = rig.changelog.messages[-1]
    assert (key, value) == (dossier_id.encode(), None)  # the tombstone
    # its Redis copy saved again: it outlives the record
    assert rig.snapshots.key(txn_ref_for(dossier_id)) in rig.snapshots.saved
    # a second retire (sent again after a failed publish) finds nothing to do
    await rig.worker.on_batch([message])


async def test_a_retired_orders_submission_read_again_opens_no_second_order() -> None:
    dossier_id = "000.00.12.H34-261126-0002"
    rig, _ = await retired_rig(dossier_id)
    events = len(rig.published.events)
    await rig.worker.on_batch([submission(dossier_id)])
    assert rig.ledger.get(dossier_id) is None  # stays retired
    assert len(rig.published.events) == events  # no payment.requested again
    assert rig.ledger.table.unsaved == {dossier_id}  # only the tombstone to write


async def test_a_late_ipn_for_a_retired_order_is_02_and_changes_nothing() -> None:
    dossier_id = "000.00.12.H34-261126-0003"
    rig, _ = await retired_rig(dossier_id)
    events = len(rig.published.events)
    snapshot = rig.snapshots.saved[rig.snapshots.key(txn_ref_for(dossier_id))]
    ipn = GatewayIpn(rig.snapshots, rig.ledger)
    decision = await ipn.decide(callback(success(dossier_id, transaction_no="2")), snapshot)
    assert decision.detail == RspCode.ALREADY_CONFIRMED
    assert decision.value is not None
    await rig.worker.on_batch([decode_callback(decision.value)])
    assert rig.ledger.get(dossier_id) is None and len(rig.published.events) == events


async def test_a_success_after_a_retired_order_expired_is_still_refunded() -> None:
    rig = Rig()
    dossier_id = "000.00.12.H34-261126-0004"
    await rig.worker.on_batch([submission(dossier_id)])
    expire = CallbackMessage(
        kind="expire", dossier_id=dossier_id, at=datetime.now(VIETNAM_TZ), ref="expiry"
    )
    await rig.worker.on_batch([expire])
    later(rig, dossier_id)
    await rig.worker.on_batch([retire(dossier_id)])
    assert rig.ledger.get(dossier_id) is None

    await rig.worker.on_batch([paid(dossier_id)])  # money taken long after: hand it back
    back = rig.ledger.get(dossier_id)
    assert back is not None and back.payment.state == PaymentState.REFUND_REQUIRED
    assert rig.types(dossier_id)[-1] == ("payment.refund_required", f"{dossier_id}/payment/3")
    assert rig.ledger.retiring.due_at(dossier_id) is None  # not over: a refund to make
