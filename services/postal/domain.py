"""The postal core's state machine: `apply(state, input)` → the next state and the commands.

Everything about one dossier is a value, `DossierState` (`shipments.py`), and every input
(`inputs.py`: dossier events, booking acknowledgements, carrier callbacks, scan ticks) goes
through `apply`, which returns the next state and the commands for the shell to carry out
(`commands.py`: book, cancel or query an order, publish a `postal.*` event, raise an alert).
The `postal.*` events it emits have deterministic ids (`_emit`), so a replay repeats them.
No I/O, no clock: times come in with the inputs. Pure.

**A dossier's story for postal** begins with its `dossier.submitted` when its postal mode wants
a leg (CONTRACT 1: a dossier's events are in order on one partition, and it is filed before
anything else happens to it); a dossier without postal legs leaves nothing behind (its state
stays the initial one, which the worker does not keep). The story is over when every leg the
plan wants is closed (terminal with no COD report missing, or abandoned) or will never be booked
(withdrawn or rejected first); `retire_at` is then the latest moment the dossier saw plus
`retire_after`, the grace for late carrier callbacks and COD reports, which still apply until
then. A `Tick` at or after that moment retires the dossier: its state becomes the initial one,
which the worker deletes (a tombstone in the changelog). `next_tick_at` is when a tick is next
due, for the stale rules or for retirement.

**Late inputs for a dossier postal holds nothing of** (never planned, or retired):
- a carrier callback: alerted as `unknown_order`, nothing booked or published (a status or COD
  report after the grace is for a human to look at);
- `dossier.resolved`, `dossier.withdrawn`, `dossier.rejected`: ignored, counted as `no_dossier`;
- `dossier.submitted` recorded on `dossier.events` longer than `history_window` ago (the longer
  of `retire_after` and `history_after`; history read again, e.g. offsets reset): ignored,
  counted as `retired` (`from_retired`), since its dossier may have been served and retired; a
  recent one (a replay of old data through intake is recorded now) starts a story, and books. A
  `history_after` longer than `retire_after` lets postal trail intake by more (a benchmark with
  short graces), at the price of booking again, on a re-read, a dossier retired within it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Final, NamedTuple, assert_never

from services.postal.carriers import (
    CARRIERS,
    Leg,
    NoTransition,
    PostalStatus,
    Transition,
    UnknownCode,
    lookup,
    normalize_code,
)
from services.postal.commands import (
    Alert,
    AlertKind,
    CancelOrder,
    Command,
    Ignored,
    IgnoreReason,
    PostalEvent,
    QueryOrder,
)
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
from services.postal.plans import Plan, delivery_address, order_ref
from services.postal.shipments import (
    ALLOWED,
    REQUESTED,
    DossierState,
    Shipment,
    book_order,
    initial_state,
)
from services.postal.stale import StaleAction, StalePolicy, next_scan_at, stale_action

_S = PostalStatus


@dataclass(frozen=True)
class PostalConfig:
    carrier: str = "vnpost"  # who gets new orders
    stale: StalePolicy = field(default_factory=StalePolicy)
    # a dossier whose story is over is kept this long after the latest moment it saw
    retire_after: timedelta = timedelta(days=30)
    # a `dossier.submitted` of a dossier postal holds nothing of, recorded longer than this ago
    # (or than `retire_after`, when longer), is history read again (`from_retired`)
    history_after: timedelta = timedelta(0)

    def __post_init__(self) -> None:
        if self.carrier not in CARRIERS:
            raise ValueError(f"no status mapping for carrier {self.carrier!r}")
        if self.retire_after <= timedelta(0):
            raise ValueError("retire_after must be positive")

    @property
    def history_window(self) -> timedelta:
        return max(self.retire_after, self.history_after)


DEFAULT_CONFIG: Final = PostalConfig()


class Decision(NamedTuple):
    state: DossierState
    commands: tuple[Command, ...]


# the latest moment of a state that recorded none (withdrawn or rejected before submission)
_LONG_AGO: Final = datetime(1970, 1, 1, tzinfo=UTC)


def retire_at(state: DossierState, config: PostalConfig = DEFAULT_CONFIG) -> datetime | None:
    """When the dossier may leave postal's state: its story over (every leg the plan wants
    closed, or never to be booked) and `retire_after` past the latest moment it saw; None while
    a leg is open or still to be booked (a return waits for the result), or for the initial
    state (nothing held)."""
    if state == initial_state(state.dossier_id):
        return None
    plan = state.plan
    moments: list[datetime] = []
    for leg in (Leg.PICKUP, Leg.RETURN):
        sh = state.shipment(leg)
        if sh is None:
            if plan is not None and leg in plan.mode.legs and not state.withdrawn:
                return None  # still to be booked
            continue
        if not sh.closed:
            return None
        moments.append(sh.last_update_at)
        if sh.last_queried_at is not None:
            moments.append(sh.last_queried_at)
    if plan is not None:
        moments.append(plan.submitted_at)
    if state.resolved_at is not None:
        moments.append(state.resolved_at)
    return max(moments, default=_LONG_AGO) + config.retire_after


def next_tick_at(
    state: DossierState, config: PostalConfig, rebook_after: timedelta
) -> datetime | None:
    """When a `Tick` next has something to do for the dossier (the stale rules, a booking to
    re-send, or its retirement); None: nothing until another input comes."""
    moments = (next_scan_at(state, config.stale, rebook_after), retire_at(state, config))
    return min((m for m in moments if m is not None), default=None)


def from_retired(
    state: DossierState, event: Event, now: datetime, config: PostalConfig = DEFAULT_CONFIG
) -> Ignored | None:
    """An `Ignored` when `event` is a `dossier.submitted` of a dossier postal holds nothing of,
    recorded longer than `history_window` before `now`: its dossier may have been served and
    retired, and booking it again would send a postman for a dossier long done. None: apply it."""
    if (
        isinstance(event, DossierSubmitted)
        and event.recorded_at is not None
        and event.recorded_at < now - config.history_window
        and state == initial_state(state.dossier_id)
    ):
        return Ignored(IgnoreReason.RETIRED, state.dossier_id, None)
    return None


def apply(state: DossierState, event: Event, config: PostalConfig = DEFAULT_CONFIG) -> Decision:
    """The next state and the commands one input calls for. Redelivered inputs change nothing."""
    if event.dossier_id != state.dossier_id:
        raise ValueError(f"event for {event.dossier_id!r} applied to {state.dossier_id!r}")
    match event:
        case DossierSubmitted():
            return _on_submitted(state, event, config)
        case DossierResolved():
            return _on_resolved(state, event, config)
        case DossierWithdrawn() | DossierRejected():
            # a rejected dossier stops like a withdrawn one: no return, untouched orders cancelled
            return _on_withdrawn(state)
        case OrderBooked():
            return _on_booked(state, event)
        case BookingFailed():
            return _on_booking_failed(state, event)
        case CarrierCallback():
            return _on_callback(state, event)
        case Tick():
            return _on_tick(state, event, config)
        case _:
            assert_never(event)


def _emit(
    dossier_id: str, sh: Shipment, status: PostalStatus, at: datetime, **extra: Any
) -> tuple[Shipment, PostalEvent]:
    n = sh.emitted + 1
    event = PostalEvent(
        event_id=f"postal:{dossier_id}:{sh.leg.value}:{n}:{status.value}",
        status=status,
        dossier_id=dossier_id,
        leg=sh.leg,
        time=at,
        carrier=sh.carrier,
        order_id=sh.order_id,
        **extra,
    )
    return replace(sh, emitted=n), event


def _on_submitted(state: DossierState, ev: DossierSubmitted, config: PostalConfig) -> Decision:
    if state.plan is not None or not ev.mode.legs:
        return Decision(state, ())  # planned already, or nothing for postal to do
    plan = Plan(
        mode=ev.mode,
        agency_code=ev.agency_code,
        address=delivery_address(ev.postal_address, ev.applicant_address),
        contact_name=ev.applicant_name,
        contact_phone=ev.applicant_phone,
        cod_amount_vnd=ev.fee_amount_vnd if ev.fee_method == "postal_cod" else 0,
        submitted_at=ev.submitted_at,
    )
    return _book_due_legs(replace(state, plan=plan), config, ev.submitted_at)


def _no_dossier(state: DossierState) -> Decision:
    return Decision(state, (Ignored(IgnoreReason.NO_DOSSIER, state.dossier_id, None),))


def _on_resolved(state: DossierState, ev: DossierResolved, config: PostalConfig) -> Decision:
    if state.plan is None:
        return _no_dossier(state)
    if state.resolved_at is not None:
        return Decision(state, ())
    return _book_due_legs(replace(state, resolved_at=ev.resolved_at), config, ev.resolved_at)


def _book_due_legs(state: DossierState, config: PostalConfig, at: datetime) -> Decision:
    """Book every leg the plan wants and that is due, once: a leg that exists is never redone."""
    plan = state.plan
    if plan is None or state.withdrawn:
        return Decision(state, ())
    commands: list[Command] = []
    for leg in (Leg.PICKUP, Leg.RETURN):
        if leg not in plan.mode.legs or state.shipment(leg) is not None:
            continue
        if plan.address is None:
            # fail every wanted leg at once, even the return: the applicant can fix it early
            sh, event = _emit(
                state.dossier_id,
                Shipment(leg=leg, last_update_at=plan.submitted_at, abandoned=True),
                _S.FAILED,
                plan.submitted_at,
                reason="invalid_address",
            )
            state = state.with_shipment(replace(sh, status=_S.FAILED))
            commands.append(event)
            continue
        if leg is Leg.RETURN and state.resolved_at is None:
            continue
        cod = plan.cod_amount_vnd if leg is plan.cod_leg else 0
        state = state.with_shipment(
            Shipment(leg=leg, last_update_at=at, carrier=config.carrier, cod_expected_vnd=cod)
        )
        booking = book_order(state, leg)
        assert booking is not None  # booked just now, with an address
        commands.append(booking)
    return Decision(state, tuple(commands))


def _on_withdrawn(state: DossierState) -> Decision:
    if state.plan is None:
        return _no_dossier(state)
    if state.withdrawn:
        return Decision(state, ())
    state = replace(state, withdrawn=True)
    commands: list[Command] = []
    for leg in (Leg.PICKUP, Leg.RETURN):
        sh = state.shipment(leg)
        # only an order nobody has touched yet is cancelled; the carrier confirms with a code
        if (
            sh
            and sh.carrier is not None
            and not sh.abandoned
            and sh.status in (None, REQUESTED[leg])
        ):
            commands.append(_cancel(state.dossier_id, leg, sh.carrier, sh.order_id))
    return Decision(state, tuple(commands))


def _cancel(dossier_id: str, leg: Leg, carrier: str, order_id: str | None) -> CancelOrder:
    """Cancel `order_id` of a booked leg (None: by our reference, never acknowledged)."""
    return CancelOrder(dossier_id, leg, carrier, order_ref(dossier_id, leg), order_id)


def _acknowledge(
    dossier_id: str, sh: Shipment, order_id: str, at: datetime
) -> tuple[Shipment, list[Command]]:
    """Record the carrier's order id; the first acknowledgement publishes `*_requested`."""
    sh = replace(sh, order_id=order_id, last_update_at=max(sh.last_update_at, at))
    if sh.status is not None:  # e.g. given up as stale before the carrier answered
        return sh, []
    sh, event = _emit(
        dossier_id, sh, REQUESTED[sh.leg], at, cod_amount_vnd=sh.cod_expected_vnd or None
    )
    return replace(sh, status=REQUESTED[sh.leg]), [event]


