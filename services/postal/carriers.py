"""Carrier status codes mapped, as data, onto one internal shipment model.

Each carrier is one table: code → (label, meaning on a pickup leg, meaning on a return leg). The
leg matters because the same carrier event means different things depending on who is the
recipient: "delivered" on a pickup (applicant → agency) is `delivered_to_agency`, on a return
(agency → applicant) it is `delivered`. A code that carries no internal change says so with
`NO_CHANGE`, so every known code is listed on purpose; a code missing from the table is
`UnknownCode`, which the caller records and alerts on. Nothing here raises.

Adding a carrier means adding one `CarrierTable` to `CARRIERS`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final


class PostalStatus(StrEnum):
    """The internal model; each value is also the suffix of a `postal.*` event type."""

    PICKUP_REQUESTED = "pickup_requested"
    PICKED_UP = "picked_up"
    DELIVERED_TO_AGENCY = "delivered_to_agency"
    RETURN_REQUESTED = "return_requested"
    OUT_FOR_DELIVERY = "out_for_delivery"
    DELIVERED = "delivered"
    FAILED = "failed"
    RETURNED_TO_AGENCY = "returned_to_agency"
    COD_COLLECTED = "cod_collected"

    @property
    def event_type(self) -> str:
        return f"postal.{self.value}"


class Leg(StrEnum):
    PICKUP = "pickup"  # the paper dossier, applicant → agency
    RETURN = "return"  # the result, agency → applicant


class NoChange(StrEnum):
    """Marker for a known code that moves nothing internally (a one-member enum keeps it typed)."""

    NO_CHANGE = "no_change"


NO_CHANGE: Final = NoChange.NO_CHANGE

Meaning = PostalStatus | NoChange


@dataclass(frozen=True)
class CodeRow:
    label: str  # the carrier's own name for the code, snake_case; used as a failure reason
    pickup: Meaning
    return_: Meaning

    def on(self, leg: Leg) -> Meaning:
        return self.pickup if leg is Leg.PICKUP else self.return_


@dataclass(frozen=True)
class CarrierTable:
    name: str
    codes: Mapping[str, CodeRow]


# --- results of a lookup ---------------------------------------------------------------------


@dataclass(frozen=True)
class Transition:
    status: PostalStatus
    label: str


@dataclass(frozen=True)
class NoTransition:
    label: str


@dataclass(frozen=True)
class UnknownCode:
    carrier: str
    code: str
    reason: str  # "unknown_code" or "unknown_carrier"


CodeLookup = Transition | NoTransition | UnknownCode


# --- VNPost ----------------------------------------------------------------------------------

_S = PostalStatus

# Decisions worth knowing (codes as listed in REFERENCES, 17 is not assigned):
# - 1 created maps to *_requested: booking already emits it, the domain treats a repeat as a no-op.
# - On a pickup, 7/10/11/12 imply the package was collected, so they map to picked_up: a lost
#   6 callback then costs nothing (picked_up → picked_up is a no-op).
# - On a return there is no "collected" status: it is in the carrier's hands until 12 delivering.
# - 16/18/19/20 are the carrier's return-to-sender path. The sender of a pickup is the applicant,
#   so for a pickup they mean the dossier will not reach the agency (failed); the sender of a
#   return is the agency, so 19 (return completed) / 20 (partly returned) are returned_to_agency,
#   18 (return started) is failed (a lost 15 must not hide the failure).
# - 21 COD paid is cod_collected on either leg; the domain checks which leg expected money.
VNPOST: Final = CarrierTable(
    name="vnpost",
    codes=MappingProxyType(
        {
            "0": CodeRow("draft", NO_CHANGE, NO_CHANGE),
            "1": CodeRow("created", _S.PICKUP_REQUESTED, _S.RETURN_REQUESTED),
            "2": CodeRow("assigned_to_postman", NO_CHANGE, NO_CHANGE),
            "3": CodeRow("processing", NO_CHANGE, NO_CHANGE),
            "4": CodeRow("collecting", NO_CHANGE, NO_CHANGE),
            "5": CodeRow("collection_failed", _S.FAILED, _S.FAILED),
            "6": CodeRow("collected", _S.PICKED_UP, NO_CHANGE),
            "7": CodeRow("received_at_post_office", _S.PICKED_UP, NO_CHANGE),
            "8": CodeRow("retrieve_failed", _S.FAILED, _S.FAILED),
            "9": CodeRow("collection_cancelled", _S.FAILED, _S.FAILED),
            "10": CodeRow("in_transport", _S.PICKED_UP, NO_CHANGE),
            "11": CodeRow("arrived_at_post_office", _S.PICKED_UP, NO_CHANGE),
            "12": CodeRow("delivering", _S.PICKED_UP, _S.OUT_FOR_DELIVERY),
            "13": CodeRow("forwarded", NO_CHANGE, NO_CHANGE),
            "14": CodeRow("delivered", _S.DELIVERED_TO_AGENCY, _S.DELIVERED),
            "15": CodeRow("delivery_failed", _S.FAILED, _S.FAILED),
            "16": CodeRow("waiting_for_return", NO_CHANGE, NO_CHANGE),
            "18": CodeRow("return_started", _S.FAILED, _S.FAILED),
            "19": CodeRow("return_completed", _S.FAILED, _S.RETURNED_TO_AGENCY),
            "20": CodeRow("partly_returned", _S.FAILED, _S.RETURNED_TO_AGENCY),
            "21": CodeRow("cod_paid", _S.COD_COLLECTED, _S.COD_COLLECTED),
            "22": CodeRow("delivery_cancelled", _S.FAILED, _S.FAILED),
        }
    ),
)

CARRIERS: Final[Mapping[str, CarrierTable]] = MappingProxyType({VNPOST.name: VNPOST})


def normalize_code(code: int | str) -> str:
    """Carriers send codes as numbers or strings; `7`, `"7"` and `" 7 "` are the same code."""
    return str(code).strip()


def lookup(carrier: str, leg: Leg, code: int | str) -> CodeLookup:
    """What a carrier's status code means for a shipment on `leg`; never raises."""
    key = normalize_code(code)
    table = CARRIERS.get(carrier)
    if table is None:
        return UnknownCode(carrier=carrier, code=key, reason="unknown_carrier")
    row = table.codes.get(key)
    if row is None:
        return UnknownCode(carrier=carrier, code=key, reason="unknown_code")
    meaning = row.on(leg)
    if isinstance(meaning, NoChange):
        return NoTransition(label=row.label)
    return Transition(status=meaning, label=row.label)
