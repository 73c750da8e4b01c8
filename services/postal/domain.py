"""The pure core of the postal service: order planning, callbacks, COD and stale shipments.

Everything about one dossier is a value, `DossierState`, and every input (dossier events, booking
acknowledgements, carrier callbacks, scan ticks) goes through `apply(state, event)`, which returns
the next state and the commands for the shell to carry out (book, cancel or query an order,
publish a `postal.*` event, raise an alert). No I/O, no clock: times come in with the events.

Shipment state machine (statuses are `carriers.PostalStatus`; `None` means booking in flight):

    pickup leg   None → pickup_requested → picked_up → delivered_to_agency (terminal)
                 pickup_requested / picked_up → failed → picked_up / delivered_to_agency
    return leg   None → return_requested → out_for_delivery → delivered (terminal)
                 any non-terminal → failed → out_for_delivery / delivered
                 any non-terminal → returned_to_agency (terminal)

`failed` is not terminal: carriers retry collection and delivery, and a later success must still
count. A leg stops being watched when it is terminal or abandoned (never bookable, booking
rejected, or given up as stale); a callback on an abandoned leg is still applied, since the
carrier's word beats our guess. `cod_collected` is not a status but a once-only fact beside it
(money is remitted independently of where the package is).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Final, NamedTuple, assert_never

from pydantic import TypeAdapter

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

_S = PostalStatus


def _require_aware(value: datetime, name: str) -> None:
    # naive datetimes make every comparison below a silent lie, so refuse them at the door
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")


# --- modes, addresses, order references ------------------------------------------------------


class PostalMode(StrEnum):
    NONE = "none"
    PICKUP = "pickup"
    RETURN = "return"
    PICKUP_AND_RETURN = "pickup_and_return"

    @property
    def legs(self) -> frozenset[Leg]:
        return _MODE_LEGS[self]


_MODE_LEGS: Final[Mapping[PostalMode, frozenset[Leg]]] = {
    PostalMode.NONE: frozenset(),
    PostalMode.PICKUP: frozenset({Leg.PICKUP}),
    PostalMode.RETURN: frozenset({Leg.RETURN}),
    PostalMode.PICKUP_AND_RETURN: frozenset({Leg.PICKUP, Leg.RETURN}),
}

REQUIRED_ADDRESS_PARTS: Final = ("province", "district", "commune")


@dataclass(frozen=True)
class Address:
    province: str
    district: str
    commune: str
    street: str | None = None


def parse_address(raw: object) -> Address | None:
    """A dict with non-blank `province`, `district`, `commune` and an optional string `street`.

    Anything else (a free-form string, a missing or blank part, a non-string part) is `None`:
    a carrier cannot route it, so the caller reports `invalid_address` instead of booking.
    """
    if isinstance(raw, Address):
        return raw
    if not isinstance(raw, Mapping):
        return None
    parts: dict[str, str] = {}
    for name in REQUIRED_ADDRESS_PARTS:
        value = raw.get(name)
        if not isinstance(value, str) or not value.strip():
            return None
        parts[name] = value.strip()
    street = raw.get("street")
    if street is not None and not isinstance(street, str):
        return None
    return Address(
        province=parts["province"],
        district=parts["district"],
        commune=parts["commune"],
        street=(street.strip() or None) if street else None,
    )


def delivery_address(postal_address: object, applicant_address: object) -> Address | None:
    """`postal.address` wins when given, else `applicant.address`.

    An invalid `postal.address` does not fall back: the applicant chose it on purpose, and
    sending the dossier or result elsewhere is worse than asking again.
    """
    if postal_address is not None:
        return parse_address(postal_address)
    return parse_address(applicant_address)


def order_ref(dossier_id: str, leg: Leg) -> str:
    """Our client order id for a leg, also the idempotency key of every booking call.

    Deterministic, so a re-sent booking after a crash or redelivery is the same order at the
    carrier, never a second pickup.
    """
    return f"{dossier_id}:{leg.value}"


def parse_order_ref(ref: str) -> tuple[str, Leg] | None:
    """Inverse of `order_ref` (dossier ids may contain ':' themselves, so split on the last)."""
    dossier_id, sep, leg = ref.rpartition(":")
    if not sep or not dossier_id:
        return None
    try:
        return dossier_id, Leg(leg)
    except ValueError:
        return None


# --- stale shipments -------------------------------------------------------------------------


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
    _require_aware(last_update_at, "last_update_at")
    _require_aware(now, "now")
    idle = now - last_update_at
    if idle >= policy.give_up_after:
        return StaleAction.GIVE_UP
    if idle < policy.query_after:
        return StaleAction.WAIT
    if last_queried_at is not None and now - last_queried_at < policy.query_after:
        return StaleAction.WAIT
    return StaleAction.QUERY


@dataclass(frozen=True)
class PostalConfig:
    carrier: str = "vnpost"  # who gets new orders
    stale: StalePolicy = field(default_factory=StalePolicy)

    def __post_init__(self) -> None:
        if self.carrier not in CARRIERS:
            raise ValueError(f"no status mapping for carrier {self.carrier!r}")


DEFAULT_CONFIG: Final = PostalConfig()


# --- inputs ----------------------------------------------------------------------------------


def _parse_time(value: object, name: str) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise ValueError(f"{name} must be an RFC 3339 timestamp")
    _require_aware(value, name)
    return value


def _section(data: Mapping[str, Any], name: str) -> Mapping[str, Any]:
    value = data.get(name)
    if not isinstance(value, Mapping):
        raise ValueError(f"{name} must be an object")
    return value


@dataclass(frozen=True)
class DossierSubmitted:
    dossier_id: str
    agency_code: str
    mode: PostalMode
    submitted_at: datetime
    applicant_name: str
    applicant_phone: str | None = None
    applicant_address: object = None  # raw: CONTRACT leaves it free-form, parse_address decides
    postal_address: object = None
    fee_amount_vnd: int = 0
    fee_method: str = "none"

    def __post_init__(self) -> None:
        _require_aware(self.submitted_at, "submitted_at")
        if self.fee_amount_vnd < 0:
            raise ValueError("fee_amount_vnd must not be negative")

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> DossierSubmitted:
        """From the `data` of a `dossier.submitted` envelope (a dict, or a model's dump)."""
        applicant, fee, postal = (_section(data, n) for n in ("applicant", "fee", "postal"))
        amount = fee.get("amount_vnd")
        if not isinstance(amount, int) or isinstance(amount, bool):
            raise ValueError("fee.amount_vnd must be an integer")
        return cls(
            dossier_id=str(data["dossier_id"]),
            agency_code=str(data["agency_code"]),
            mode=PostalMode(str(postal.get("mode"))),
            submitted_at=_parse_time(data.get("submitted_at"), "submitted_at"),
            applicant_name=str(applicant.get("name", "")),
            applicant_phone=applicant.get("phone"),
            applicant_address=applicant.get("address"),
            postal_address=postal.get("address"),
            fee_amount_vnd=amount,
            fee_method=str(fee.get("method", "none")),
        )


@dataclass(frozen=True)
class DossierResolved:
    dossier_id: str
    resolved_at: datetime
    outcome: str = "approved"  # approved or denied: the result goes back either way

    def __post_init__(self) -> None:
        _require_aware(self.resolved_at, "resolved_at")

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> DossierResolved:
        return cls(
            dossier_id=str(data["dossier_id"]),
            resolved_at=_parse_time(data.get("resolved_at"), "resolved_at"),
            outcome=str(data.get("outcome", "approved")),
        )


@dataclass(frozen=True)
class DossierWithdrawn:
    dossier_id: str
    withdrawn_at: datetime

    def __post_init__(self) -> None:
        _require_aware(self.withdrawn_at, "withdrawn_at")

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> DossierWithdrawn:
        return cls(
            dossier_id=str(data["dossier_id"]),
            withdrawn_at=_parse_time(data.get("withdrawn_at"), "withdrawn_at"),
        )


@dataclass(frozen=True)
class DossierRejected:
    """Refused at intake: nothing more goes out, and an order nobody has touched is cancelled."""

    dossier_id: str
    reason: str = ""

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> DossierRejected:
        return cls(dossier_id=str(data["dossier_id"]), reason=str(data.get("reason", "")))


@dataclass(frozen=True)
class OrderBooked:
    """The carrier accepted a booking (the shell feeds this back after the create call)."""

    dossier_id: str
    leg: Leg
    carrier: str
    order_id: str
    at: datetime

    def __post_init__(self) -> None:
        _require_aware(self.at, "at")


@dataclass(frozen=True)
class BookingFailed:
    """The carrier refused a booking for good (after the shell's retries)."""

    dossier_id: str
    leg: Leg
    reason: str
    at: datetime

    def __post_init__(self) -> None:
        _require_aware(self.at, "at")


@dataclass(frozen=True)
class CarrierCallback:
    """A status report from a webhook or from a query; the shell routes it by `parse_order_ref`."""

    dossier_id: str
    leg: Leg
    carrier: str
    order_id: str
    code: str
    carrier_time: datetime
    cod_amount_vnd: int | None = None  # with a COD-paid code: what the carrier says it collected

    def __post_init__(self) -> None:
        _require_aware(self.carrier_time, "carrier_time")
        if self.cod_amount_vnd is not None and self.cod_amount_vnd < 0:
            raise ValueError("cod_amount_vnd must not be negative")

    @property
    def dedupe_key(self) -> CallbackKey:
        return (self.carrier, self.order_id, normalize_code(self.code), self.carrier_time)


@dataclass(frozen=True)
class Tick:
    """The stale-shipment scan visiting this dossier at `now`."""

    dossier_id: str
    now: datetime

    def __post_init__(self) -> None:
        _require_aware(self.now, "now")


Event = (
    DossierSubmitted
    | DossierResolved
    | DossierWithdrawn
    | DossierRejected
    | OrderBooked
    | BookingFailed
    | CarrierCallback
    | Tick
)

# (carrier, carrier order id, status code, carrier time): equal instants hash equal across offsets
CallbackKey = tuple[str, str, str, datetime]


# --- commands --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BookOrder:
    """Create an order at the carrier; `order_ref` is the client order id and idempotency key."""

    dossier_id: str
    leg: Leg
    carrier: str
    order_ref: str
    agency_code: str  # the other end of the leg: the shell knows the agency's counter address
    address: Address  # the applicant's end
    contact_name: str
    contact_phone: str | None
    cod_amount_vnd: int  # 0: nothing to collect on the agency's behalf


@dataclass(frozen=True)
class CancelOrder:
    dossier_id: str
    leg: Leg
    carrier: str
    order_ref: str
    order_id: str | None  # None: not acknowledged yet, cancel by our reference


@dataclass(frozen=True)
class QueryOrder:
    dossier_id: str
    leg: Leg
    carrier: str
    order_ref: str
    order_id: str


@dataclass(frozen=True)
class PostalEvent:
    """One outgoing `postal.*` event; its `event_id` is deterministic, so replays repeat it."""

    event_id: str
    status: PostalStatus
    dossier_id: str
    leg: Leg
    time: datetime
    carrier: str | None = None
    order_id: str | None = None
    reason: str | None = None
    carrier_code: str | None = None
    amount_vnd: int | None = None  # cod_collected: what the carrier says it collected
    expected_amount_vnd: int | None = None
    amount_mismatch: bool | None = None
    cod_amount_vnd: int | None = None  # *_requested: what the postman is to collect

    @property
    def type(self) -> str:
        return self.status.event_type

    def data(self) -> dict[str, object]:
        """The envelope's `data`: CONTRACT's fields plus `leg` and the COD details."""
        fields: dict[str, object] = {
            "dossier_id": self.dossier_id,
            "leg": self.leg.value,
            "carrier": self.carrier,
            "order_id": self.order_id,
            "reason": self.reason,
            "carrier_code": self.carrier_code,
            "amount_vnd": self.amount_vnd,
            "expected_amount_vnd": self.expected_amount_vnd,
            "amount_mismatch": self.amount_mismatch,
            "cod_amount_vnd": self.cod_amount_vnd,
        }
        return {k: v for k, v in fields.items() if v is not None}


class AlertKind(StrEnum):
    UNKNOWN_CODE = "unknown_code"
    UNKNOWN_CARRIER = "unknown_carrier"
    UNKNOWN_ORDER = "unknown_order"
    ILLEGAL_TRANSITION = "illegal_transition"
    DUPLICATE_ORDER = "duplicate_order"
    COD_MISMATCH = "cod_mismatch"
    STALE = "stale"


@dataclass(frozen=True)
class Alert:
    """Something a human should look at; never carries names, phones or addresses."""

    kind: AlertKind
    dossier_id: str
    leg: Leg | None
    detail: str


class IgnoreReason(StrEnum):
    DUPLICATE = "duplicate"
    OUT_OF_ORDER = "out_of_order"
    NOT_APPLICABLE = "not_applicable"


@dataclass(frozen=True)
class Ignored:
    """A callback or acknowledgement dropped on purpose (for counters, not alerts)."""

    reason: IgnoreReason
    dossier_id: str
    leg: Leg


Command = BookOrder | CancelOrder | QueryOrder | PostalEvent | Alert | Ignored


# --- state -----------------------------------------------------------------------------------

ALLOWED: Final[Mapping[Leg, Mapping[PostalStatus, frozenset[PostalStatus]]]] = {
    Leg.PICKUP: {
        _S.PICKUP_REQUESTED: frozenset({_S.PICKED_UP, _S.DELIVERED_TO_AGENCY, _S.FAILED}),
        _S.PICKED_UP: frozenset({_S.DELIVERED_TO_AGENCY, _S.FAILED}),
        _S.FAILED: frozenset({_S.PICKED_UP, _S.DELIVERED_TO_AGENCY}),
        _S.DELIVERED_TO_AGENCY: frozenset(),
    },
    Leg.RETURN: {
        _S.RETURN_REQUESTED: frozenset(
            {_S.OUT_FOR_DELIVERY, _S.DELIVERED, _S.FAILED, _S.RETURNED_TO_AGENCY}
        ),
        _S.OUT_FOR_DELIVERY: frozenset({_S.DELIVERED, _S.FAILED, _S.RETURNED_TO_AGENCY}),
        _S.FAILED: frozenset({_S.OUT_FOR_DELIVERY, _S.DELIVERED, _S.RETURNED_TO_AGENCY}),
        _S.DELIVERED: frozenset(),
        _S.RETURNED_TO_AGENCY: frozenset(),
    },
}
TERMINAL: Final = frozenset({_S.DELIVERED_TO_AGENCY, _S.DELIVERED, _S.RETURNED_TO_AGENCY})
REQUESTED: Final[Mapping[Leg, PostalStatus]] = {
    Leg.PICKUP: _S.PICKUP_REQUESTED,
    Leg.RETURN: _S.RETURN_REQUESTED,
}


@dataclass(frozen=True)
class Plan:
    """What `dossier.submitted` asked for, kept until the return leg is due."""

    mode: PostalMode
    agency_code: str
    address: Address | None  # None: invalid, nothing is ever booked
    contact_name: str
    contact_phone: str | None
    cod_amount_vnd: int  # the fee when paid by postal COD, else 0
    submitted_at: datetime

    @property
    def cod_leg(self) -> Leg:
        # the fee is collected on the first contact with the applicant: the pickup if any
        return Leg.PICKUP if Leg.PICKUP in self.mode.legs else Leg.RETURN


@dataclass(frozen=True)
class Shipment:
    leg: Leg
    last_update_at: datetime  # booking, acknowledgement or newest applied carrier time
    booking: BookOrder | None = None  # None: never booked (invalid address)
    status: PostalStatus | None = None  # None: booking sent, not acknowledged yet
    order_id: str | None = None
    last_carrier_time: datetime | None = None  # watermark: older callbacks are ignored
    last_queried_at: datetime | None = None
    seen: frozenset[CallbackKey] = frozenset()
    cod_expected_vnd: int = 0
    cod_collected: bool = False
    abandoned: bool = False
    emitted: int = 0  # number of postal events so far: makes event ids deterministic

    @property
    def cod_pending(self) -> bool:
        """Delivered where the money is collected, but the carrier never reported it."""
        return (
            self.cod_expected_vnd > 0
            and not self.cod_collected
            and self.status in (_S.DELIVERED_TO_AGENCY, _S.DELIVERED)
        )

    @property
    def closed(self) -> bool:
        """No longer watched by the stale scan (a lost COD report keeps a delivery watched)."""
        return self.abandoned or (self.status in TERMINAL and not self.cod_pending)


@dataclass(frozen=True)
class DossierState:
    dossier_id: str
    plan: Plan | None = None
    resolved_at: datetime | None = None
    withdrawn: bool = False
    pickup: Shipment | None = None
    return_: Shipment | None = None

    def shipment(self, leg: Leg) -> Shipment | None:
        return self.pickup if leg is Leg.PICKUP else self.return_

    def with_shipment(self, shipment: Shipment) -> DossierState:
        if shipment.leg is Leg.PICKUP:
            return replace(self, pickup=shipment)
        return replace(self, return_=shipment)


def initial_state(dossier_id: str) -> DossierState:
    return DossierState(dossier_id=dossier_id)


_STATE_ADAPTER: Final = TypeAdapter(DossierState)


def state_to_json(state: DossierState) -> Any:
    """A JSON-ready form for the changelog (round-trips through `state_from_json`)."""
    return _STATE_ADAPTER.dump_python(state, mode="json")


def state_from_json(raw: Any) -> DossierState:
    return _STATE_ADAPTER.validate_python(raw)


# --- apply -----------------------------------------------------------------------------------


class Decision(NamedTuple):
    state: DossierState
    commands: tuple[Command, ...]


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
        carrier=sh.booking.carrier if sh.booking else None,
        order_id=sh.order_id,
        **extra,
    )
    return replace(sh, emitted=n), event


