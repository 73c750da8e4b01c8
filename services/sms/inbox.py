"""What the SMS worker reads, decoded: one item per Kafka record of its four topics.

- `dossier.events`, `payment.events`, `postal.events`: CloudEvents of the types the decisions act
  on (`DECIDED_TYPES`; others are skipped before validation), validated, then turned into the
  core's `Event`. One that does not validate is poison (`<topic>.dlq` at once).
- `sms.callbacks` (internal, not CloudEvents): verified delivery reports, `tick` wake-ups, and
  the sender's `settle` batches. Anything else there is poison.

Pure: `decode_item` takes a record's topic, key and value; the worker hands it Kafka's records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import AwareDatetime, BaseModel, Field, ValidationError

from services.common import topics
from services.common.dead_letters import PoisonMessage
from services.common.events import CloudEvent, InvalidEvent, decode_event_of
from services.sms.decisions import Event, InvalidEventError, event_from_envelope
from services.sms.delivery import DeliveryStatus, UnknownProviderStatusError, map_provider_status

INPUT_TOPICS = (topics.DOSSIER_EVENTS, topics.PAYMENT_EVENTS, topics.POSTAL_EVENTS)
CONSUMED_TOPICS = (*INPUT_TOPICS, topics.SMS_CALLBACKS)

# Every type `decisions.apply` says something about (or changes the state for).
DECIDED_TYPES = frozenset(
    {
        "dossier.submitted",
        "dossier.received",
        "dossier.supplement_requested",
        "dossier.supplement_received",
        "dossier.resolved",
        "dossier.rejected",
        "dossier.withdrawn",
        "dossier.apology_issued",
        "dossier.result_returned",  # the satisfaction survey's invitation
        "dossier.overdue",
        "payment.requested",
        "payment.succeeded",
        "postal.pickup_requested",
        "postal.picked_up",
        "postal.out_for_delivery",
        "postal.delivered",
    }
)


class DeliveryReport(BaseModel):
    event_id: str = Field(min_length=1, max_length=200)
    message_id: str = Field(default="", max_length=200)
    reference: str = Field(min_length=1, max_length=200)
    dossier_id: str = Field(min_length=1, max_length=200)
    status: str = Field(min_length=1, max_length=40)
    occurred_at: AwareDatetime | None = None


@dataclass(frozen=True)
class Input:
    """An event of an input topic, as the core sees it, with its original bytes (dead letters)."""

    topic: str
    event: Event
    key: bytes | None  # the record's key (the dossier id)
    origin: bytes

    @property
    def dossier_id(self) -> str:
        return self.event.dossier_id


@dataclass(frozen=True)
class Tick:
    """Time to look at a dossier's deferred work (`decisions.tick`)."""

    dossier_id: str


@dataclass(frozen=True)
class Report:
    """A verified delivery report (the webhook wrote it)."""

    provider: str
    report: DeliveryReport
    status: DeliveryStatus

    @property
    def dossier_id(self) -> str:
        return self.report.dossier_id


@dataclass(frozen=True)
class Settle:
    """One message the sender got accepted or gave up on: it leaves `pending`."""

    dossier_id: str
    key: str
    template: str
    segments: int
    provider: str | None
    status: DeliveryStatus


@dataclass(frozen=True)
class SettleBatch:
    items: tuple[Settle, ...]


Item = Input | Tick | Report | SettleBatch


def decode_item(topic: str, key: bytes | None, value: bytes | None) -> Item | None:
    """A record of any consumed topic; None for an event type this service ignores. Raises
    `PoisonMessage` for one that can never be applied."""
    raw = value or b""
    if topic == topics.SMS_CALLBACKS:
        return decode_callback(raw)
    envelope = decided_envelope(raw)
    if envelope is None:
        return None
    try:
        event = event_from_envelope(envelope.to_dict())
        _ = event.dossier_id  # raises for an event that names no dossier
    except InvalidEventError as exc:
        raise PoisonMessage(str(exc)) from exc
    return Input(topic, event, key, raw)


def decided_envelope(raw: bytes) -> CloudEvent[Any] | None:
    """The validated CloudEvent in `raw` if its type is one the decisions act on; None for
    another type (skipped before validation: this service does not dead-letter what it has no
    business with)."""
    try:
        return decode_event_of(raw, DECIDED_TYPES)
    except InvalidEvent as exc:
        raise PoisonMessage(str(exc)) from exc


def decode_callback(raw: bytes) -> Item:
    try:
        message = orjson.loads(raw)
        kind = message["kind"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise PoisonMessage(f"not a callback: {exc}") from exc
    try:
        if kind == "tick":
            return Tick(str(message["dossier_id"]))
        if kind == "settle":
            return SettleBatch(tuple(_settle(item) for item in message["items"]))
        if kind == "report":
            report = DeliveryReport.model_validate(message)
            status = map_provider_status(report.status)
            return Report(str(message.get("provider") or ""), report, status)
    except (KeyError, TypeError, ValueError, ValidationError, UnknownProviderStatusError) as exc:
        raise PoisonMessage(f"bad {kind!r} callback: {exc}") from exc
    raise PoisonMessage(f"unknown callback kind {kind!r}")


def _settle(item: dict[str, Any]) -> Settle:
    return Settle(
        dossier_id=str(item["dossier_id"]),
        key=str(item["key"]),
        template=str(item.get("template") or ""),
        segments=int(item.get("segments") or 0),
        provider=item.get("provider"),
        status=DeliveryStatus(item["status"]),
    )


def settle_body(items: list[Settle]) -> bytes:
    """The `settle` callback the sender writes (read back by `decode_callback`)."""
    return orjson.dumps(
        {
            "kind": "settle",
            "items": [
                {
                    "dossier_id": item.dossier_id,
                    "key": item.key,
                    "template": item.template,
                    "segments": item.segments,
                    "provider": item.provider,
                    "status": item.status.value,
                }
                for item in items
            ],
        }
    )


def tick_body(dossier_id: str) -> bytes:
    """The `tick` callback the worker writes when a dossier's wake-up is due."""
    return orjson.dumps({"kind": "tick", "dossier_id": dossier_id})


def report_body(provider: str, report: DeliveryReport) -> bytes:
    """The `report` callback the webhook writes for a verified delivery report."""
    return orjson.dumps({"kind": "report", "provider": provider, **report.model_dump(mode="json")})
