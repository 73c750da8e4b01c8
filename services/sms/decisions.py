"""What each event says to whom: per-dossier state, `apply`, `tick`, opt-outs. Pure.

The app keeps one `DossierState` per dossier (in its record, keyed by dossier id), feeds it every
event through `apply`, calls `tick` when `next_wakeup` says, and renders each `SendSms`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from types import MappingProxyType
from typing import Final, NamedTuple

from services.common.survey_links import link_for, sign, url_for
from services.sms.phones import PhoneResult, Unreachable, normalise_phone
from services.sms.templates import RenderedSms, Template, TemplateError, render
from services.sms.text import NaiveDatetimeError, format_date, format_vnd, to_local


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
    # The applicant's phone of a `dossier.submitted` as the worker read it when it came sealed
    # (`contacts.open_phones`: opened, normalised, the E.164 sealed again); None: the core
    # normalises `data.applicant.phone` itself.
    phone: PhoneResult | None = None

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
    # The satisfaction survey's invitation after `dossier.result_returned`; None: not sent.
    survey: SurveyInvites | None = None


@dataclass(frozen=True)
class SurveyInvites:
    """How the survey's links are made (`services.common.survey_links`): the secrets (the first
    signs), how many days a link stays open after the return, the page's public base URL."""

    secrets: tuple[str, ...]
    days: int
    base_url: str

    def url(self, dossier_id: str, agency_code: str, returned_at: datetime) -> str:
        link = link_for(dossier_id, agency_code, returned_at, self.days)
        return url_for(self.base_url, sign(link, self.secrets))


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
    to: str  # E.164; logs see it only through services.common.logging.mask_phone


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
    # Supplement requested and the documents not back yet: the overdue clock stands still (the
    # delay is the applicant's), so no overdue apology.
    awaiting_documents: bool = False

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
            phone=event.phone
            if event.phone is not None
            else normalise_phone(phone if isinstance(phone, str) else None),
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
        state = replace(state, awaiting_documents=True, pending_overdue=None)
        return state, [_intent(state, event, "supplement_requested", ref=state.ref, reason=reason)]
    if kind == "dossier.supplement_received":
        return replace(state, awaiting_documents=False), []
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
        if state.settled or state.awaiting_documents or _covers(state.apology_new_due_at, due_at):
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
                # The short link keeps the message to one or two segments; a gateway URL with
                # all its signed parameters would take five.
                payment_url=_text(data, "short_url") or _text(data, "payment_url"),
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
    if kind == "dossier.result_returned" and policy.survey is not None:
        agency = _text(data, "agency_code")
        if agency is None:
            raise InvalidEventError(f"event {event.id!r}: {kind} needs data.agency_code")
        returned_at = _moment(data, "returned_at") or event.time
        url = policy.survey.url(state.dossier_id, agency, returned_at)
        return state, [_intent(state, event, "survey_invite", ref=state.ref, survey_url=url)]
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
