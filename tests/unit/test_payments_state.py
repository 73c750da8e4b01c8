"""The payment state machine, its order decision and its stuck-order schedule."""

from __future__ import annotations

import itertools
import re
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.payments.domain import (
    EDGES,
    SETTLED_STATES,
    TRANSITIONS,
    Applied,
    Cause,
    Check,
    GatewayAccount,
    OrderRequest,
    Payment,
    PaymentState,
    QuerySchedule,
    Rejected,
    apply,
    check_plan,
    checks_due,
    open_payment,
    order_for,
    paid_at,
    txn_ref_for,
)

S, C = PaymentState, Cause
AT = datetime(2024, 3, 4, 8, 15, tzinfo=UTC)

# The specification, written out independently of the module's table:
# (from, cause) -> (to, event type). Pairs not listed must be rejected.
ALLOWED: dict[tuple[PaymentState, Cause], tuple[PaymentState, str | None]] = {
    (S.REQUESTED, C.GATEWAY_SUCCESS): (S.SUCCEEDED, "payment.succeeded"),
    (S.REQUESTED, C.GATEWAY_FAILURE): (S.FAILED, "payment.failed"),
    (S.REQUESTED, C.EXPIRY): (S.EXPIRED, "payment.expired"),
    (S.EXPIRED, C.GATEWAY_SUCCESS): (S.REFUND_REQUIRED, "payment.refund_required"),
    (S.FAILED, C.GATEWAY_SUCCESS): (S.REFUND_REQUIRED, "payment.refund_required"),
    (S.REFUND_REQUIRED, C.REFUND_CONFIRMED): (S.REFUNDED, "payment.refunded"),
    (S.SUCCEEDED, C.REFUND_CONFIRMED): (S.REFUNDED, "payment.refunded"),
    # repeats: no change, no event
    (S.SUCCEEDED, C.GATEWAY_SUCCESS): (S.SUCCEEDED, None),
    (S.REFUND_REQUIRED, C.GATEWAY_SUCCESS): (S.REFUND_REQUIRED, None),
    (S.REFUNDED, C.GATEWAY_SUCCESS): (S.REFUNDED, None),
    (S.REFUNDED, C.REFUND_CONFIRMED): (S.REFUNDED, None),
    (S.FAILED, C.GATEWAY_FAILURE): (S.FAILED, None),
    (S.FAILED, C.EXPIRY): (S.FAILED, None),
    (S.EXPIRED, C.EXPIRY): (S.EXPIRED, None),
    (S.EXPIRED, C.GATEWAY_FAILURE): (S.EXPIRED, None),
    # refunds finance asks for: one under way at a time, whole or partial, or refused
    (S.SUCCEEDED, C.REFUND_ASKED): (S.REFUND_REQUESTED, "payment.refund_requested"),
    (S.PARTIALLY_REFUNDED, C.REFUND_ASKED): (S.REFUND_REQUESTED, "payment.refund_requested"),
    (S.REFUND_FAILED, C.REFUND_ASKED): (S.REFUND_REQUESTED, "payment.refund_requested"),
    (S.REFUND_REQUIRED, C.REFUND_ASKED): (S.REFUND_REQUESTED, "payment.refund_requested"),
    # paid, then withdrawn or rejected: owed back
    (S.SUCCEEDED, C.DOSSIER_CLOSED): (S.REFUND_REQUIRED, "payment.refund_required"),
    (S.REFUND_REQUIRED, C.DOSSIER_CLOSED): (S.REFUND_REQUIRED, None),
    (S.REFUND_REQUESTED, C.REFUND_CONFIRMED): (S.REFUNDED, "payment.refunded"),
    (S.REFUND_REQUESTED, C.PARTIAL_REFUND_CONFIRMED): (S.PARTIALLY_REFUNDED, "payment.refunded"),
    (S.REFUND_REQUESTED, C.REFUND_REFUSED): (S.REFUND_FAILED, "payment.refund_failed"),
    (S.REFUND_REQUESTED, C.GATEWAY_SUCCESS): (S.REFUND_REQUESTED, None),
    (S.PARTIALLY_REFUNDED, C.GATEWAY_SUCCESS): (S.PARTIALLY_REFUNDED, None),
    (S.REFUND_FAILED, C.GATEWAY_SUCCESS): (S.REFUND_FAILED, None),
}