def _on_booked(state: DossierState, ev: OrderBooked) -> Decision:
    sh = state.shipment(ev.leg)
    if sh is None or sh.carrier is None:
        alert = Alert(AlertKind.UNKNOWN_ORDER, state.dossier_id, ev.leg, f"booked {ev.order_id}")
        return Decision(state, (alert,))
    if sh.order_id == ev.order_id:
        return Decision(state, (Ignored(IgnoreReason.DUPLICATE, state.dossier_id, ev.leg),))
    if sh.order_id is not None:
        # the carrier ignored our idempotency key: keep the first order, cancel the extra one
        return Decision(
            state,
            (
                Alert(AlertKind.DUPLICATE_ORDER, state.dossier_id, ev.leg, ev.order_id),
                _cancel(state.dossier_id, ev.leg, sh.carrier, ev.order_id),
            ),
        )
    sh, commands = _acknowledge(state.dossier_id, sh, ev.order_id, ev.at)
    return Decision(state.with_shipment(sh), tuple(commands))


def _on_booking_failed(state: DossierState, ev: BookingFailed) -> Decision:
    sh = state.shipment(ev.leg)
    if sh is None or sh.carrier is None or sh.status is not None:
        return Decision(state, (Ignored(IgnoreReason.NOT_APPLICABLE, state.dossier_id, ev.leg),))
    sh, event = _emit(state.dossier_id, sh, _S.FAILED, ev.at, reason=ev.reason)
    return Decision(state.with_shipment(replace(sh, status=_S.FAILED, abandoned=True)), (event,))


