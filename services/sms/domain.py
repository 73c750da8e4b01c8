"""The pure core of the SMS service: what to send, to whom, when, and how fast. No I/O.

The app layer keeps one `DossierState` per dossier (a faust table keyed by dossier id), feeds it
every event through `apply`, calls `tick` on a timer, renders each `SendSms` with `render_intent`,
and does the sending. Everything here is a function of its arguments.

Sections: templates and rendering · events · per-dossier state and decisions · quiet hours ·
token bucket · delivery reports · provider weighting.
"""

from __future__ import annotations

import hashlib
import json
import re
import tomllib
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, time, timedelta
from enum import StrEnum
from importlib import resources
from types import MappingProxyType
from typing import Final, NamedTuple

from services.sms.phones import PhoneResult, Unreachable, normalise_phone
from services.sms.text import (
    VN_TZ,
    Encoding,
    NaiveDatetimeError,
    check_length,
    fold_diacritics,
    format_date,
    format_vnd,
    to_local,
)

# ---------------------------------------------------------------------------------------------
# Templates and rendering
# ---------------------------------------------------------------------------------------------

_PLACEHOLDER = re.compile(r"\(\(([a-z][a-z0-9_]*)\)\)")

# The fields the decision core supplies for each template. Loading checks the data file against
# it, so a template asking for a field the core never fills fails at start-up, not at 3 a.m.
TEMPLATE_FIELDS: Final[Mapping[str, frozenset[str]]] = MappingProxyType(
    {
        "dossier_received": frozenset({"receipt_no", "due_date"}),
        "supplement_requested": frozenset({"ref", "reason"}),
        "result_ready_at_desk": frozenset({"ref"}),
        "result_ready_by_post": frozenset({"ref"}),
        "dossier_rejected": frozenset({"ref", "reason"}),
        "dossier_withdrawn": frozenset({"ref"}),
        "apology_issued": frozenset({"ref", "new_due_date"}),
        "overdue_apology": frozenset({"ref", "due_date"}),
        "payment_requested": frozenset({"ref", "amount", "payment_url"}),
        "payment_received": frozenset({"ref", "amount"}),
        "postal_pickup_booked": frozenset({"ref"}),
        "postal_picked_up": frozenset({"ref"}),
        "postal_out_for_delivery": frozenset({"ref"}),
        "postal_delivered": frozenset({"ref"}),
    }
)


class TemplateError(ValueError):
    """The template data is malformed or does not match what the core supplies."""


class MissingFieldError(KeyError):
    """A placeholder has no (or an empty) value: the message must not go out with a hole."""

    def __init__(self, template: str, missing: Sequence[str]) -> None:
        super().__init__(f"template {template!r} is missing field(s): {', '.join(missing)}")
        self.template = template
        self.missing = tuple(missing)

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


@dataclass(frozen=True)
class Template:
    name: str
    body: str
    fold: bool = True
    urgent: bool = False

    @property
    def fields(self) -> frozenset[str]:
        return placeholders(self.body)


@dataclass(frozen=True)
class RenderedSms:
    template: str
    text: str
    encoding: Encoding
    units: int
    segments: int
    urgent: bool


def placeholders(body: str) -> frozenset[str]:
    return frozenset(_PLACEHOLDER.findall(body))


def _check_template(template: Template, expected: Mapping[str, frozenset[str]] | None) -> None:
    if not template.body.strip():
        raise TemplateError(f"template {template.name!r} has an empty body")
    leftover = _PLACEHOLDER.sub("", template.body)
    if "((" in leftover or "))" in leftover:
        raise TemplateError(f"template {template.name!r} has a malformed ((placeholder))")
    if expected is not None:
        supplied = expected.get(template.name)
        if supplied is None:
            raise TemplateError(f"template {template.name!r} is not used by the core")
        unknown = template.fields - supplied
        if unknown:
            raise TemplateError(
                f"template {template.name!r} asks for field(s) the core never supplies: "
                f"{', '.join(sorted(unknown))}"
            )


