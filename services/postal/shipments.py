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
from services.postal.plans import Plan

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


def encode_state(state: DossierState) -> bytes:
    """A state as its changelog record."""
    return orjson.dumps(state_to_json(state))


def decode_state(dossier_id: str, raw: bytes) -> DossierState:
    """A changelog record of `dossier_id` as its state."""
    return state_from_json(orjson.loads(raw))