def _advance(sh: Shipment, carrier_time: datetime) -> Shipment:
    return replace(
        sh,
        last_carrier_time=max(sh.last_carrier_time or carrier_time, carrier_time),
        last_update_at=max(sh.last_update_at, carrier_time),
    )


def _on_callback(state: DossierState, cb: CarrierCallback) -> Decision:
    did, leg = state.dossier_id, cb.leg
    sh = state.shipment(leg)
    if (
        sh is None
        or sh.carrier != cb.carrier  # also a leg never booked (no carrier)
        or (sh.order_id is not None and sh.order_id != cb.order_id)
    ):
        detail = f"{cb.carrier} order {cb.order_id} code {cb.code}"
        return Decision(state, (Alert(AlertKind.UNKNOWN_ORDER, did, leg, detail),))
    key = cb.dedupe_key
    if key in sh.seen:
        return Decision(state, (Ignored(IgnoreReason.DUPLICATE, did, leg),))
    sh = replace(sh, seen=sh.seen | {key})
    meaning = lookup(cb.carrier, leg, cb.code)
    # COD paid is a once-only fact beside the status: it counts even when it arrives late
    is_cod = isinstance(meaning, Transition) and meaning.status is _S.COD_COLLECTED
    if not is_cod and sh.last_carrier_time is not None and cb.carrier_time < sh.last_carrier_time:
        return Decision(state.with_shipment(sh), (Ignored(IgnoreReason.OUT_OF_ORDER, did, leg),))

    commands: list[Command] = []
    if sh.order_id is None:
        # the callback overtook the create response: it proves the order exists
        sh, commands = _acknowledge(did, sh, cb.order_id, cb.carrier_time)

    match meaning:
        case UnknownCode():
            # recorded and alerted; the watermark stays, we do not know what this code means
            kind = AlertKind(meaning.reason)
            detail = f"{cb.carrier} order {cb.order_id} code {meaning.code!r}"
            commands.append(Alert(kind, did, leg, detail))
        case NoTransition():
            sh = _advance(sh, cb.carrier_time)
        case Transition(status=_S.COD_COLLECTED):
            sh, more = _collect_cod(did, sh, cb)
            commands.extend(more)
        case Transition():
            sh, more = _transition(did, sh, meaning, cb)
            commands.extend(more)
        case _:
            assert_never(meaning)
    return Decision(state.with_shipment(sh), tuple(commands))