def parse_templates(
    toml_text: str, expected: Mapping[str, frozenset[str]] | None = TEMPLATE_FIELDS
) -> Mapping[str, Template]:
    """Templates from the TOML data; with `expected`, every expected template must be there."""
    try:
        document = tomllib.loads(toml_text)
    except tomllib.TOMLDecodeError as exc:
        raise TemplateError(f"templates are not valid TOML: {exc}") from exc
    entries = document.get("template")
    if not isinstance(entries, list):
        raise TemplateError("templates must be a [[template]] array")
    templates: dict[str, Template] = {}
    for entry in entries:
        if not isinstance(entry, dict):
            raise TemplateError("each [[template]] must be a table")
        unknown_keys = set(entry) - {"name", "body", "fold", "urgent"}
        name, body = entry.get("name"), entry.get("body")
        fold, urgent = entry.get("fold", True), entry.get("urgent", False)
        if unknown_keys:
            raise TemplateError(f"template {name!r} has unknown key(s) {sorted(unknown_keys)}")
        if not isinstance(name, str) or not name or not isinstance(body, str):
            raise TemplateError(f"template {name!r} needs a string name and body")
        if not isinstance(fold, bool) or not isinstance(urgent, bool):
            raise TemplateError(f"template {name!r}: fold and urgent must be true or false")
        if name in templates:
            raise TemplateError(f"template {name!r} is defined twice")
        template = Template(name=name, body=body, fold=fold, urgent=urgent)
        _check_template(template, expected)
        templates[name] = template
    if expected is not None:
        absent = set(expected) - set(templates)
        if absent:
            raise TemplateError(f"template(s) missing from the data: {', '.join(sorted(absent))}")
    return MappingProxyType(templates)


def load_templates() -> Mapping[str, Template]:
    """The templates shipped with the service (reads package data once, at start-up)."""
    text = resources.files("services.sms").joinpath("templates.toml").read_text("utf-8")
    return parse_templates(text)


def render(template: Template, fields: Mapping[str, str]) -> RenderedSms:
    """Fill the placeholders; raise MissingFieldError or text.MessageTooLongError, never guess."""
    filled = {k: " ".join(v.split()) for k, v in fields.items()}  # no stray newlines or tabs
    missing = sorted(name for name in template.fields if not filled.get(name))
    if missing:
        raise MissingFieldError(template.name, missing)
    # One pass, so a value that happens to contain ((x)) is not expanded again.
    text = _PLACEHOLDER.sub(lambda m: filled[m.group(1)], template.body)
    if template.fold:
        text = fold_diacritics(text)
    described = check_length(text)
    return RenderedSms(
        template=template.name,
        text=described.text,
        encoding=described.encoding,
        units=described.units,
        segments=described.segments,
        urgent=template.urgent,
    )


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------


class InvalidEventError(ValueError):
    """The event cannot be decided on (bad envelope or badly typed data): dead-letter it."""


@dataclass(frozen=True)
class Event:
    """The parts of a CloudEvents envelope the core needs."""

    type: str
    source: str
    id: str
    time: datetime
    data: Mapping[str, object]
    subject: str | None = None

    def __post_init__(self) -> None:
        if self.time.tzinfo is None or self.time.utcoffset() is None:
            raise InvalidEventError(f"event {self.id!r}: time has no offset")

    @property
    def dossier_id(self) -> str:
        value = self.data.get("dossier_id", self.subject)
        if not isinstance(value, str) or not value:
            raise InvalidEventError(f"event {self.id!r} names no dossier")
        return value


def _parse_time(value: object, what: str) -> datetime:
    if not isinstance(value, str):
        raise InvalidEventError(f"{what} must be an RFC 3339 string")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise InvalidEventError(f"{what} is not RFC 3339: {value!r}") from exc
    if parsed.tzinfo is None:
        raise InvalidEventError(f"{what} has no offset: {value!r}")
    return parsed


def event_from_envelope(envelope: Mapping[str, object]) -> Event:
    """An Event from a decoded envelope (already validated at the edge, re-checked here)."""
    strings = {}
    for key in ("type", "source", "id"):
        value = envelope.get(key)
        if not isinstance(value, str) or not value:
            raise InvalidEventError(f"envelope field {key!r} must be a non-empty string")
        strings[key] = value
    data = envelope.get("data")
    if not isinstance(data, Mapping):
        raise InvalidEventError("envelope field 'data' must be an object")
    subject = envelope.get("subject")
    return Event(
        type=strings["type"],
        source=strings["source"],
        id=strings["id"],
        time=_parse_time(envelope.get("time"), "time"),
        data=data,
        subject=subject if isinstance(subject, str) else None,
    )


