"""The postal core: orders by mode, once; COD; addresses; callbacks; stale shipments."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta, timezone
from itertools import pairwise
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.postal.carriers import Leg, PostalStatus
from services.postal.commands import (
    Alert,
    AlertKind,
    BookOrder,
    CancelOrder,
    Command,
    Ignored,
    IgnoreReason,
    PostalEvent,
    QueryOrder,
)
from services.postal.domain import PostalConfig, apply
from services.postal.inputs import (
    BookingFailed,
    CarrierCallback,
    DossierRejected,
    DossierResolved,
    DossierSubmitted,
    DossierWithdrawn,
    Event,
    OrderBooked,
    Tick,
)
from services.postal.plans import (
    Address,
    PostalMode,
    delivery_address,
    order_ref,
    parse_address,
    parse_order_ref,
)
from services.postal.shipments import (
    ALLOWED,
    DossierState,
    initial_state,
    state_from_json,
    state_to_json,
)
from services.postal.stale import (
    StaleAction,
    StalePolicy,
    needs_scan,
    stale_action,
    unacknowledged_bookings,
)

S = PostalStatus
ICT = timezone(timedelta(hours=7))
T0 = datetime(2019, 7, 1, 8, 0, tzinfo=ICT)
DID = "000.00.12.H34-190704-0001"
ADDRESS = {"province": "Khánh Hòa", "district": "Nha Trang", "commune": "Vĩnh Hải", "street": "1"}
FEE = 50_000


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def submitted(
    mode: PostalMode = PostalMode.PICKUP_AND_RETURN,
    *,
    address: object = ADDRESS,
    postal_address: object = None,
    fee_method: str = "postal_cod",
    fee: int = FEE,
) -> DossierSubmitted:
    return DossierSubmitted(
        dossier_id=DID,
        agency_code="000.00.12.H34",
        mode=mode,
        submitted_at=T0,
        applicant_name="Nguyễn Văn A",
        applicant_phone="0905123456",
        applicant_address=address,
        postal_address=postal_address,
        fee_amount_vnd=fee,
        fee_method=fee_method,
    )


def resolved(outcome: str = "approved", hours: float = 48) -> DossierResolved:
    return DossierResolved(DID, resolved_at=at(hours), outcome=outcome)


def booked(leg: Leg, order_id: str | None = None, hours: float = 0.1) -> OrderBooked:
    return OrderBooked(DID, leg, "vnpost", order_id or f"VN-{leg.value}", at(hours))


def callback(
    leg: Leg, code: int | str, hours: float, *, order_id: str | None = None, cod: int | None = None
) -> CarrierCallback:
    return CarrierCallback(
        dossier_id=DID,
        leg=leg,
        carrier="vnpost",
        order_id=order_id or f"VN-{leg.value}",
        code=str(code),
        carrier_time=at(hours),
        cod_amount_vnd=cod,
    )


def run(
    events: Iterable[Event], state: DossierState | None = None
) -> tuple[DossierState, list[Command]]:
    state = state or initial_state(DID)
    out: list[Command] = []
    for event in events:
        state, commands = apply(state, event)
        out.extend(commands)
    return state, out


def bookings(commands: Iterable[Command]) -> list[BookOrder]:
    return [c for c in commands if isinstance(c, BookOrder)]


def events(commands: Iterable[Command]) -> list[PostalEvent]:
    return [c for c in commands if isinstance(c, PostalEvent)]


def alerts(commands: Iterable[Command]) -> list[Alert]:
    return [c for c in commands if isinstance(c, Alert)]


def types(commands: Iterable[Command]) -> list[str]:
    return [e.type for e in events(commands)]


def booked_state(mode: PostalMode = PostalMode.PICKUP_AND_RETURN) -> DossierState:
    state, _ = run([submitted(mode), resolved(hours=1)])
    return run(
        [booked(leg) for leg in mode.legs],
        state,
    )[0]


# --- orders by mode --------------------------------------------------------------------------

MODE_AT_SUBMISSION = {
    PostalMode.NONE: set(),
    PostalMode.PICKUP: {Leg.PICKUP},
    PostalMode.RETURN: set(),
    PostalMode.PICKUP_AND_RETURN: {Leg.PICKUP},
}


@pytest.mark.parametrize("mode", list(PostalMode))
@pytest.mark.parametrize("outcome", ["approved", "denied"])
def test_each_mode_books_exactly_its_orders(mode: PostalMode, outcome: str) -> None:
    state, at_submission = apply(initial_state(DID), submitted(mode))
    assert {b.leg for b in bookings(at_submission)} == MODE_AT_SUBMISSION[mode]
    _, at_resolution = apply(state, resolved(outcome))
    assert {b.leg for b in bookings(at_resolution)} == mode.legs - MODE_AT_SUBMISSION[mode]
    assert len(bookings([*at_submission, *at_resolution])) == len(mode.legs)


def test_booking_carries_a_deterministic_reference_and_the_applicant_end() -> None:
    _, commands = run([submitted(), resolved()])
    pickup, ret = bookings(commands)
    assert (pickup.leg, ret.leg) == (Leg.PICKUP, Leg.RETURN)
    assert pickup.order_ref == order_ref(DID, Leg.PICKUP) == f"{DID}:pickup"
    assert ret.order_ref == f"{DID}:return"
    assert pickup.carrier == "vnpost"
    assert pickup.address == Address("Khánh Hòa", "Nha Trang", "Vĩnh Hải", "1")
    assert (pickup.contact_name, pickup.contact_phone) == ("Nguyễn Văn A", "0905123456")


def test_redelivered_events_book_nothing_more() -> None:
    state, first = run([submitted(), resolved()])
    assert len(bookings(first)) == 2
    _, again = run(
        [submitted(), resolved(), submitted(PostalMode.PICKUP), resolved("denied")], state
    )
    assert again == []


def test_a_dossier_event_before_the_submission_is_ignored_and_the_story_starts_with_it() -> None:
    early, ignored = run([resolved(), DossierWithdrawn(DID, at(1)), DossierRejected(DID)])
    assert early == initial_state(DID)
    assert [c.reason for c in ignored if isinstance(c, Ignored)] == [IgnoreReason.NO_DOSSIER] * 3
    _, commands = run([submitted(PostalMode.RETURN), resolved(), submitted()], early)
    assert [b.leg for b in bookings(commands)] == [Leg.RETURN]


def test_a_dossier_without_postal_legs_leaves_nothing_behind() -> None:
    state, commands = run([submitted(PostalMode.NONE), resolved(), DossierWithdrawn(DID, at(9))])
    assert state == initial_state(DID)
    assert [type(c) for c in commands] == [Ignored, Ignored]


def test_booking_acknowledgement_publishes_requested_once() -> None:
    state, _ = run([submitted(), resolved()])
    _, commands = run([booked(Leg.PICKUP), booked(Leg.PICKUP), booked(Leg.RETURN)], state)
    assert types(commands) == ["postal.pickup_requested", "postal.return_requested"]
    assert [c.reason for c in commands if isinstance(c, Ignored)] == [IgnoreReason.DUPLICATE]
    first = events(commands)[0]
    assert first.data() == {
        "dossier_id": DID,
        "leg": "pickup",
        "carrier": "vnpost",
        "order_id": "VN-pickup",
        "cod_amount_vnd": FEE,
    }


def test_a_second_order_id_for_the_same_leg_is_cancelled_and_alerted() -> None:
    state, _ = run([submitted(PostalMode.PICKUP), booked(Leg.PICKUP)])
    _, commands = apply(state, booked(Leg.PICKUP, order_id="VN-other"))
    assert alerts(commands)[0].kind is AlertKind.DUPLICATE_ORDER
    cancel = [c for c in commands if isinstance(c, CancelOrder)]
    assert [c.order_id for c in cancel] == ["VN-other"]


def test_booking_refused_by_the_carrier_is_a_failure_with_its_reason() -> None:
    state, _ = run([submitted(PostalMode.PICKUP)])
    state, commands = apply(state, BookingFailed(DID, Leg.PICKUP, "carrier_rejected", at(1)))
    assert [(e.type, e.reason) for e in events(commands)] == [("postal.failed", "carrier_rejected")]
    _, later = run(
        [BookingFailed(DID, Leg.PICKUP, "carrier_rejected", at(2)), Tick(DID, at(500))], state
    )
    assert events(later) == []


def test_withdrawal_cancels_an_untouched_pickup_and_prevents_the_return() -> None:
    state, _ = run([submitted(), booked(Leg.PICKUP)])
    state, commands = run([DossierWithdrawn(DID, at(2)), DossierWithdrawn(DID, at(3))], state)
    assert commands == [CancelOrder(DID, Leg.PICKUP, "vnpost", f"{DID}:pickup", "VN-pickup")]
    _, after = apply(state, resolved())
    assert after == ()


def test_withdrawal_after_collection_cancels_nothing() -> None:
    state, _ = run([submitted(PostalMode.PICKUP), booked(Leg.PICKUP), callback(Leg.PICKUP, 6, 1)])
    assert apply(state, DossierWithdrawn(DID, at(2))).commands == ()


def test_event_for_another_dossier_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="applied to"):
        apply(initial_state("other"), submitted())


# hypothesis: whatever the order and repetition of inputs, at most one order per leg

MODES = st.sampled_from(list(PostalMode))
DOSSIER_EVENTS: st.SearchStrategy[Event] = st.one_of(
    MODES.map(submitted),
    st.builds(resolved, st.sampled_from(["approved", "denied"]), st.floats(1, 100)),
    st.builds(DossierWithdrawn, st.just(DID), st.just(at(5))),
    st.builds(booked, st.sampled_from(list(Leg))),
    st.builds(callback, st.sampled_from(list(Leg)), st.integers(0, 22), st.floats(0, 100)),
)
TICKS: st.SearchStrategy[Event] = st.builds(Tick, st.just(DID), st.floats(0, 400).map(at))


@settings(max_examples=300)
@given(st.lists(DOSSIER_EVENTS, max_size=30))
def test_any_sequence_of_dossier_events_books_at_most_one_order_per_leg(
    sequence: list[Event],
) -> None:
    _, commands = run(sequence)
    legs = [b.leg for b in bookings(commands)]
    assert legs.count(Leg.PICKUP) <= 1
    assert legs.count(Leg.RETURN) <= 1


@settings(max_examples=300)
@given(st.lists(st.one_of(DOSSIER_EVENTS, TICKS), max_size=40))
def test_resent_bookings_are_always_the_same_order(sequence: list[Event]) -> None:
    # a tick may resend an unacknowledged booking: same command, same idempotency key
    _, commands = run(sequence)
    for leg in Leg:
        assert len({b for b in bookings(commands) if b.leg is leg}) <= 1


@settings(max_examples=200)
@given(MODES, st.lists(st.sampled_from(["submitted", "resolved"]), min_size=1, max_size=10))
def test_submitted_and_resolved_in_any_order_book_exactly_the_modes_legs(
    mode: PostalMode, order: list[str]
) -> None:
    sequence: list[Event] = [submitted(mode) if o == "submitted" else resolved() for o in order]
    _, commands = run([*sequence, submitted(mode), resolved()])
    assert sorted(b.leg for b in bookings(commands)) == sorted(mode.legs)


@settings(max_examples=100)
@given(st.lists(st.one_of(DOSSIER_EVENTS, TICKS), max_size=30))
def test_state_round_trips_through_json(sequence: list[Event]) -> None:
    state, _ = run(sequence)
    assert state_from_json(state_to_json(state)) == state


# --- fee collected on behalf -----------------------------------------------------------------


def test_postal_cod_puts_the_fee_on_the_pickup_only() -> None:
    _, commands = run([submitted(), resolved()])
    assert [(b.leg, b.cod_amount_vnd) for b in bookings(commands)] == [
        (Leg.PICKUP, FEE),
        (Leg.RETURN, 0),
    ]


def test_postal_cod_without_pickup_goes_with_the_return() -> None:
    _, commands = run([submitted(PostalMode.RETURN), resolved()])
    assert [b.cod_amount_vnd for b in bookings(commands)] == [FEE]


@pytest.mark.parametrize("method", ["online", "counter", "none"])
def test_other_fee_methods_collect_nothing(method: str) -> None:
    _, commands = run([submitted(fee_method=method), resolved()])
    assert [b.cod_amount_vnd for b in bookings(commands)] == [0, 0]


def test_cod_collected_with_the_right_amount() -> None:
    _, commands = run([callback(Leg.PICKUP, 21, 3, cod=FEE)], booked_state())
    (event,) = events(commands)
    assert event.type == "postal.cod_collected"
    assert (event.amount_vnd, event.expected_amount_vnd, event.amount_mismatch) == (FEE, FEE, False)
    assert alerts(commands) == []


@pytest.mark.parametrize("amount", [FEE - 1, FEE + 1, 0, None])
def test_cod_amount_that_differs_from_the_fee_is_flagged(amount: int | None) -> None:
    _, commands = run([callback(Leg.PICKUP, 21, 3, cod=amount)], booked_state())
    (event,) = events(commands)
    assert event.amount_mismatch is True
    assert event.amount_vnd == amount and event.expected_amount_vnd == FEE
    assert [a.kind for a in alerts(commands)] == [AlertKind.COD_MISMATCH]


def test_cod_on_a_leg_that_expected_none_is_flagged() -> None:
    _, commands = run([callback(Leg.RETURN, 21, 3, cod=FEE)], booked_state())
    assert events(commands)[0].amount_mismatch is True


def test_cod_is_published_once_and_does_not_hold_back_the_status() -> None:
    # COD paid reported before delivery; the (older) delivery must still apply
    state = booked_state(PostalMode.PICKUP)
    _, commands = run(
        [
            callback(Leg.PICKUP, 21, 5, cod=FEE),
            callback(Leg.PICKUP, 21, 6, cod=FEE),
            callback(Leg.PICKUP, 14, 4),
        ],
        state,
    )
    assert types(commands) == ["postal.cod_collected", "postal.delivered_to_agency"]


# --- addresses -------------------------------------------------------------------------------

INVALID_ADDRESSES: list[Any] = [
    None,
    "12 Trần Phú, Nha Trang, Khánh Hòa",
    {},
    {"district": "Nha Trang", "commune": "Vĩnh Hải"},
    {"province": "Khánh Hòa", "commune": "Vĩnh Hải"},
    {"province": "Khánh Hòa", "district": "Nha Trang"},
    {**ADDRESS, "district": "   "},
    {**ADDRESS, "commune": 7},
    {**ADDRESS, "street": 12},
    ["Khánh Hòa", "Nha Trang", "Vĩnh Hải"],
]


@pytest.mark.parametrize("raw", INVALID_ADDRESSES)
def test_invalid_address_is_none(raw: object) -> None:
    assert parse_address(raw) is None


def test_valid_address_is_trimmed_and_street_is_optional() -> None:
    raw = {"province": " Khánh Hòa ", "district": "Nha Trang", "commune": "Vĩnh Hải", "x": 1}
    assert parse_address(raw) == Address("Khánh Hòa", "Nha Trang", "Vĩnh Hải", None)
    assert parse_address({**raw, "street": "  "}) == Address("Khánh Hòa", "Nha Trang", "Vĩnh Hải")


def test_postal_address_wins_and_never_falls_back() -> None:
    other = {**ADDRESS, "commune": "Lộc Thọ"}
    assert delivery_address(other, ADDRESS) == parse_address(other)
    assert delivery_address({"province": "Khánh Hòa"}, ADDRESS) is None
    assert delivery_address(None, ADDRESS) == parse_address(ADDRESS)


@pytest.mark.parametrize("raw", INVALID_ADDRESSES)
@pytest.mark.parametrize(
    "mode", [PostalMode.PICKUP, PostalMode.RETURN, PostalMode.PICKUP_AND_RETURN]
)
def test_invalid_address_books_nothing_and_fails_each_wanted_leg(
    raw: object, mode: PostalMode
) -> None:
    state, commands = apply(initial_state(DID), submitted(mode, address=raw))
    assert bookings(commands) == []
    failures = events(commands)
    assert {e.leg for e in failures} == mode.legs
    assert all(e.type == "postal.failed" and e.reason == "invalid_address" for e in failures)
    assert all(e.time == T0 for e in failures)
    _, later = run([resolved(), submitted(mode), Tick(DID, at(1000))], state)
    assert later == []


def test_invalid_postal_address_is_invalid_even_with_a_good_applicant_address() -> None:
    _, commands = apply(initial_state(DID), submitted(postal_address="somewhere"))
    assert bookings(commands) == [] and len(events(commands)) == 2


def test_mode_none_ignores_the_address() -> None:
    assert apply(initial_state(DID), submitted(PostalMode.NONE, address=None)).commands == ()


# --- callbacks -------------------------------------------------------------------------------


def test_pickup_happy_path_one_event_per_transition() -> None:
    sequence = [2, 4, 6, 7, 10, 11, 12, 14]  # assigned ... delivered
    calls = [callback(Leg.PICKUP, c, h) for h, c in enumerate(sequence, start=1)]
    state, commands = run(calls, booked_state(PostalMode.PICKUP))
    assert types(commands) == ["postal.picked_up", "postal.delivered_to_agency"]
    assert [e.carrier_code for e in events(commands)] == ["6", "14"]
    assert [e.time for e in events(commands)] == [at(3), at(8)]
    assert alerts(commands) == []  # 7/10/11/12 repeat picked_up: a no-op, not an anomaly
    # delivered, but the COD it carries was never reported: still watched until it is
    assert state.pickup is not None and state.pickup.cod_pending and not state.pickup.closed
    state, _ = apply(state, callback(Leg.PICKUP, 21, 9, cod=FEE))
    assert state.pickup is not None and state.pickup.closed


def test_return_happy_path_one_event_per_transition() -> None:
    calls = [callback(Leg.RETURN, c, h) for h, c in enumerate([1, 2, 6, 10, 12, 14], start=2)]
    _, commands = run(calls, booked_state(PostalMode.RETURN))
    assert types(commands) == ["postal.out_for_delivery", "postal.delivered"]


def test_return_delivery_failure_then_back_to_the_agency() -> None:
    calls = [callback(Leg.RETURN, c, h) for h, c in enumerate([12, 15, 16, 18, 19], start=2)]
    _, commands = run(calls, booked_state(PostalMode.RETURN))
    assert [(e.type, e.reason) for e in events(commands)] == [
        ("postal.out_for_delivery", None),
        ("postal.failed", "delivery_failed"),
        ("postal.returned_to_agency", None),
    ]


def test_failed_collection_can_still_succeed_later() -> None:
    calls = [callback(Leg.PICKUP, c, h) for h, c in enumerate([5, 4, 6, 14], start=2)]
    _, commands = run(calls, booked_state(PostalMode.PICKUP))
    assert types(commands) == ["postal.failed", "postal.picked_up", "postal.delivered_to_agency"]


def test_duplicate_callbacks_are_ignored() -> None:
    state = booked_state(PostalMode.PICKUP)
    first = callback(Leg.PICKUP, 6, 2)
    state, commands = run([first, first, callback(Leg.PICKUP, " 6", 2)], state)
    assert types(commands) == ["postal.picked_up"]
    assert [c.reason for c in commands if isinstance(c, Ignored)] == [IgnoreReason.DUPLICATE] * 2


def test_same_instant_in_another_offset_is_the_same_callback() -> None:
    state = booked_state(PostalMode.PICKUP)
    cb = callback(Leg.PICKUP, 6, 2)
    utc = CarrierCallback(**{**cb.__dict__, "carrier_time": cb.carrier_time.astimezone(UTC)})
    _, commands = run([cb, utc], state)
    assert types(commands) == ["postal.picked_up"]


def test_callback_older_than_the_last_applied_is_ignored() -> None:
    state = booked_state(PostalMode.RETURN)
    _, commands = run(
        [callback(Leg.RETURN, 14, 10), callback(Leg.RETURN, 12, 9), callback(Leg.RETURN, 15, 9.5)],
        state,
    )
    assert types(commands) == ["postal.delivered"]
    assert [c.reason for c in commands if isinstance(c, Ignored)] == [IgnoreReason.OUT_OF_ORDER] * 2


def test_no_change_codes_still_move_the_watermark() -> None:
    state = booked_state(PostalMode.PICKUP)
    _, commands = run([callback(Leg.PICKUP, 2, 5), callback(Leg.PICKUP, 5, 4)], state)
    assert events(commands) == []


def test_callbacks_at_the_same_time_with_different_codes_both_apply() -> None:
    state = booked_state(PostalMode.PICKUP)
    _, commands = run([callback(Leg.PICKUP, 6, 5), callback(Leg.PICKUP, 14, 5)], state)
    assert types(commands) == ["postal.picked_up", "postal.delivered_to_agency"]


@pytest.mark.parametrize("code", ["17", "99", "-1", "x"])
def test_unknown_code_is_alerted_not_raised(code: str) -> None:
    state = booked_state(PostalMode.PICKUP)
    state, commands = apply(state, callback(Leg.PICKUP, code, 2))
    assert [a.kind for a in alerts(commands)] == [AlertKind.UNKNOWN_CODE]
    assert events(commands) == []
    assert state.pickup is not None and state.pickup.status is S.PICKUP_REQUESTED
    # and it does not hide an older real update
    assert types(apply(state, callback(Leg.PICKUP, 6, 1)).commands) == ["postal.picked_up"]


def test_unknown_carrier_or_order_is_alerted() -> None:
    state = booked_state(PostalMode.PICKUP)
    other_carrier = CarrierCallback(DID, Leg.PICKUP, "ghn", "VN-pickup", "6", at(2))
    commands = [
        *apply(state, other_carrier).commands,
        *apply(state, callback(Leg.PICKUP, 6, 2, order_id="VN-else")).commands,
        *apply(state, callback(Leg.RETURN, 6, 2)).commands,  # no return leg in this mode
    ]
    assert [c.kind for c in commands if isinstance(c, Alert)] == [AlertKind.UNKNOWN_ORDER] * 3


def test_terminal_status_never_goes_back() -> None:
    state = booked_state(PostalMode.RETURN)
    state, _ = apply(state, callback(Leg.RETURN, 14, 2))
    state, commands = run([callback(Leg.RETURN, 15, 3), callback(Leg.RETURN, 19, 4)], state)
    assert events(commands) == []
    assert [a.kind for a in alerts(commands)] == [AlertKind.ILLEGAL_TRANSITION] * 2
    assert state.return_ is not None and state.return_.status is S.DELIVERED


def test_callback_before_the_booking_acknowledgement_acknowledges_it() -> None:
    state, _ = run([submitted(PostalMode.RETURN), resolved()])
    state, commands = run([callback(Leg.RETURN, 12, 50), booked(Leg.RETURN, hours=49)], state)
    assert types(commands) == ["postal.return_requested", "postal.out_for_delivery"]
    assert state.return_ is not None and state.return_.order_id == "VN-return"


CALLBACKS = st.builds(
    callback,
    st.sampled_from(list(Leg)),
    st.integers(-1, 23),
    st.integers(1, 30).map(float),
    cod=st.sampled_from([None, FEE]),
)


@settings(max_examples=300)
@given(st.lists(CALLBACKS, max_size=40), st.randoms(use_true_random=False))
def test_any_callback_sequence_yields_a_legal_path_of_unique_events(
    calls: list[CarrierCallback], rnd: Any
) -> None:
    doubled = calls + calls  # every callback redelivered, in a shuffled order
    rnd.shuffle(doubled)
    state, commands = run(doubled, booked_state())
    published = events(commands)
    assert len({e.event_id for e in published}) == len(published)
    for leg in Leg:
        statuses = [e.status for e in published if e.leg is leg and e.status is not S.COD_COLLECTED]
        path = [S.PICKUP_REQUESTED if leg is Leg.PICKUP else S.RETURN_REQUESTED, *statuses]
        for before, after in pairwise(path):
            assert after in ALLOWED[leg][before], (leg, path)
        shipment = state.shipment(leg)
        assert shipment is not None and shipment.status is path[-1]
        cods = [e for e in published if e.leg is leg and e.status is S.COD_COLLECTED]
        assert len(cods) <= 1


# --- stale shipments -------------------------------------------------------------------------

POLICY = StalePolicy(query_after_hours=24, give_up_after_days=7)
TINY = timedelta(microseconds=1)


@pytest.mark.parametrize(
    ("idle", "expected"),
    [
        (timedelta(0), StaleAction.WAIT),
        (timedelta(hours=24) - TINY, StaleAction.WAIT),
        (timedelta(hours=24), StaleAction.QUERY),
        (timedelta(days=7) - TINY, StaleAction.QUERY),
        (timedelta(days=7), StaleAction.GIVE_UP),
        (timedelta(days=70), StaleAction.GIVE_UP),
        (-timedelta(hours=1), StaleAction.WAIT),  # carrier clock ahead of ours
    ],
)
def test_stale_thresholds_at_their_edges(idle: timedelta, expected: StaleAction) -> None:
    assert stale_action(T0, T0 + idle, POLICY) is expected


def test_a_query_is_not_repeated_before_the_query_interval() -> None:
    now = T0 + timedelta(hours=30)
    assert stale_action(T0, now, POLICY, now - timedelta(hours=24) + TINY) is StaleAction.WAIT
    assert stale_action(T0, now, POLICY, now - timedelta(hours=24)) is StaleAction.QUERY
    assert stale_action(T0, T0 + timedelta(days=7), POLICY, T0 + timedelta(days=7)) is (
        StaleAction.GIVE_UP
    )


def test_offsets_do_not_matter_for_staleness() -> None:
    now_utc = (T0 + timedelta(hours=24)).astimezone(UTC)
    assert stale_action(T0, now_utc, POLICY) is StaleAction.QUERY


@pytest.mark.parametrize(("hours", "days"), [(0, 7), (-1, 7), (24, 1), (48, 1)])
def test_policy_needs_query_before_give_up(hours: float, days: float) -> None:
    with pytest.raises(ValueError):
        StalePolicy(query_after_hours=hours, give_up_after_days=days)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        stale_action(datetime(2019, 7, 1), T0, POLICY)
    with pytest.raises(ValueError, match="aware"):
        Tick(DID, datetime(2019, 7, 1))


def test_scan_queries_then_gives_up_as_stale() -> None:
    state = booked_state(PostalMode.PICKUP)  # booked at T0, acknowledged
    booked_at = state.pickup.last_update_at if state.pickup else T0
    ticks = [Tick(DID, booked_at + timedelta(hours=h)) for h in (23, 24, 25, 48, 167, 168, 200)]
    config = PostalConfig(stale=POLICY)
    outputs: list[Sequence[Command]] = []
    for tick in ticks:
        state, commands = apply(state, tick, config)
        outputs.append(commands)
    q = QueryOrder(DID, Leg.PICKUP, "vnpost", f"{DID}:pickup", "VN-pickup")
    assert outputs[:5] == [(), (q,), (), (q,), (q,)]
    assert [(e.type, e.reason) for e in events(outputs[5])] == [("postal.failed", "stale")]
    assert [a.kind for a in alerts(outputs[5])] == [AlertKind.STALE]
    assert outputs[6] == ()


def test_callbacks_reset_the_stale_clock() -> None:
    state = booked_state(PostalMode.PICKUP)
    state, _ = apply(state, callback(Leg.PICKUP, 2, 20))  # a no-change code is still news
    assert apply(state, Tick(DID, at(20 + 23))).commands == ()
    assert isinstance(apply(state, Tick(DID, at(20 + 24))).commands[0], QueryOrder)


def test_unacknowledged_booking_is_resent_with_the_same_key() -> None:
    state, commands = run([submitted(PostalMode.PICKUP)])
    (original,) = bookings(commands)
    state, resent = apply(state, Tick(DID, at(24)))
    assert resent == (original,)
    _, gave_up = apply(state, Tick(DID, at(7 * 24)))
    assert types(gave_up) == ["postal.failed"]


def test_stale_after_a_failure_is_not_counted_as_a_second_failure() -> None:
    state = booked_state(PostalMode.PICKUP)
    state, commands = apply(state, callback(Leg.PICKUP, 5, 1))
    assert types(commands) == ["postal.failed"]
    _, commands = apply(state, Tick(DID, at(1 + 7 * 24)))
    assert events(commands) == [] and [a.kind for a in alerts(commands)] == [AlertKind.STALE]


def test_a_late_callback_after_giving_up_still_applies() -> None:
    state = booked_state(PostalMode.PICKUP)
    state, _ = apply(state, Tick(DID, at(8 * 24)))
    _, commands = apply(state, callback(Leg.PICKUP, 14, 8 * 24 + 1))
    assert types(commands) == ["postal.delivered_to_agency"]


def test_terminal_legs_are_not_scanned() -> None:
    state = booked_state(PostalMode.PICKUP)
    state, _ = apply(state, callback(Leg.PICKUP, 21, 1, cod=FEE))
    state, _ = apply(state, callback(Leg.PICKUP, 14, 2))
    assert apply(state, Tick(DID, at(1000))).commands == ()


def test_a_delivery_whose_cod_report_was_lost_is_queried_then_alerted_not_failed() -> None:
    state = booked_state(PostalMode.PICKUP)
    state, _ = apply(state, callback(Leg.PICKUP, 14, 2))
    policy = StalePolicy()
    assert needs_scan(state, at(2) + policy.query_after, policy, timedelta(minutes=1))
    state, commands = apply(state, Tick(DID, at(2) + policy.query_after))
    assert [type(c) for c in commands] == [QueryOrder]
    state, commands = apply(state, Tick(DID, at(2) + policy.give_up_after))
    assert events(commands) == []
    assert [a.kind for a in alerts(commands)] == [AlertKind.COD_MISMATCH]
    assert state.pickup is not None and state.pickup.closed


def test_cod_paid_counts_even_when_it_arrives_after_a_newer_status() -> None:
    state = booked_state(PostalMode.PICKUP)
    state, _ = apply(state, callback(Leg.PICKUP, 14, 5))
    state, commands = apply(state, callback(Leg.PICKUP, 21, 3, cod=FEE))
    assert types(commands) == ["postal.cod_collected"]
    assert state.pickup is not None and state.pickup.closed


def test_a_rejected_dossier_cancels_its_untouched_pickup_and_books_no_return() -> None:
    state, _ = run([submitted(PostalMode.PICKUP_AND_RETURN)])
    state, _ = apply(state, booked(Leg.PICKUP))
    state, commands = apply(state, DossierRejected(DID, "incomplete"))
    assert [(type(c), c.leg) for c in commands] == [(CancelOrder, Leg.PICKUP)]
    assert apply(state, DossierRejected(DID, "again")).commands == ()
    assert apply(state, resolved(hours=2)).commands == ()
    assert unacknowledged_bookings(state) == ()


def test_unacknowledged_bookings_are_found_for_the_scan() -> None:
    state, commands = run([submitted(PostalMode.PICKUP)])
    assert unacknowledged_bookings(state) == tuple(c for c in commands if isinstance(c, BookOrder))
    assert needs_scan(state, T0 + timedelta(minutes=2), StalePolicy(), timedelta(minutes=1))
    assert not needs_scan(state, T0, StalePolicy(), timedelta(minutes=1))


# --- references and parsing ------------------------------------------------------------------


@pytest.mark.parametrize("leg", list(Leg))
@pytest.mark.parametrize("dossier_id", [DID, "a:b:c", "x"])
def test_order_ref_round_trips(dossier_id: str, leg: Leg) -> None:
    assert parse_order_ref(order_ref(dossier_id, leg)) == (dossier_id, leg)


@pytest.mark.parametrize("ref", ["", "pickup", ":pickup", f"{DID}:lost", f"{DID}-pickup"])
def test_bad_order_refs_are_none(ref: str) -> None:
    assert parse_order_ref(ref) is None


def test_submitted_from_contract_data() -> None:
    data = {
        "dossier_id": DID,
        "agency_code": "000.00.12.H34",
        "applicant": {"name": "Nguyễn Văn A", "phone": "0905123456", "address": ADDRESS},
        "fee": {"amount_vnd": FEE, "method": "postal_cod"},
        "postal": {"mode": "pickup_and_return"},
        "submitted_at": "2019-07-01T08:00:00+07:00",
    }
    assert DossierSubmitted.from_data(data) == submitted()
    assert DossierResolved.from_data(
        {"dossier_id": DID, "resolved_at": "2019-07-03T08:00:00+07:00", "outcome": "denied"}
    ) == resolved("denied")
    with pytest.raises(ValueError):
        DossierSubmitted.from_data({**data, "submitted_at": "2019-07-01T08:00:00"})
    with pytest.raises(ValueError):
        DossierSubmitted.from_data({**data, "postal": {"mode": "drone"}})
