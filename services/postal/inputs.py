"""The inputs of the postal core: the dossier events postal acts on, the carrier's answers fed
back by the shell, carrier callbacks and the stale scan's ticks. Pure; every time is aware."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from services.postal.carriers import Leg, normalize_code
from services.postal.plans import PostalMode


def require_aware(value: datetime, name: str) -> None:
    """Refuse a naive datetime: it makes every comparison with an aware one a silent lie."""
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware")


def _parse_time(value: object, name: str) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime):
        raise ValueError(f"{name} must be an RFC 3339 timestamp")
    require_aware(value, name)
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
    # when the event was written to `dossier.events` (its record's timestamp), if known
    recorded_at: datetime | None = None

    def __post_init__(self) -> None:
        require_aware(self.submitted_at, "submitted_at")
        if self.recorded_at is not None:
            require_aware(self.recorded_at, "recorded_at")
        if self.fee_amount_vnd < 0:
            raise ValueError("fee_amount_vnd must not be negative")

    @classmethod
    def from_data(
        cls, data: Mapping[str, Any], recorded_at: datetime | None = None
    ) -> DossierSubmitted:
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
            recorded_at=recorded_at,
        )


@dataclass(frozen=True)
class DossierResolved:
    dossier_id: str
    resolved_at: datetime
    outcome: str = "approved"  # approved or denied: the result goes back either way

    def __post_init__(self) -> None:
        require_aware(self.resolved_at, "resolved_at")

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
        require_aware(self.withdrawn_at, "withdrawn_at")

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
        require_aware(self.at, "at")


@dataclass(frozen=True)
class BookingFailed:
    """The carrier refused a booking for good (after the shell's retries)."""

    dossier_id: str
    leg: Leg
    reason: str
    at: datetime

    def __post_init__(self) -> None:
        require_aware(self.at, "at")


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
        require_aware(self.carrier_time, "carrier_time")
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
        require_aware(self.now, "now")


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