def _transition(
    dossier_id: str, sh: Shipment, meaning: Transition, cb: CarrierCallback
) -> tuple[Shipment, list[Command]]:
    target = meaning.status
    if target == sh.status:
        return _advance(sh, cb.carrier_time), []
    allowed = ALLOWED[sh.leg].get(sh.status, frozenset()) if sh.status else frozenset()
    if target not in allowed:
        detail = f"{sh.status} -> {target} ({cb.carrier} code {cb.code})"
        return sh, [Alert(AlertKind.ILLEGAL_TRANSITION, dossier_id, sh.leg, detail)]
    sh, event = _emit(
        dossier_id,
        _advance(replace(sh, status=target), cb.carrier_time),
        target,
        cb.carrier_time,
        carrier_code=normalize_code(cb.code),
        reason=meaning.label if target is _S.FAILED else None,
    )
    return sh, [event]


def _collect_cod(
    dossier_id: str, sh: Shipment, cb: CarrierCallback
) -> tuple[Shipment, list[Command]]:
    # COD is beside the status: it neither moves the watermark nor the stale clock
    if sh.cod_collected:
        return sh, [Ignored(IgnoreReason.DUPLICATE, dossier_id, sh.leg)]
    expected = sh.cod_expected_vnd
    mismatch = cb.cod_amount_vnd != expected  # a missing amount is a mismatch too
    sh, event = _emit(
        dossier_id,
        replace(sh, cod_collected=True),
        _S.COD_COLLECTED,
        cb.carrier_time,
        carrier_code=normalize_code(cb.code),
        amount_vnd=cb.cod_amount_vnd,
        expected_amount_vnd=expected,
        amount_mismatch=mismatch,
    )
    commands: list[Command] = [event]
    if mismatch:
        detail = f"collected {cb.cod_amount_vnd} VND, expected {expected} VND"
        commands.append(Alert(AlertKind.COD_MISMATCH, dossier_id, sh.leg, detail))
    return sh, commands