def _text(data: Mapping[str, object], key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidEventError(f"data.{key} must be a string")
    return value


def _moment(data: Mapping[str, object], key: str) -> datetime | None:
    value = data.get(key)
    return None if value is None else _parse_time(value, f"data.{key}")


def _amount(data: Mapping[str, object], key: str) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidEventError(f"data.{key} must be a non-negative integer of VND")
    return value


def _section(data: Mapping[str, object], key: str) -> Mapping[str, object]:
    value = data.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidEventError(f"data.{key} must be an object")
    return value


# ---------------------------------------------------------------------------------------------
# Per-dossier state and decisions
# ---------------------------------------------------------------------------------------------

NO_CONTACT: Final = "no_contact"  # no dossier.submitted (hence no phone) within the wait
OPTED_OUT: Final = "opted_out"

POSTAL_RETURN_MODES: Final = frozenset({"return", "pickup_and_return"})


@dataclass(frozen=True)
class SmsPolicy:
    # How long after dossier.overdue an apology may still come before we apologise ourselves.
    overdue_grace: timedelta = timedelta(hours=24)
    # How long a message may wait for the dossier.submitted that carries the phone number.
    contact_wait: timedelta = timedelta(hours=24)
    # Free text typed by officers (reasons) is cut so one long reason cannot break the cap.
    max_reason_chars: int = 120


DEFAULT_POLICY: Final = SmsPolicy()


def idempotency_key(source: str, event_id: str, template: str) -> str:
    """Stable key per (source, event id, template); unambiguous whatever the parts contain."""
    digest = hashlib.sha256(json.dumps([source, event_id, template]).encode("utf-8"))
    return "sms:" + digest.hexdigest()


@dataclass(frozen=True)
class SmsIntent:
    """What to say about which dossier, because of which event; not yet addressed."""

    dossier_id: str
    template: str
    fields: tuple[tuple[str, str], ...]  # sorted pairs: hashable and order-stable
    source: str
    event_id: str
    event_time: datetime

    @property
    def key(self) -> str:
        return idempotency_key(self.source, self.event_id, self.template)

    def field_map(self) -> dict[str, str]:
        return dict(self.fields)


@dataclass(frozen=True)
class SendSms:
    intent: SmsIntent
    to: str  # E.164; log it only through phones.mask_phone


@dataclass(frozen=True)
class SuppressSms:
    intent: SmsIntent
    reason: str  # a phones.SuppressionReason value, NO_CONTACT or OPTED_OUT


Outgoing = SendSms | SuppressSms


@dataclass(frozen=True)
class Contact:
    phone: PhoneResult
    postal_mode: str = "none"


@dataclass(frozen=True)
class PendingOverdue:
    intent: SmsIntent
    due_at: datetime
    release_at: datetime


@dataclass(frozen=True)
class DossierState:
    dossier_id: str
    contact: Contact | None = None
    receipt_no: str | None = None
    # Latest new date promised by an apology: an apology covers an overdue only if it promised a
    # date later than the one that was missed.
    apology_new_due_at: datetime | None = None
    pending_overdue: PendingOverdue | None = None
    # Messages decided before dossier.submitted (the phone) arrived; kept, not lost.
    awaiting_contact: tuple[SmsIntent, ...] = ()
    # Resolved, rejected or withdrawn: no overdue apology any more.
    settled: bool = False

    @property
    def ref(self) -> str:
        return self.receipt_no or self.dossier_id


class Decision(NamedTuple):
    state: DossierState
    outgoing: tuple[Outgoing, ...]


def _intent(state: DossierState, event: Event, template: str, **fields: str | None) -> SmsIntent:
    # Absent values are left out, so render() reports them instead of sending a hole.
    present = tuple(sorted((k, v) for k, v in fields.items() if v is not None))
    return SmsIntent(
        dossier_id=state.dossier_id,
        template=template,
        fields=present,
        source=event.source,
        event_id=event.id,
        event_time=event.time,
    )


def _result_template(postal_mode: str) -> str:
    return "result_ready_by_post" if postal_mode in POSTAL_RETURN_MODES else "result_ready_at_desk"


def _fit_to_contact(intent: SmsIntent, contact: Contact) -> SmsIntent:
    # Whether the result comes by post is only known from dossier.submitted.
    if intent.template in ("result_ready_at_desk", "result_ready_by_post"):
        return replace(intent, template=_result_template(contact.postal_mode))
    return intent


def _address(
    state: DossierState, intents: Sequence[SmsIntent]
) -> tuple[DossierState, tuple[Outgoing, ...]]:
    if state.contact is None:
        return replace(state, awaiting_contact=state.awaiting_contact + tuple(intents)), ()
    phone = state.contact.phone
    outgoing: list[Outgoing] = []
    for intent in intents:
        fitted = _fit_to_contact(intent, state.contact)
        if isinstance(phone, Unreachable):
            outgoing.append(SuppressSms(fitted, phone.reason.value))
        else:
            outgoing.append(SendSms(fitted, phone.e164))
    return state, tuple(outgoing)


def _truncate(text: str | None, limit: int) -> str | None:
    if text is None:
        return None
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: max(0, limit - 3)].rstrip() + "..."