# Which target states each state can reach in one step (the "every pair of states" view).
REACHABLE: dict[PaymentState, set[PaymentState]] = {
    S.REQUESTED: {S.SUCCEEDED, S.FAILED, S.EXPIRED},
    S.SUCCEEDED: {S.SUCCEEDED, S.REFUNDED, S.REFUND_REQUESTED, S.REFUND_REQUIRED},
    S.FAILED: {S.FAILED, S.REFUND_REQUIRED},
    S.EXPIRED: {S.EXPIRED, S.REFUND_REQUIRED},
    S.REFUND_REQUIRED: {S.REFUND_REQUIRED, S.REFUNDED, S.REFUND_REQUESTED},
    S.REFUNDED: {S.REFUNDED},
    S.REFUND_REQUESTED: {S.REFUND_REQUESTED, S.REFUNDED, S.PARTIALLY_REFUNDED, S.REFUND_FAILED},
    S.PARTIALLY_REFUNDED: {S.PARTIALLY_REFUNDED, S.REFUND_REQUESTED},
    S.REFUND_FAILED: {S.REFUND_FAILED, S.REFUND_REQUESTED},
}


def payment_in(state: PaymentState, version: int = 3) -> Payment:
    return Payment(
        dossier_id="000.00.12.H34-190304-0001",
        txn_ref="REF1",
        gateway="vnpay",
        merchant="MOTCUA01",
        amount_vnd=150_000,
        created_at=AT,
        expires_at=AT + timedelta(minutes=15),
        state=state,
        version=version,
    )


def test_table_has_one_edge_per_pair_and_matches_the_specification() -> None:
    assert len(EDGES) == len(TRANSITIONS)
    table = {(e.source, e.cause): (e.target, e.event_type) for e in TRANSITIONS}
    assert table == ALLOWED


def test_every_state_changing_edge_has_an_event_and_no_repeat_has_one() -> None:
    for edge in TRANSITIONS:
        assert (edge.event_type is not None) == (edge.target != edge.source), edge


@pytest.mark.parametrize(("state", "cause"), list(itertools.product(S, C)))
def test_every_state_and_cause(state: PaymentState, cause: Cause) -> None:
    before = payment_in(state)
    outcome = apply(before, cause, AT, "evt-1")
    if (state, cause) not in ALLOWED:
        assert isinstance(outcome, Rejected)
        assert (outcome.state, outcome.cause) == (state, cause)
        assert state.value in outcome.reason and cause.value in outcome.reason
        return
    target, event_type = ALLOWED[(state, cause)]
    assert isinstance(outcome, Applied)
    assert outcome.payment.state == target
    assert outcome.event_type == event_type
    assert outcome.changed == (target != state)
    if outcome.changed:
        assert outcome.payment.version == before.version + 1
        last = outcome.payment.history[-1]
        assert (last.state, last.cause, last.at, last.event_ref) == (target, cause, AT, "evt-1")
    else:
        assert outcome.payment == before


@pytest.mark.parametrize(("source", "target"), list(itertools.product(S, S)))
def test_every_pair_of_states(source: PaymentState, target: PaymentState) -> None:
    reached = {
        o.payment.state
        for cause in C
        if isinstance(o := apply(payment_in(source), cause, AT, "e"), Applied)
    }
    assert (target in reached) == (target in REACHABLE[source])


@pytest.mark.parametrize("state", sorted(SETTLED_STATES))
def test_settled_states_never_go_back_to_requested(state: PaymentState) -> None:
    for cause in C:
        outcome = apply(payment_in(state), cause, AT, "e")
        assert not (isinstance(outcome, Applied) and outcome.payment.state == S.REQUESTED)


def test_refunded_is_final() -> None:
    for cause in C:
        outcome = apply(payment_in(S.REFUNDED), cause, AT, "e")
        assert isinstance(outcome, Rejected) or outcome.payment.state == S.REFUNDED


