"""The postal core after a withdrawal or a rejection: untouched orders are cancelled, a booking
the carrier never acknowledged is cancelled by our reference (again at each stale query, as the
first cancel may have met a carrier outage), and nothing is ever booked again."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from services.postal.carriers import Leg
from services.postal.commands import BookOrder, CancelOrder, Command, PostalEvent
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
from services.postal.plans import PostalMode
from services.postal.shipments import DossierState, initial_state
from services.postal.stale import StalePolicy, due_rebookings, unacknowledged_bookings

DID = "000.00.12.H34-190704-0009"
T0 = datetime(2019, 7, 4, 1, 0, tzinfo=UTC)
ADDRESS = {"province": "Khánh Hòa", "district": "Nha Trang", "commune": "Lộc Thọ", "street": "1"}
POLICY = StalePolicy(query_after_hours=24, give_up_after_days=7)
CONFIG = PostalConfig(stale=POLICY)


def at(hours: float) -> datetime:
    return T0 + timedelta(hours=hours)


def submitted(mode: PostalMode = PostalMode.PICKUP) -> DossierSubmitted:
    return DossierSubmitted(
        dossier_id=DID,
        agency_code="000.00.12.H34",
        mode=mode,
        submitted_at=T0,
        applicant_name="Nguyễn Thị B",
        applicant_address=ADDRESS,
        fee_amount_vnd=50_000,
        fee_method="postal_cod",
    )


def callback(leg: Leg, code: int, hours: float) -> CarrierCallback:
    return CarrierCallback(
        dossier_id=DID,
        leg=leg,
        carrier="vnpost",
        order_id=f"VN-{leg.value}",
        code=str(code),
        carrier_time=at(hours),
    )


def run(
    events: list[Event], state: DossierState | None = None
) -> tuple[DossierState, list[Command]]:
    state = state or initial_state(DID)
    out: list[Command] = []
    for event in events:
        state, commands = apply(state, event, CONFIG)
        out.extend(commands)
    return state, out


def by_ref(leg: Leg) -> CancelOrder:
    return CancelOrder(DID, leg, "vnpost", f"{DID}:{leg.value}", None)


def test_a_booking_never_acknowledged_is_cancelled_by_reference_and_never_sent_again() -> None:
    # the create call failed (carrier away): the booking waits to be sent again by the scan
    state, _ = run([submitted()])
    state, withdrawn = run([DossierWithdrawn(DID, at(1))], state)
    assert withdrawn == [by_ref(Leg.PICKUP)]
    assert unacknowledged_bookings(state) == () and due_rebookings(state, at(30), timedelta()) == ()

    # each stale query cancels again (the first cancel may not have reached the carrier) ...
    state, first = apply(state, Tick(DID, at(24)), CONFIG)
    state, second = apply(state, Tick(DID, at(48)), CONFIG)
    assert first == second == (by_ref(Leg.PICKUP),)
    # ... and giving up books nothing either
    _, gave_up = apply(state, Tick(DID, at(7 * 24)), CONFIG)
    assert not [c for c in gave_up if isinstance(c, BookOrder | CancelOrder)]


def test_the_carriers_cancel_confirmation_reports_the_leg_failed_as_cancelled() -> None:
    state, _ = run([submitted(), DossierWithdrawn(DID, at(1))])
    # the carrier had the order after all: its code 9 proves it, and says it is cancelled
    _, commands = run([callback(Leg.PICKUP, 9, 1.5)], state)
    events = [c for c in commands if isinstance(c, PostalEvent)]
    assert [(e.type, e.reason, e.carrier_code) for e in events] == [
        ("postal.pickup_requested", None, None),
        ("postal.failed", "collection_cancelled", "9"),
    ]


def test_an_acknowledged_untouched_return_is_cancelled_by_its_order_id() -> None:
    state, _ = run(
        [
            submitted(PostalMode.RETURN),
            DossierResolved(DID, at(2)),
            OrderBooked(DID, Leg.RETURN, "vnpost", "VN-return", at(2.1)),
        ]
    )
    state, commands = run([DossierWithdrawn(DID, at(3))], state)
    assert commands == [CancelOrder(DID, Leg.RETURN, "vnpost", f"{DID}:return", "VN-return")]
    _, confirmed = run([callback(Leg.RETURN, 22, 3.5)], state)
    assert [(c.type, c.reason) for c in confirmed if isinstance(c, PostalEvent)] == [
        ("postal.failed", "delivery_cancelled")
    ]


# --- whatever follows a withdrawal, nothing is booked ---------------------------------------

LEGS = st.sampled_from([Leg.PICKUP, Leg.RETURN])
HOURS = st.floats(min_value=0, max_value=400, allow_nan=False)
FOLLOWING = st.one_of(
    st.builds(lambda h: DossierResolved(DID, at(h)), HOURS),
    st.builds(lambda h: DossierWithdrawn(DID, at(h)), HOURS),
    st.builds(lambda h: DossierRejected(DID, "again"), HOURS),
    st.builds(lambda h: Tick(DID, at(h)), HOURS),
    st.builds(
        lambda leg, h: OrderBooked(DID, leg, "vnpost", f"VN-{leg.value}", at(h)), LEGS, HOURS
    ),
    st.builds(lambda leg, h: BookingFailed(DID, leg, "carrier_down", at(h)), LEGS, HOURS),
    st.builds(callback, LEGS, st.sampled_from([1, 2, 6, 9, 12, 14, 15, 22]), HOURS),
)


@given(
    mode=st.sampled_from(list(PostalMode)),
    before=st.lists(FOLLOWING, max_size=6),
    stop=st.sampled_from(["withdrawn", "rejected"]),
    after=st.lists(FOLLOWING, max_size=12),
)
def test_after_a_withdrawal_or_rejection_nothing_is_ever_booked(
    mode: PostalMode, before: list[Event], stop: str, after: list[Event]
) -> None:
    state, _ = run([submitted(mode), *before])
    ended = DossierWithdrawn(DID, at(1)) if stop == "withdrawn" else DossierRejected(DID, "no")
    state, _ = run([ended], state)
    for event in after:
        state, commands = apply(state, event, CONFIG)
        assert not [c for c in commands if isinstance(c, BookOrder)], (event, commands)
        assert unacknowledged_bookings(state) == ()