def _date(data: Mapping[str, object], key: str) -> str | None:
    moment = _moment(data, key)
    return None if moment is None else format_date(moment)


def _money(data: Mapping[str, object], key: str) -> str | None:
    amount = _amount(data, key)
    return None if amount is None else format_vnd(amount)


def _settle(state: DossierState) -> DossierState:
    return replace(state, settled=True, pending_overdue=None)


def _covers(apology_new_due_at: datetime | None, due_at: datetime) -> bool:
    return apology_new_due_at is not None and apology_new_due_at > due_at


_POSTAL_TEMPLATES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "postal.pickup_requested": "postal_pickup_booked",
        "postal.picked_up": "postal_picked_up",
        "postal.out_for_delivery": "postal_out_for_delivery",
        "postal.delivered": "postal_delivered",
    }
)


def _decide(
    state: DossierState, event: Event, policy: SmsPolicy
) -> tuple[DossierState, list[SmsIntent]]:
    """State change and the intents an event causes, before addressing."""
    data = event.data
    kind = event.type
    if kind == "dossier.submitted":
        applicant = _section(data, "applicant")
        postal = _section(data, "postal")
        phone = applicant.get("phone")
        mode = postal.get("mode", "none")
        contact = Contact(
            phone=normalise_phone(phone if isinstance(phone, str) else None),
            postal_mode=mode if isinstance(mode, str) else "none",
        )
        waiting = state.awaiting_contact
        return replace(state, contact=contact, awaiting_contact=()), list(waiting)
    if kind == "dossier.received":
        receipt_no = _text(data, "receipt_no")
        state = replace(state, receipt_no=receipt_no or state.receipt_no)
        return state, [
            _intent(
                state,
                event,
                "dossier_received",
                receipt_no=receipt_no,
                due_date=_date(data, "due_at"),
            )
        ]
    if kind == "dossier.supplement_requested":
        reason = _truncate(_text(data, "reason"), policy.max_reason_chars)
        return state, [_intent(state, event, "supplement_requested", ref=state.ref, reason=reason)]
    if kind == "dossier.resolved":
        mode = state.contact.postal_mode if state.contact else "none"
        return _settle(state), [_intent(state, event, _result_template(mode), ref=state.ref)]
    if kind == "dossier.rejected":
        reason = _truncate(_text(data, "reason"), policy.max_reason_chars)
        return _settle(state), [
            _intent(state, event, "dossier_rejected", ref=state.ref, reason=reason)
        ]
    if kind == "dossier.withdrawn":
        return _settle(state), [_intent(state, event, "dossier_withdrawn", ref=state.ref)]
    if kind == "dossier.apology_issued":
        new_due_at = _moment(data, "new_due_at")
        latest = state.apology_new_due_at
        if new_due_at is not None and (latest is None or new_due_at > latest):
            latest = new_due_at
        pending = state.pending_overdue
        if pending is not None and _covers(latest, pending.due_at):
            pending = None
        state = replace(state, apology_new_due_at=latest, pending_overdue=pending)
        new_due_date = None if new_due_at is None else format_date(new_due_at)
        return state, [
            _intent(state, event, "apology_issued", ref=state.ref, new_due_date=new_due_date)
        ]
    if kind == "dossier.overdue":
        due_at = _moment(data, "due_at")
        if due_at is None:
            raise InvalidEventError(f"event {event.id!r}: dossier.overdue needs data.due_at")
        if state.settled or _covers(state.apology_new_due_at, due_at):
            return state, []
        if state.pending_overdue is not None and state.pending_overdue.due_at == due_at:
            return state, []  # a redelivery: keep the first deadline
        intent = _intent(
            state, event, "overdue_apology", ref=state.ref, due_date=format_date(due_at)
        )
        pending = PendingOverdue(intent, due_at, event.time + policy.overdue_grace)
        return replace(state, pending_overdue=pending), []
    if kind == "payment.requested":
        return state, [
            _intent(
                state,
                event,
                "payment_requested",
                ref=state.ref,
                amount=_money(data, "amount_vnd"),
                payment_url=_text(data, "payment_url"),
            )
        ]
    if kind == "payment.succeeded":
        return state, [
            _intent(
                state, event, "payment_received", ref=state.ref, amount=_money(data, "amount_vnd")
            )
        ]
    template = _POSTAL_TEMPLATES.get(kind)
    if template is not None:
        return state, [_intent(state, event, template, ref=state.ref)]
    # Any other type (transferred, payment.failed, sms.*, ...) says nothing to the applicant.
    return state, []