def _on_tick(state: DossierState, tick: Tick, config: PostalConfig) -> Decision:
    retire = retire_at(state, config)
    if retire is not None and retire <= tick.now:
        return Decision(initial_state(state.dossier_id), ())  # the story is over: forget it
    commands: list[Command] = []
    for leg in (Leg.PICKUP, Leg.RETURN):
        sh = state.shipment(leg)
        if sh is None or sh.carrier is None or sh.closed:
            continue
        action = stale_action(sh.last_update_at, tick.now, config.stale, sh.last_queried_at)
        if action is StaleAction.WAIT:
            continue
        if action is StaleAction.QUERY:
            if sh.order_id is None and state.withdrawn:
                # never acknowledged and the dossier is withdrawn: never book it now, cancel it
                # again by our reference (the first cancel may have met a carrier outage)
                commands.append(_cancel(state.dossier_id, leg, sh.carrier, None))
            elif sh.order_id is None:
                # never acknowledged: resend the same booking; its key makes it the same order
                booking = book_order(state, leg)
                assert booking is not None  # a shipment with a carrier was booked
                commands.append(booking)
            else:
                ref = order_ref(state.dossier_id, leg)
                commands.append(QueryOrder(state.dossier_id, leg, sh.carrier, ref, sh.order_id))
            state = state.with_shipment(replace(sh, last_queried_at=tick.now))
            continue
        idle = tick.now - sh.last_update_at
        if sh.cod_pending:
            # delivered, so not a failure: the money report is what went missing
            detail = f"COD of {sh.cod_expected_vnd} VND never reported, {idle} after delivery"
            commands.append(Alert(AlertKind.COD_MISMATCH, state.dossier_id, leg, detail))
            state = state.with_shipment(replace(sh, abandoned=True))
            continue
        commands.append(Alert(AlertKind.STALE, state.dossier_id, leg, f"no update for {idle}"))
        sh = replace(sh, abandoned=True)
        if sh.status is not _S.FAILED:  # already counted as failed once: do not count it twice
            sh, event = _emit(state.dossier_id, sh, _S.FAILED, tick.now, reason="stale")
            sh = replace(sh, status=_S.FAILED)
            commands.append(event)
        state = state.with_shipment(sh)
    return Decision(state, tuple(commands))
