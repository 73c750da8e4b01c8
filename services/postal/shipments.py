"""One dossier's postal state: its plan and a shipment per leg, and the legal moves of a leg.

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
(money is remitted independently of where the package is). Pure.

The applicant's address, name and phone (sealed, CONTRACT section 10) are kept once, in the
`Plan`; a shipment keeps only the carrier it was booked with, and `book_order` builds the
booking of a leg (sent or re-sent) from the plan and the shipment; a cancel or a query needs
only the carrier and `plans.order_ref`.

**Changelog records** (`encode_state`) leave out every field equal to its default (`None`,
`False`, `0`, an empty `seen`), which `decode_state` puts back. A record written before shipments
dropped their copy of the booking (a shipment with a `booking` object) decodes to the same state
as it would have been kept now: its `carrier` is the booking's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Final

import orjson
from pydantic import TypeAdapter

from services.postal.carriers import Leg, PostalStatus
from services.postal.commands import BookOrder
from services.postal.inputs import CallbackKey
from services.postal.plans import Plan, order_ref

_S = PostalStatus

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


@dataclass(frozen=True, slots=True)
class Shipment:
    leg: Leg
    last_update_at: datetime  # booking, acknowledgement or newest applied carrier time
    carrier: str | None = None  # who it was booked with; None: never booked (invalid address)
    status: PostalStatus | None = None  # None: booking sent, not acknowledged yet
    order_id: str | None = None
    last_carrier_time: datetime | None = None  # watermark: older callbacks are ignored
    last_queried_at: datetime | None = None
    seen: frozenset[CallbackKey] = frozenset()
    cod_expected_vnd: int = 0  # also the booking's COD amount
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


@dataclass(frozen=True, slots=True)
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


def book_order(state: DossierState, leg: Leg) -> BookOrder | None:
    """The booking of a leg, as first sent and as re-sent: our `order_ref`, the carrier and COD
    amount of the shipment, the agency, address and contact of the plan. None for a leg never
    booked (no shipment, or one failed before booking)."""
    sh, plan = state.shipment(leg), state.plan
    if sh is None or sh.carrier is None or plan is None or plan.address is None:
        return None
    return BookOrder(
        dossier_id=state.dossier_id,
        leg=leg,
        carrier=sh.carrier,
        order_ref=order_ref(state.dossier_id, leg),
        agency_code=plan.agency_code,
        address=plan.address,
        contact_name=plan.contact_name,
        contact_phone=plan.contact_phone,
        cod_amount_vnd=sh.cod_expected_vnd,
    )


_STATE_ADAPTER: Final = TypeAdapter(DossierState)
_SHIPMENT_FIELDS: Final = ("pickup", "return_")
_OLDER_FORM: Final = b'"booking"'


def state_to_json(state: DossierState) -> Any:
    """A JSON-ready form for the changelog, without the fields equal to their defaults
    (round-trips through `state_from_json`)."""
    return _STATE_ADAPTER.dump_python(state, mode="json", exclude_defaults=True)


def state_from_json(raw: Any) -> DossierState:
    """The state of `state_to_json`'s form, or of a record whose shipments kept a `booking`."""
    if isinstance(raw, dict):
        for name in _SHIPMENT_FIELDS:
            shipment = raw.get(name)
            if isinstance(shipment, dict) and "booking" in shipment:
                raw = {**raw, name: _booked_with(shipment)}
    return _STATE_ADAPTER.validate_python(raw)


def _booked_with(shipment: dict[str, Any]) -> dict[str, Any]:
    """A shipment of the older form (a copy of its `BookOrder`) with the carrier it names."""
    fields = {k: v for k, v in shipment.items() if k != "booking"}
    booking = shipment["booking"]
    fields["carrier"] = booking.get("carrier") if isinstance(booking, dict) else None
    return fields


def encode_state(state: DossierState) -> bytes:
    """A state as its changelog record: `state_to_json`'s form, serialised."""
    return _STATE_ADAPTER.dump_json(state, exclude_defaults=True)


def decode_state(dossier_id: str, raw: bytes) -> DossierState:
    """A changelog record of `dossier_id` as its state. Parsed straight from JSON, so the short
    strings repeated in a state (carrier, order id in each `seen` key) are one object each."""
    if _OLDER_FORM in raw:  # a shipment's `booking` (or, harmless, a value spelled so)
        return state_from_json(orjson.loads(raw))
    return _STATE_ADAPTER.validate_json(raw)
