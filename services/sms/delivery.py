"""Delivery reports: provider statuses, their mapping, and moves that never go back. Pure."""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Final


class DeliveryStatus(StrEnum):
    QUEUED = "queued"  # decided, not yet handed to a provider
    SENT = "sent"  # accepted by a provider, no final report yet
    DELIVERED = "delivered"
    TEMPORARY_FAILURE = "temporary_failure"  # phone off, out of coverage, expired in the SMSC
    PERMANENT_FAILURE = "permanent_failure"  # no such subscriber, barred, rejected


class UnknownProviderStatusError(ValueError):
    """A report status we do not know: answer 422, do not guess."""


# Provider report statuses: SMPP 3.4 `stat` values (short and long forms) and plain words.
PROVIDER_STATUSES: Final[Mapping[str, DeliveryStatus]] = MappingProxyType(
    {
        "DELIVRD": DeliveryStatus.DELIVERED,
        "DELIVERED": DeliveryStatus.DELIVERED,
        "ACCEPTD": DeliveryStatus.SENT,
        "ACCEPTED": DeliveryStatus.SENT,
        "ENROUTE": DeliveryStatus.SENT,
        "BUFFERED": DeliveryStatus.SENT,
        "PENDING": DeliveryStatus.SENT,
        "SENT": DeliveryStatus.SENT,
        "EXPIRED": DeliveryStatus.TEMPORARY_FAILURE,
        "UNKNOWN": DeliveryStatus.TEMPORARY_FAILURE,
        "UNDELIV": DeliveryStatus.PERMANENT_FAILURE,
        "UNDELIVERABLE": DeliveryStatus.PERMANENT_FAILURE,
        "REJECTD": DeliveryStatus.PERMANENT_FAILURE,
        "REJECTED": DeliveryStatus.PERMANENT_FAILURE,
        "DELETED": DeliveryStatus.PERMANENT_FAILURE,
    }
)

FINAL_STATUSES: Final = frozenset({DeliveryStatus.DELIVERED, DeliveryStatus.PERMANENT_FAILURE})

_SMS_EVENT_TYPES: Final[Mapping[DeliveryStatus, str]] = MappingProxyType(
    {
        DeliveryStatus.QUEUED: "sms.queued",
        DeliveryStatus.SENT: "sms.sent",
        DeliveryStatus.DELIVERED: "sms.delivered",
        DeliveryStatus.TEMPORARY_FAILURE: "sms.failed",
        DeliveryStatus.PERMANENT_FAILURE: "sms.failed",
    }
)


def map_provider_status(raw: str) -> DeliveryStatus:
    status = PROVIDER_STATUSES.get(raw.strip().upper())
    if status is None:
        raise UnknownProviderStatusError(f"unknown provider status {raw!r}")
    return status


def sms_event_type(status: DeliveryStatus) -> str:
    """The `sms.events` type announcing `status` (failures carry the status as data.reason)."""
    return _SMS_EVENT_TYPES[status]


def next_delivery_state(current: DeliveryStatus, report: DeliveryStatus) -> DeliveryStatus:
    """Apply a report that may be late, duplicated or out of order.

    Delivered and permanent failure are final: nothing moves them. A temporary failure may still
    become delivered or permanent (the SMSC keeps retrying) but never goes back to sent/queued.
    A report of "sent" or "queued" only moves a message forward from queued.
    """
    if current in FINAL_STATUSES:
        return current
    if report is DeliveryStatus.QUEUED:
        return current
    if report is DeliveryStatus.SENT:
        return DeliveryStatus.SENT if current is DeliveryStatus.QUEUED else current
    return report
