"""What the worker keeps per dossier (its changelog record), and how events change it. Pure.

One `SmsRecord` per dossier: the decision state, the messages decided but not yet accepted by a
provider (`pending`, including those deferred past quiet hours: they survive a restart because
they are in the record), and what became of each message sent (`sent`), so delivery reports can
only move a message forward.

**Retirement.** A record whose story is over (`retire_at`) leaves memory and the changelog (a
tombstone): the dossier is settled (resolved, rejected, withdrawn) or there is no phone to write
to, and nothing is pending (no message waiting for a provider or for quiet hours to end, no
overdue apology waiting for its grace, no message waiting for a phone number). It leaves once
two graces have passed: by event time since the latest event that changed it (`after`: the news
that still follows a settled dossier, such as the result's journey back by post), and by the
worker's clock since its last change (`idle`; `report_wait` while a message it sent has no final
delivery report yet). What a late event does for a retired dossier is said in `fold.py`.
"""

from __future__ import annotations

from collections.abc import Container, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from pydantic import TypeAdapter

from services.sms.decisions import (
    Decision,
    DossierState,
    SendSms,
    SmsIntent,
    SuppressSms,
    apply_opt_outs,
    render_intent,
)
from services.sms.delivery import FINAL_STATUSES, DeliveryStatus, next_delivery_state
from services.sms.quiet import QuietHours, earliest_send_time
from services.sms.templates import Template, TemplateError
from services.sms.text import MessageTooLongError

SMS_SOURCE = "motcua/sms"


@dataclass(frozen=True)
class Pending:
    """A message decided and addressed, waiting to be accepted by a provider."""

    key: str  # the idempotency key: (source, event id, template)
    dossier_id: str
    template: str
    to: str  # E.164: never logged
    text: str
    segments: int
    urgent: bool
    not_before: datetime  # the end of quiet hours for a deferred message
    source_topic: str  # where the message came from: its DLQ takes the failures
    origin: str  # the original event (JSON), for the dead letter


@dataclass(frozen=True)
class Sent:
    template: str
    segments: int
    provider: str | None
    status: DeliveryStatus


@dataclass(frozen=True)
class SmsRecord:
    state: DossierState
    pending: dict[str, Pending] = field(default_factory=dict)
    sent: dict[str, Sent] = field(default_factory=dict)
    # The latest event time of the inputs that changed the record, and the worker's clock at
    # its last change (None in a record written before they were kept: long ago).
    event_at: datetime | None = None
    touched_at: datetime | None = None


@dataclass(frozen=True)
class Retirement:
    """How long a record whose story is over stays (why these defaults: `SmsSettings`)."""

    after: timedelta = timedelta(days=21)  # by event time, since `event_at`
    idle: timedelta = timedelta(hours=1)  # by the worker's clock, since `touched_at`
    report_wait: timedelta = timedelta(days=3)  # instead of `idle` while a report is awaited


DEFAULT_RETIREMENT = Retirement()
LONG_AGO = datetime.min.replace(tzinfo=UTC)


def story_over(record: SmsRecord) -> bool:
    """Nothing pending, and nothing more to tell: the dossier settled, or no phone to tell."""
    state = record.state
    if record.pending or state.pending_overdue is not None or state.awaiting_contact:
        return False
    return state.settled or state.contact is None


def awaiting_report(record: SmsRecord) -> bool:
    """A message sent has no final delivery report yet."""
    return any(sent.status not in FINAL_STATUSES for sent in record.sent.values())


def retire_at(record: SmsRecord, retirement: Retirement) -> datetime | None:
    """From when the record may leave (None: its story is not over)."""
    if not story_over(record):
        return None
    wait = retirement.report_wait if awaiting_report(record) else retirement.idle
    moments = [LONG_AGO]
    if record.event_at is not None:
        moments.append(record.event_at + retirement.after)
    if record.touched_at is not None:
        moments.append(record.touched_at + wait)
    return max(moments)


_RECORD = TypeAdapter(SmsRecord)


def encode_record(record: SmsRecord) -> bytes:
    return _RECORD.dump_json(record)


def decode_record(raw: bytes) -> SmsRecord:
    return _RECORD.validate_json(raw)


@dataclass(frozen=True)
class Plan:
    record: SmsRecord
    queued: tuple[Pending, ...] = ()
    suppressed: tuple[SuppressSms, ...] = ()
    unrenderable: tuple[tuple[SmsIntent, str], ...] = ()  # (intent, reason): sms.failed + DLQ


def plan(
    record: SmsRecord | None,
    decision: Decision,
    *,
    templates: Mapping[str, Template],
    opted_out: Container[str],
    quiet: QuietHours,
    now: datetime,
    source_topic: str,
    origin: str,
) -> Plan:
    """Fold a decision into the record: new messages become pending; repeats are dropped."""
    pending = dict(record.pending) if record else {}
    sent = record.sent if record else {}
    queued: list[Pending] = []
    suppressed: list[SuppressSms] = []
    unrenderable: list[tuple[SmsIntent, str]] = []
    for outgoing in apply_opt_outs(decision.outgoing, opted_out):
        key = outgoing.intent.key
        if key in pending or key in sent:
            continue  # a redelivered event: this message is already on its way or done
        if isinstance(outgoing, SuppressSms):
            suppressed.append(outgoing)
            continue
        assert isinstance(outgoing, SendSms)
        try:
            rendered = render_intent(templates, outgoing.intent)
        except (TemplateError, KeyError, MessageTooLongError) as exc:
            unrenderable.append((outgoing.intent, f"render_error: {exc}"))
            continue
        message = Pending(
            key=key,
            dossier_id=outgoing.intent.dossier_id,
            template=rendered.template,
            to=outgoing.to,
            text=rendered.text,
            segments=rendered.segments,
            urgent=rendered.urgent,
            not_before=earliest_send_time(now, urgent=rendered.urgent, quiet=quiet),
            source_topic=source_topic,
            origin=origin,
        )
        pending[key] = message
        queued.append(message)
    if record is None:
        new = SmsRecord(state=decision.state, pending=pending, sent=dict(sent))
    else:
        new = replace(record, state=decision.state, pending=pending, sent=dict(sent))
    return Plan(new, tuple(queued), tuple(suppressed), tuple(unrenderable))


def settle(
    record: SmsRecord,
    key: str,
    *,
    template: str,
    segments: int,
    provider: str | None,
    status: DeliveryStatus,
) -> tuple[SmsRecord, DeliveryStatus | None]:
    """A message's news (accepted, failed to send, a delivery report), in any order.

    Returns the new record and the status it moved to, or None when it did not move (a
    duplicate, a late or out-of-order report): delivered never goes back.
    """
    pending = {k: v for k, v in record.pending.items() if k != key}
    before = record.sent.get(key)
    current = before.status if before else DeliveryStatus.QUEUED
    after = next_delivery_state(current, status)
    entry = Sent(
        template=before.template if before else template,
        segments=before.segments if before else segments,
        provider=(before.provider if before and before.provider else provider),
        status=after,
    )
    new = replace(record, pending=pending, sent={**record.sent, key: entry})
    return new, (after if after is not current else None)
