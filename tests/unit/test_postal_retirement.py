"""When a dossier's story is over for postal (`retire_at`), when a tick is next due for it
(`next_tick_at`), and what a late `dossier.submitted` of a retired dossier does (`from_retired`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.postal.carriers import Leg
from services.postal.commands import Alert, AlertKind, Command, Ignored, IgnoreReason
from services.postal.domain import PostalConfig, apply, from_retired, next_tick_at, retire_at
from services.postal.inputs import (
    CarrierCallback,
    DossierRejected,
    DossierResolved,
    DossierSubmitted,
    DossierWithdrawn,
    Event,
    OrderBooked,
    Tick,
)
from services.postal.plans import PostalMode
from services.postal.shipments import DossierState, initial_state
from services.postal.stale import StalePolicy, due_rebookings

ICT = timezone(timedelta(hours=7))
T0 = datetime(2019, 7, 1, 8, 0, tzinfo=ICT)
DID = "000.00.12.H34-190704-0001"
ADDRESS = {"province": "Khánh Hòa", "district": "Nha Trang", "commune": "Vĩnh Hải", "street": "1"}
FEE = 50_000
GRACE = timedelta(days=30)
CONFIG = PostalConfig(stale=StalePolicy(query_after_hours=24, give_up_after_days=7))
REBOOK = timedelta(minutes=1)
# VNPost codes: 6 picked up, 14 delivered (to the agency on a pickup), 21 COD paid, 9 cancelled
PICKED_UP, DELIVERED, COD_PAID, CANCELLED = 6, 14, 21, 9


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def submitted(
    mode: PostalMode = PostalMode.PICKUP,
    *,
    cod: bool = False,
    address: object = ADDRESS,
    recorded_at: datetime | None = None,
) -> DossierSubmitted:
    return DossierSubmitted(
        dossier_id=DID,
        agency_code="000.00.12.H34",
        mode=mode,
        submitted_at=T0,
        applicant_name="Nguyễn Văn A",
        applicant_address=address,
        fee_amount_vnd=FEE,
        fee_method="postal_cod" if cod else "online",
        recorded_at=recorded_at,
    )


def booked(leg: Leg, hours: float = 0.1) -> OrderBooked:
    return OrderBooked(DID, leg, "vnpost", f"VN-{leg.value}", at(hours))


def callback(leg: Leg, code: int, hours: float, cod: int | None = None) -> CarrierCallback:
    return CarrierCallback(DID, leg, "vnpost", f"VN-{leg.value}", str(code), at(hours), cod)


def run(events: Iterable[Event], state: DossierState | None = None) -> DossierState:
    state = state or initial_state(DID)
    for event in events:
        state = apply(state, event, CONFIG).state
    return state


def delivered_pickup(*, cod: bool = False) -> DossierState:
    steps: list[Event] = [
        submitted(cod=cod),
        booked(Leg.PICKUP),
        callback(Leg.PICKUP, PICKED_UP, 2),
    ]
    return run([*steps, callback(Leg.PICKUP, DELIVERED, 5)])


# --- when the story is over -------------------------------------------------------------------


def test_nothing_held_or_a_leg_open_is_never_retired() -> None:
    assert retire_at(initial_state(DID), CONFIG) is None
    booked_pickup = run([submitted(), booked(Leg.PICKUP)])
    assert retire_at(booked_pickup, CONFIG) is None
    assert retire_at(run([callback(Leg.PICKUP, PICKED_UP, 2)], booked_pickup), CONFIG) is None


def test_a_delivered_leg_retires_the_grace_after_its_last_news() -> None:
    assert retire_at(delivered_pickup(), CONFIG) == at(5) + GRACE


def test_a_delivery_whose_cod_is_not_reported_waits_for_the_report_or_the_give_up() -> None:
    pending = delivered_pickup(cod=True)
    assert retire_at(pending, CONFIG) is None
    paid = run([callback(Leg.PICKUP, COD_PAID, 9, cod=FEE)], pending)
    assert retire_at(paid, CONFIG) == at(5) + GRACE  # COD does not move the leg's clock
    given_up = apply(pending, Tick(DID, at(5) + timedelta(days=7)), CONFIG).state
    assert given_up.pickup is not None and given_up.pickup.abandoned
    assert retire_at(given_up, CONFIG) == at(5) + GRACE


def test_a_return_still_to_be_booked_keeps_the_dossier() -> None:
    both = run([submitted(PostalMode.PICKUP_AND_RETURN), booked(Leg.PICKUP)])
    both = run([callback(Leg.PICKUP, DELIVERED, 5)], both)
    assert both.return_ is None and retire_at(both, CONFIG) is None
    resolved = run([DossierResolved(DID, at(24)), booked(Leg.RETURN, 25)], both)
    assert retire_at(resolved, CONFIG) is None
    returned = run([callback(Leg.RETURN, DELIVERED, 30)], resolved)
    assert retire_at(returned, CONFIG) == at(30) + GRACE


@pytest.mark.parametrize("stop", [DossierWithdrawn(DID, at(3)), DossierRejected(DID, "x")])
def test_a_withdrawn_or_rejected_dossier_retires_once_its_booked_legs_are_closed(
    stop: Event,
) -> None:
    state = run([submitted(PostalMode.PICKUP_AND_RETURN), booked(Leg.PICKUP), stop])
    assert retire_at(state, CONFIG) is None  # the cancelled pickup waits for its last word
    cancelled = run([callback(Leg.PICKUP, CANCELLED, 4)], state)
    assert cancelled.pickup is not None and not cancelled.pickup.closed
    given_up = apply(cancelled, Tick(DID, at(4) + timedelta(days=7)), CONFIG).state
    assert retire_at(given_up, CONFIG) == at(4) + GRACE
    never_booked = run([submitted(PostalMode.RETURN), stop])
    assert retire_at(never_booked, CONFIG) == T0 + GRACE


def test_an_unroutable_address_retires_after_its_failures() -> None:
    state = run([submitted(PostalMode.PICKUP_AND_RETURN, address="somewhere")])
    assert state.pickup is not None and state.return_ is not None
    assert retire_at(state, CONFIG) == T0 + GRACE


def test_a_tick_retires_the_dossier_at_its_moment_and_not_before() -> None:
    state = delivered_pickup()
    moment = retire_at(state, CONFIG)
    assert moment is not None
    assert apply(state, Tick(DID, moment - timedelta(seconds=1)), CONFIG) == (state, ())
    assert apply(state, Tick(DID, moment), CONFIG) == (initial_state(DID), ())


def test_late_news_within_the_grace_still_applies_and_moves_the_moment() -> None:
    cod_late = run([callback(Leg.PICKUP, COD_PAID, 24 * 20, cod=FEE)], delivered_pickup())
    assert cod_late.pickup is not None and cod_late.pickup.cod_collected
    given_up = apply(run([submitted(), booked(Leg.PICKUP)]), Tick(DID, at(24 * 8)), CONFIG).state
    assert retire_at(given_up, CONFIG) == at(0.1) + GRACE
    delivered = run([callback(Leg.PICKUP, DELIVERED, 24 * 9)], given_up)
    assert retire_at(delivered, CONFIG) == at(24 * 9) + GRACE


# --- a retired dossier's late inputs ----------------------------------------------------------


def test_a_submission_recorded_before_the_horizon_is_not_booked_again() -> None:
    now = at(24 * 90)
    old = submitted(recorded_at=now - GRACE - timedelta(seconds=1))
    assert from_retired(initial_state(DID), old, now, CONFIG) == Ignored(
        IgnoreReason.RETIRED, DID, None
    )
    recent = submitted(recorded_at=now - GRACE)  # a replay of old data is recorded now
    assert from_retired(initial_state(DID), recent, now, CONFIG) is None
    assert from_retired(initial_state(DID), submitted(), now, CONFIG) is None  # not recorded
    held = run([submitted()])
    assert from_retired(held, old, now, CONFIG) is None  # held: the core dedupes it
    assert from_retired(initial_state(DID), Tick(DID, now), now, CONFIG) is None


def test_a_longer_history_window_books_a_submission_that_trails_by_more_than_the_grace() -> None:
    now = at(24 * 90)
    wider = PostalConfig(retire_after=GRACE, history_after=GRACE * 2)
    trailing = submitted(recorded_at=now - GRACE - timedelta(days=1))
    assert from_retired(initial_state(DID), trailing, now, wider) is None
    older = submitted(recorded_at=now - GRACE * 2 - timedelta(seconds=1))
    assert from_retired(initial_state(DID), older, now, wider) == Ignored(
        IgnoreReason.RETIRED, DID, None
    )
    shorter = PostalConfig(retire_after=GRACE, history_after=GRACE / 2)  # the grace is the floor
    assert from_retired(initial_state(DID), trailing, now, shorter) == Ignored(
        IgnoreReason.RETIRED, DID, None
    )


def test_other_late_inputs_of_a_retired_dossier_book_and_publish_nothing() -> None:
    retired = initial_state(DID)
    ignored = Ignored(IgnoreReason.NO_DOSSIER, DID, None)
    for event in (DossierResolved(DID, at(9)), DossierWithdrawn(DID, at(9)), DossierRejected(DID)):
        assert apply(retired, event, CONFIG) == (retired, (ignored,))
    state, commands = apply(retired, callback(Leg.PICKUP, COD_PAID, 24 * 40, cod=FEE), CONFIG)
    assert state == retired
    assert [(type(c), getattr(c, "kind", None)) for c in commands] == [
        (Alert, AlertKind.UNKNOWN_ORDER)
    ]


# --- the next tick is exact -------------------------------------------------------------------

LEGS = st.sampled_from(list(Leg))
INPUTS: st.SearchStrategy[Event] = st.one_of(
    st.builds(
        submitted, st.sampled_from(list(PostalMode)), cod=st.booleans(), address=st.just(ADDRESS)
    ),
    st.builds(lambda h: DossierResolved(DID, at(h)), st.floats(0, 200)),
    st.builds(lambda h: DossierWithdrawn(DID, at(h)), st.floats(0, 200)),
    st.builds(booked, LEGS, st.floats(0, 200)),
    st.builds(callback, LEGS, st.sampled_from([1, 5, 6, 9, 14, 15, 21, 22]), st.floats(0, 400)),
    st.builds(lambda h: Tick(DID, at(h)), st.floats(0, 1000)),
)


def acts(state: DossierState, now: datetime) -> bool:
    """A tick at `now` changes the state, has commands, or re-sends a booking."""
    decision = apply(state, Tick(DID, now), CONFIG)
    commands: list[Command] = list(decision.commands)
    return decision.state != state or bool(commands) or bool(due_rebookings(state, now, REBOOK))


@settings(max_examples=400)
@given(st.lists(INPUTS, max_size=25), st.floats(0, 24 * 60))
def test_a_tick_acts_exactly_from_next_tick_at_on(sequence: list[Event], hours: float) -> None:
    state = run(sequence)
    moment = next_tick_at(state, CONFIG, REBOOK)
    now = at(hours)
    assert acts(state, now) == (moment is not None and moment <= now)


@settings(max_examples=300)
@given(st.lists(INPUTS, max_size=25))
def test_a_retirable_state_has_no_open_leg(sequence: list[Event]) -> None:
    state = run(sequence)
    if retire_at(state, CONFIG) is not None:
        for sh in (state.pickup, state.return_):
            assert sh is None or sh.closed
        assert due_rebookings(state, at(10_000), REBOOK) == ()


def test_a_recorded_time_must_be_aware() -> None:
    with pytest.raises(ValueError, match="aware"):
        replace(submitted(), recorded_at=datetime(2019, 7, 1))