def test_duplicate_success_yields_one_event() -> None:
    first = apply(payment_in(S.REQUESTED), C.GATEWAY_SUCCESS, AT, "txn-9", None)
    assert isinstance(first, Applied) and first.event_type == "payment.succeeded"
    again = apply(first.payment, C.GATEWAY_SUCCESS, AT + timedelta(seconds=5), "txn-9")
    assert again == Applied(first.payment, changed=False, event_type=None)


def test_late_success_then_refund() -> None:
    expired = apply(payment_in(S.REQUESTED), C.EXPIRY, AT, "timer")
    assert isinstance(expired, Applied)
    late = apply(expired.payment, C.GATEWAY_SUCCESS, AT + timedelta(minutes=1), "txn-9")
    assert isinstance(late, Applied) and late.payment.state == S.REFUND_REQUIRED
    refunded = apply(late.payment, C.REFUND_CONFIRMED, AT + timedelta(minutes=2), "rf-1")
    assert isinstance(refunded, Applied) and refunded.event_type == "payment.refunded"
    assert [h.state for h in refunded.payment.history] == [
        S.EXPIRED,
        S.REFUND_REQUIRED,
        S.REFUNDED,
    ]
    assert paid_at(refunded.payment) == AT + timedelta(minutes=1)


def test_failure_reason_is_kept_in_history() -> None:
    outcome = apply(payment_in(S.REQUESTED), C.GATEWAY_FAILURE, AT, "t", reason="cancelled")
    assert isinstance(outcome, Applied)
    assert outcome.payment.history[-1].reason == "cancelled"


def test_rejection_leaves_nothing_to_publish() -> None:
    outcome = apply(payment_in(S.SUCCEEDED), C.GATEWAY_FAILURE, AT, "t")
    assert isinstance(outcome, Rejected)
    assert not hasattr(outcome, "event_type")


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        apply(payment_in(S.REQUESTED), C.EXPIRY, datetime(2024, 1, 1), "t")


# The gateway's and the timers' causes (refunds finance asks for: test_payment_refunds.py).
GATEWAY_CAUSES = [C.GATEWAY_SUCCESS, C.GATEWAY_FAILURE, C.EXPIRY, C.REFUND_CONFIRMED]


@given(st.lists(st.sampled_from(GATEWAY_CAUSES), max_size=30))
def test_any_sequence_of_causes(causes: list[Cause]) -> None:
    payment = open_payment(order(), "evt-0").payment
    events: list[str] = []
    left_requested = False
    for i, cause in enumerate(causes):
        outcome = apply(payment, cause, AT + timedelta(seconds=i), f"e{i}")
        if isinstance(outcome, Rejected):
            continue
        assert (outcome.event_type is not None) == outcome.changed
        if outcome.event_type:
            events.append(outcome.event_type)
        payment = outcome.payment
        left_requested = left_requested or payment.state != S.REQUESTED
        assert not (left_requested and payment.state == S.REQUESTED)
    assert events.count("payment.succeeded") <= 1
    assert events.count("payment.refunded") <= 1
    assert sum(e != "payment.refunded" for e in events) <= 2  # settle, then maybe late success
    assert payment.version == 1 + len(events) == len(payment.history)


# --- Orders -------------------------------------------------------------------------------------

ACCOUNT = GatewayAccount(gateway="vnpay", merchant="MOTCUA01")


def submitted(**fee: object) -> dict[str, object]:
    return {
        "dossier_id": "000.00.12.H34-190304-0001",
        "agency_code": "000.00.12.H34",
        "procedure_code": "1.001",
        "fee": {"amount_vnd": 150_000, "method": "online", **fee},
    }


def order() -> OrderRequest:
    made = order_for(submitted(), account=ACCOUNT, submitted_at=AT)
    assert made is not None
    return made