def apply(state: DossierState | None, event: Event, policy: SmsPolicy = DEFAULT_POLICY) -> Decision:
    """The new per-dossier state and the messages `event` causes (possibly none).

    Idempotent in effect: applying the same event twice yields the same messages with the same
    idempotency keys, which the sender deduplicates.
    """
    dossier_id = event.dossier_id
    if state is None:
        state = DossierState(dossier_id=dossier_id)
    elif state.dossier_id != dossier_id:
        raise InvalidEventError(
            f"event {event.id!r} is for dossier {dossier_id!r}, state is {state.dossier_id!r}"
        )
    try:
        state, intents = _decide(state, event, policy)
    except NaiveDatetimeError as exc:  # defensive: _parse_time already refuses naive times
        raise InvalidEventError(str(exc)) from exc
    return Decision(*_address(state, intents))


def tick(state: DossierState, now: datetime, policy: SmsPolicy = DEFAULT_POLICY) -> Decision:
    """Release what was deferred and is now due: an unanswered overdue apology; give up on
    messages that waited too long for a phone number."""
    to_local(now)  # refuses a naive clock
    outgoing: list[Outgoing] = []
    pending = state.pending_overdue
    if pending is not None and now >= pending.release_at:
        state, released = _address(replace(state, pending_overdue=None), [pending.intent])
        outgoing.extend(released)
    if state.contact is None and state.awaiting_contact:
        expired = [i for i in state.awaiting_contact if i.event_time + policy.contact_wait <= now]
        kept = tuple(i for i in state.awaiting_contact if i not in expired)
        outgoing.extend(SuppressSms(intent, NO_CONTACT) for intent in expired)
        state = replace(state, awaiting_contact=kept)
    return Decision(state, tuple(outgoing))


def next_wakeup(state: DossierState, policy: SmsPolicy = DEFAULT_POLICY) -> datetime | None:
    """When `tick` next has something to do for this dossier, so the app can index timers."""
    moments = [i.event_time + policy.contact_wait for i in state.awaiting_contact]
    if state.pending_overdue is not None:
        moments.append(state.pending_overdue.release_at)
    return min(moments, default=None)


def apply_opt_outs(outgoing: Sequence[Outgoing], opted_out: Container[str]) -> tuple[Outgoing, ...]:
    """Suppress messages to numbers on the opt-out list (E.164, as normalise_phone gives)."""
    return tuple(
        SuppressSms(o.intent, OPTED_OUT) if isinstance(o, SendSms) and o.to in opted_out else o
        for o in outgoing
    )


def render_intent(templates: Mapping[str, Template], intent: SmsIntent) -> RenderedSms:
    template = templates.get(intent.template)
    if template is None:
        raise TemplateError(f"no template named {intent.template!r}")
    return render(template, intent.field_map())


# ---------------------------------------------------------------------------------------------
# Quiet hours
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuietHours:
    """Local wall-clock window [start, end) in Asia/Ho_Chi_Minh; may wrap past midnight."""

    start: time = time(22, 0)
    end: time = time(7, 0)

    def contains(self, moment: datetime) -> bool:
        local = to_local(moment).time()
        if self.start <= self.end:
            return self.start <= local < self.end
        return local >= self.start or local < self.end


DEFAULT_QUIET_HOURS: Final = QuietHours()


def earliest_send_time(
    now: datetime, *, urgent: bool, quiet: QuietHours = DEFAULT_QUIET_HOURS
) -> datetime:
    """`now` if a message may go now, else the end of the quiet window (07:00 local)."""
    if urgent or not quiet.contains(now):
        return now
    local = to_local(now)
    release = datetime.combine(local.date(), quiet.end, tzinfo=VN_TZ)
    if release <= local:
        release = datetime.combine(local.date() + timedelta(days=1), quiet.end, tzinfo=VN_TZ)
    return release