def _on_submitted(state: DossierState, ev: DossierSubmitted, config: PostalConfig) -> Decision:
    if state.plan is not None:
        return Decision(state, ())
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


def _on_resolved(state: DossierState, ev: DossierResolved, config: PostalConfig) -> Decision:
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
        booking = BookOrder(
            dossier_id=state.dossier_id,
            leg=leg,
            carrier=config.carrier,
            order_ref=order_ref(state.dossier_id, leg),
            agency_code=plan.agency_code,
            address=plan.address,
            contact_name=plan.contact_name,
            contact_phone=plan.contact_phone,
            cod_amount_vnd=cod,
        )
        state = state.with_shipment(
            Shipment(leg=leg, last_update_at=at, booking=booking, cod_expected_vnd=cod)
        )
        commands.append(booking)
    return Decision(state, tuple(commands))


def _on_withdrawn(state: DossierState) -> Decision:
    if state.withdrawn:
        return Decision(state, ())
    state = replace(state, withdrawn=True)
    commands: list[Command] = []
    for leg in (Leg.PICKUP, Leg.RETURN):
        sh = state.shipment(leg)
        # only an order nobody has touched yet is cancelled; the carrier confirms with a code
        if sh and sh.booking and not sh.abandoned and sh.status in (None, REQUESTED[leg]):
            b = sh.booking
            commands.append(CancelOrder(state.dossier_id, leg, b.carrier, b.order_ref, sh.order_id))
    return Decision(state, tuple(commands))


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
    if sh is None or sh.booking is None:
        alert = Alert(AlertKind.UNKNOWN_ORDER, state.dossier_id, ev.leg, f"booked {ev.order_id}")
        return Decision(state, (alert,))
    if sh.order_id == ev.order_id:
        return Decision(state, (Ignored(IgnoreReason.DUPLICATE, state.dossier_id, ev.leg),))
    if sh.order_id is not None:
        # the carrier ignored our idempotency key: keep the first order, cancel the extra one
        b = sh.booking
        return Decision(
            state,
            (
                Alert(AlertKind.DUPLICATE_ORDER, state.dossier_id, ev.leg, ev.order_id),
                CancelOrder(state.dossier_id, ev.leg, b.carrier, b.order_ref, ev.order_id),
            ),
        )
    sh, commands = _acknowledge(state.dossier_id, sh, ev.order_id, ev.at)
    return Decision(state.with_shipment(sh), tuple(commands))