def test_online_fee_makes_one_order() -> None:
    made = order_for(submitted(), account=ACCOUNT, submitted_at=AT, ttl=timedelta(minutes=20))
    assert made is not None
    assert made.amount_vnd == 150_000 and made.currency == "VND"
    assert (made.gateway, made.merchant) == ("vnpay", "MOTCUA01")
    assert made.expires_at - made.created_at == timedelta(minutes=20)
    again = order_for(submitted(), account=ACCOUNT, submitted_at=AT + timedelta(hours=1))
    assert again is not None and again.txn_ref == made.txn_ref


@pytest.mark.parametrize(
    "fee",
    [
        {"method": "counter"},
        {"method": "postal_cod"},
        {"method": "none", "amount_vnd": 0},
        {"amount_vnd": 0},
    ],
)
def test_no_order_when_nothing_is_owed_online(fee: dict[str, object]) -> None:
    assert order_for(submitted(**fee), account=ACCOUNT, submitted_at=AT) is None


@pytest.mark.parametrize("fee", [{"method": "cash"}, {"amount_vnd": "150000"}])
def test_malformed_submission_is_an_error(fee: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="fee"):
        order_for(submitted(**fee), account=ACCOUNT, submitted_at=AT)


def test_txn_ref_is_deterministic_gateway_safe_and_distinct() -> None:
    ref = txn_ref_for("000.00.12.H34-190304-0001")
    assert ref == txn_ref_for("000.00.12.H34-190304-0001")
    assert re.fullmatch(r"[0-9A-Za-z]{1,100}", ref)
    assert ref.startswith("0000012H341903040001")
    assert txn_ref_for("A.B-1") != txn_ref_for("AB.-1")
    assert len(txn_ref_for("x" * 500)) == 100


def test_open_payment_announces_the_request() -> None:
    made = order_for(submitted(), account=ACCOUNT, submitted_at=AT)
    assert made is not None
    opened = open_payment(made, "ce-1")
    assert opened.changed and opened.event_type == "payment.requested"
    assert opened.payment.state == S.REQUESTED and opened.payment.version == 1
    assert opened.payment.expires_at == made.expires_at
    assert paid_at(opened.payment) is None


# --- Stuck orders -------------------------------------------------------------------------------


def test_default_plan_queries_before_and_after_expiry_then_expires() -> None:
    expires = AT + timedelta(minutes=15)
    plan = check_plan(AT, expires)
    assert plan == (
        Check(expires - timedelta(minutes=5), "query"),
        Check(expires + timedelta(minutes=1), "query"),
        Check(expires + timedelta(minutes=1), "expire"),
    )


def test_plan_is_configurable_sorted_and_bounded() -> None:
    expires = AT + timedelta(minutes=10)
    schedule = QuerySchedule(
        query_offsets=(
            timedelta(0),
            timedelta(minutes=-30),  # before creation: dropped
            timedelta(minutes=-2),
            timedelta(0),  # repeated: once
            timedelta(minutes=5),  # after the expiry: dropped
        ),
        expire_offset=timedelta(minutes=2),
    )
    assert check_plan(AT, expires, schedule) == (
        Check(expires - timedelta(minutes=2), "query"),
        Check(expires, "query"),
        Check(expires + timedelta(minutes=2), "expire"),
    )


def test_checks_due_in_a_sweep_window() -> None:
    expires = AT + timedelta(minutes=15)
    plan = check_plan(AT, expires)
    first_query, later = expires - timedelta(minutes=5), expires + timedelta(hours=1)
    assert checks_due(plan, AT, first_query) == plan[:1]
    assert checks_due(plan, first_query, later) == plan[1:]
    assert checks_due(plan, later, later + timedelta(hours=1)) == ()


def test_payment_survives_a_json_round_trip() -> None:
    outcome = apply(open_payment(order(), "ce-1").payment, C.GATEWAY_FAILURE, AT, "t", "timeout")
    assert isinstance(outcome, Applied)
    assert Payment.model_validate_json(outcome.payment.model_dump_json()) == outcome.payment


def test_payment_refuses_naive_times() -> None:
    with pytest.raises(ValueError, match="timezone"):
        payment_in(S.REQUESTED).model_validate(
            {**payment_in(S.REQUESTED).model_dump(), "created_at": datetime(2024, 1, 1)}
        )