# ---------------------------------------------------------------------------------------------
# Token bucket (delays, never drops)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenBucket:
    """Rate limit as a value. `tokens` may go negative: that is capacity already promised to
    callers who were told to wait, so later callers wait behind them.

    Times are seconds on one clock shared by all takers (epoch seconds for the Redis version).
    """

    capacity: float
    refill_per_second: float
    tokens: float
    updated_at: float

    def __post_init__(self) -> None:
        if self.capacity < 1 or self.refill_per_second <= 0:
            raise ValueError("capacity must be at least 1 and the refill rate positive")

    @classmethod
    def full(cls, capacity: float, refill_per_second: float, now: float) -> TokenBucket:
        return cls(capacity, refill_per_second, float(capacity), now)

    def take(self, now: float, cost: float = 1.0) -> tuple[TokenBucket, float]:
        """Reserve `cost` tokens; returns the new bucket and how long to wait before sending."""
        if not 0 < cost <= self.capacity:
            raise ValueError(f"cost must be in (0, capacity], got {cost}")
        elapsed = max(0.0, now - self.updated_at)  # a clock that steps back refills nothing
        available = min(self.capacity, self.tokens + elapsed * self.refill_per_second)
        remaining = available - cost
        wait = 0.0 if remaining >= 0 else -remaining / self.refill_per_second
        return replace(self, tokens=remaining, updated_at=max(now, self.updated_at)), wait


# ---------------------------------------------------------------------------------------------
# Delivery reports
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Provider weighting
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProviderWeights:
    """Relative weights of the SMS providers (Notify style), and when they last changed."""

    weights: tuple[tuple[str, int], ...]  # sorted by provider name
    changed_at: datetime | None = None

    def __post_init__(self) -> None:
        names = [name for name, _ in self.weights]
        if not names or len(set(names)) != len(names):
            raise ValueError("providers must be named once each, and at least one given")
        if any(weight < 0 for _, weight in self.weights):
            raise ValueError("weights must not be negative")
        if sum(weight for _, weight in self.weights) <= 0:
            raise ValueError("at least one provider needs a positive weight")

    @classmethod
    def of(cls, weights: Mapping[str, int], changed_at: datetime | None = None) -> ProviderWeights:
        return cls(tuple(sorted(weights.items())), changed_at)

    def as_dict(self) -> dict[str, int]:
        return dict(self.weights)


def pick_provider(weights: ProviderWeights, r: float) -> str:
    """The provider for a uniform random `r` in [0, 1): each gets a share equal to its weight."""
    if not 0.0 <= r < 1.0:
        raise ValueError(f"r must be in [0, 1), got {r}")
    total = sum(weight for _, weight in weights.weights)
    point = r * total
    cumulative = 0
    for name, weight in weights.weights:
        cumulative += weight
        if point < cumulative:
            return name
    # Only reachable through float rounding with r just under 1.
    return next(name for name, weight in reversed(weights.weights) if weight > 0)


def failover_order(weights: ProviderWeights, r: float) -> tuple[str, ...]:
    """The picked provider first, then the others by weight (zero weights last, still tried)."""
    first = pick_provider(weights, r)
    others = sorted(
        (item for item in weights.weights if item[0] != first), key=lambda item: (-item[1], item[0])
    )
    return (first, *(name for name, _ in others))


def shift_weight_away(
    weights: ProviderWeights,
    provider: str,
    now: datetime,
    *,
    step: int = 10,
    floor: int = 10,
    cooldown: timedelta = timedelta(minutes=10),
) -> ProviderWeights:
    """Move up to `step` of weight from a provider that failed or was slow to the others.

    Keeps the total; never takes a provider below `floor` (so it still gets probed and can show
    it recovered); does nothing within `cooldown` of the last change (one slow minute must not
    swing all traffic).
    """
    current = weights.as_dict()
    if provider not in current or len(current) < 2:
        return weights
    if weights.changed_at is not None and now - weights.changed_at < cooldown:
        return weights
    moved = min(step, current[provider] - floor)
    if moved <= 0:
        return weights
    current[provider] -= moved
    others = sorted(name for name in current if name != provider)
    share, remainder = divmod(moved, len(others))
    for index, name in enumerate(others):
        current[name] += share + (1 if index < remainder else 0)
    return ProviderWeights.of(current, changed_at=now)
