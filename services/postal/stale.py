"""The stale-shipment rules: when a leg without news is queried or given up, when the periodic
scan next has something to do for a dossier, and which bookings it re-sends. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from services.postal.carriers import Leg
from services.postal.commands import BookOrder
from services.postal.inputs import require_aware
from services.postal.shipments import DossierState, book_order


@dataclass(frozen=True)
class StalePolicy:
    query_after_hours: float = 24.0  # no update for this long: ask the carrier (and again as often)
    give_up_after_days: float = 7.0  # no update for this long: postal.failed reason stale

    def __post_init__(self) -> None:
        if not timedelta(0) < self.query_after < self.give_up_after:
            raise ValueError("need 0 < query_after_hours < give_up_after_days")

    @property
    def query_after(self) -> timedelta:
        return timedelta(hours=self.query_after_hours)

    @property
    def give_up_after(self) -> timedelta:
        return timedelta(days=self.give_up_after_days)


class StaleAction(StrEnum):
    WAIT = "wait"
    QUERY = "query"
    GIVE_UP = "give_up"


def stale_action(
    last_update_at: datetime,
    now: datetime,
    policy: StalePolicy,
    last_queried_at: datetime | None = None,
) -> StaleAction:
    """What to do with a non-terminal shipment; thresholds are inclusive (at exactly N hours, act).

    A query is repeated at most once per `query_after`, so an hourly scan does not hammer the
    carrier about the same order.
    """
    require_aware(last_update_at, "last_update_at")
    require_aware(now, "now")
    idle = now - last_update_at
    if idle >= policy.give_up_after:
        return StaleAction.GIVE_UP
    if idle < policy.query_after:
        return StaleAction.WAIT
    if last_queried_at is not None and now - last_queried_at < policy.query_after:
        return StaleAction.WAIT
    return StaleAction.QUERY


def unacknowledged_bookings(state: DossierState) -> tuple[BookOrder, ...]:
    """Bookings sent but never acknowledged (a crash or a carrier outage in between).

    Re-sending them is safe: `order_ref` is the idempotency key, so the carrier answers with
    the same order instead of booking a second one.
    """
    found: list[BookOrder] = []
    for leg in (Leg.PICKUP, Leg.RETURN):
        sh = state.shipment(leg)
        if (
            sh
            and sh.order_id is None
            and sh.status is None
            and not sh.abandoned
            and not state.withdrawn
            and (booking := book_order(state, leg)) is not None
        ):
            found.append(booking)
    return tuple(found)


def next_scan_at(
    state: DossierState, policy: StalePolicy, rebook_after: timedelta
) -> datetime | None:
    """The first moment a `Tick` would do something (query or give up a leg without news, or
    re-send a booking never acknowledged); None while no leg is open. `stale_action` at any
    moment from then on is not `WAIT`, or a booking waits to be re-sent."""
    moments: list[datetime] = []
    for leg in (Leg.PICKUP, Leg.RETURN):
        sh = state.shipment(leg)
        if sh is None or sh.carrier is None or sh.closed:
            continue
        if sh.order_id is None and sh.status is None and not state.withdrawn:
            moments.append(sh.last_update_at + rebook_after)  # see `due_rebookings`
        query_at = sh.last_update_at + policy.query_after
        if sh.last_queried_at is not None:
            query_at = max(query_at, sh.last_queried_at + policy.query_after)
        moments.append(min(query_at, sh.last_update_at + policy.give_up_after))
    return min(moments, default=None)


def needs_scan(
    state: DossierState, now: datetime, policy: StalePolicy, rebook_after: timedelta
) -> bool:
    """True when a `Tick` at `now` would do something, or a booking waits to be re-sent."""
    at = next_scan_at(state, policy, rebook_after)
    return at is not None and at <= now


def due_rebookings(
    state: DossierState, now: datetime, rebook_after: timedelta
) -> tuple[BookOrder, ...]:
    """The unacknowledged bookings a scan at `now` re-sends: those without news for
    `rebook_after` (a younger one may still be answered)."""
    stale_for = now - rebook_after
    return tuple(
        b
        for b in unacknowledged_bookings(state)
        if (sh := state.shipment(b.leg)) is not None and sh.last_update_at <= stale_for
    )
