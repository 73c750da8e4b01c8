"""The `sms.*` events this service publishes (CONTRACT section 3). Pure.

Every one is about one message (its idempotency key) of one dossier and has a deterministic id,
`<key>:<what happened>`, so a redelivered input or a resent settle republishes the same event.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from services.common.events import CloudEvent, make_event, sampled_traceparent
from services.sms.decisions import SmsIntent
from services.sms.record import SMS_SOURCE, Pending


def sms_event(
    type_: str,
    *,
    key: str,
    dossier_id: str,
    at: datetime,
    suffix: str = "",
    trace: Mapping[str, str] | None = None,
    **data: Any,
) -> CloudEvent[Any]:
    """An `sms.*` event about the message `key`; its id ends in `suffix` (default: the type
    without `sms.`), and its data carries the dossier, the key and `data`; `trace`: the tracing
    attributes of the event that caused it."""
    return make_event(
        type_,
        source=SMS_SOURCE,
        id=f"{key}:{suffix or type_.removeprefix('sms.')}",
        subject=dossier_id,
        time=at,
        data={"dossier_id": dossier_id, "key": key, **data},
        trace=trace,
    )


def message_event(type_: str, message: Pending, now: datetime, **data: Any) -> CloudEvent[Any]:
    """An `sms.*` event about a message decided and addressed (queued, sent, failed to send),
    in the trace of the event that decided it."""
    return sms_event(
        type_,
        key=message.key,
        dossier_id=message.dossier_id,
        at=now,
        trace=sampled_traceparent(message.origin),
        template=message.template,
        segments=message.segments,
        **data,
    )


def queued_event(message: Pending, now: datetime) -> CloudEvent[Any]:
    """A message waiting for quiet hours to end."""
    return message_event(
        "sms.queued",
        message,
        now,
        not_before=message.not_before.isoformat(),
        reason="quiet_hours",
    )


def sent_event(message: Pending, provider: str, message_id: str, now: datetime) -> CloudEvent[Any]:
    """A message a provider accepted (`message_id` is empty when its answer did not say)."""
    return message_event("sms.sent", message, now, provider=provider, message_id=message_id or None)


def send_failed_event(
    message: Pending, reason: str, provider: str | None, now: datetime
) -> CloudEvent[Any]:
    """A message the sender gave up on."""
    return message_event(
        "sms.failed", message, now, provider=provider, reason=reason[:500], stage="send"
    )


def intent_event(type_: str, intent: SmsIntent, reason: str, now: datetime) -> CloudEvent[Any]:
    """A message that never became one: suppressed, or its template could not be rendered."""
    return sms_event(
        type_,
        key=intent.key,
        dossier_id=intent.dossier_id,
        at=now,
        template=intent.template,
        reason=reason[:500],
    )
