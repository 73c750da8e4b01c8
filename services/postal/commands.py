"""The commands the postal core hands to the shell: book, cancel or query an order, publish a
`postal.*` event, raise an alert, count an input dropped on purpose. Pure."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from services.postal.carriers import Leg, PostalStatus
from services.postal.plans import Address, SealedAddress


@dataclass(frozen=True)
class BookOrder:
    """Create an order at the carrier; `order_ref` is the client order id and idempotency key."""

    dossier_id: str
    leg: Leg
    carrier: str
    order_ref: str
    agency_code: str  # the other end of the leg: the shell knows the agency's counter address
    address: Address | SealedAddress  # the applicant's end
    contact_name: str  # sealed, like the phone and the address, but in the carrier call
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
    # a dossier event (resolved, withdrawn, rejected) about a dossier postal holds nothing of:
    # one without postal legs, or one retired
    NO_DOSSIER = "no_dossier"
    # a `dossier.submitted` recorded before the retirement horizon, of a dossier postal holds
    # nothing of: its story may be over and retired, so it is never booked again
    RETIRED = "retired"


@dataclass(frozen=True)
class Ignored:
    """An input dropped on purpose (for counters, not alerts)."""

    reason: IgnoreReason
    dossier_id: str
    leg: Leg | None


Command = BookOrder | CancelOrder | QueryOrder | PostalEvent | Alert | Ignored