def _on_booking_failed(state: DossierState, ev: BookingFailed) -> Decision:
    sh = state.shipment(ev.leg)
    if sh is None or sh.booking is None or sh.status is not None:
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
        or sh.booking is None
        or sh.booking.carrier != cb.carrier
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
    commands: list[Command] = []
    for leg in (Leg.PICKUP, Leg.RETURN):
        sh = state.shipment(leg)
        if sh is None or sh.booking is None or sh.closed:
            continue
        action = stale_action(sh.last_update_at, tick.now, config.stale, sh.last_queried_at)
        if action is StaleAction.WAIT:
            continue
        if action is StaleAction.QUERY:
            if sh.order_id is None:
                # never acknowledged: resend the same booking; its key makes it the same order
                commands.append(sh.booking)
            else:
                b = sh.booking
                commands.append(
                    QueryOrder(state.dossier_id, leg, b.carrier, b.order_ref, sh.order_id)
                )
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


# --- what the shell's periodic scan looks at --------------------------------------------------


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
            and sh.booking
            and sh.order_id is None
            and sh.status is None
            and not sh.abandoned
            and not state.withdrawn
        ):
            found.append(sh.booking)
    return tuple(found)


def needs_scan(
    state: DossierState, now: datetime, policy: StalePolicy, rebook_after: timedelta
) -> bool:
    """True when a `Tick` at `now` would do something, or a booking waits to be re-sent."""
    for leg in (Leg.PICKUP, Leg.RETURN):
        sh = state.shipment(leg)
        if sh is None or sh.booking is None or sh.closed:
            continue
        if sh.order_id is None and sh.status is None and now - sh.last_update_at >= rebook_after:
            return True
        if stale_action(sh.last_update_at, now, policy, sh.last_queried_at) is not StaleAction.WAIT:
            return True
    return False
