"""What a dossier asks of the post: its postal mode and legs, where the applicant's end is, the
order reference of each leg, and the `Plan` kept from `dossier.submitted`. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Final

from services.postal.carriers import Leg


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


@dataclass(frozen=True, slots=True)
class Address:
    province: str
    district: str
    commune: str
    street: str | None = None


@dataclass(frozen=True, slots=True)
class SealedAddress:
    """An address as `dossier.events` carries it: sealed with the dossier's key (CONTRACT
    section 10), `field` naming where it came from (`postal.address`, `applicant.address`). The
    worker checked that it opens to a routable address; the shell opens it again only for the
    booking call."""

    sealed: str
    field: str


def parse_address(raw: object) -> Address | SealedAddress | None:
    """A dict with non-blank `province`, `district`, `commune` and an optional string `street`.

    Anything else (a free-form string, a missing or blank part, a non-string part) is `None`:
    a carrier cannot route it, so the caller reports `invalid_address` instead of booking.
    A sealed address (`SealedAddress`) is taken as it is.
    """
    if isinstance(raw, Address | SealedAddress):
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


def delivery_address(
    postal_address: object, applicant_address: object
) -> Address | SealedAddress | None:
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


@dataclass(frozen=True, slots=True)
class Plan:
    """What `dossier.submitted` asked for, kept until the return leg is due."""

    mode: PostalMode
    agency_code: str
    address: Address | SealedAddress | None  # None: invalid, nothing is ever booked
    contact_name: str
    contact_phone: str | None
    cod_amount_vnd: int  # the fee when paid by postal COD, else 0
    submitted_at: datetime

    @property
    def cod_leg(self) -> Leg:
        # the fee is collected on the first contact with the applicant: the pickup if any
        return Leg.PICKUP if Leg.PICKUP in self.mode.legs else Leg.RETURN
