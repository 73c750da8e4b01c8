"""One poll's items folded into the per-dossier records, and what to do about it. Pure.

The worker reads its four topics in batches (`services.common.consumer.BatchConsumer`); this
folds a batch, item after item, into the records of the dossiers concerned and says what
follows: the records to write (one per dossier changed), the events to publish, the messages
due now and those deferred past quiet hours, and the dead letters. Nothing is written here, so
a batch that fails half-way leaves the worker's state as it was.

A `tick` also retires the dossier's record when its moment has come (`record.retire_at`): the
record leaves (`Outcome.retired`), and the worker writes its tombstone. A late input for a
retired dossier finds no record, so no phone number either:

- `dossier.overdue`: nothing. A dossier with no record here is settled and retired (an open
  one never retires, and its own `dossier.submitted` comes before its overdue on the same
  partition), so there is no apology to make.
- any other event that would tell the applicant something (a postal leg, a late payment
  success, a redelivered `dossier.*`): its message waits for a phone number like any message
  decided before `dossier.submitted`, and is suppressed (`sms.suppressed`, `no_contact`) after
  the contact wait; no SMS goes out. Should `dossier.submitted` come again too (the topic read
  again from an old offset), the messages go to the sender with their first keys, whose Redis
  claims (`SMS_CLAIM_TTL_SECONDS`, longer than the retirement grace) say they were sent: none
  is sent a second time. The new record retires again as any other.
- a delivery report: its `sms.delivered` / `sms.failed` is published with the id it would have
  had (`<key>:<status>`; the webhook already dropped a report it had before); nothing is kept.
- a `settle` or a `tick`: nothing (a record with a message in the sender never retires).
"""

from __future__ import annotations

from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

import orjson

from services.common import topics
from services.common.dead_letters import PoisonMessage
from services.common.events import CloudEvent
from services.sms.decisions import (
    Decision,
    DossierState,
    InvalidEventError,
    SmsIntent,
    SmsPolicy,
    apply,
    tick,
)
from services.sms.delivery import DeliveryStatus, sms_event_type
from services.sms.events import intent_event, queued_event, sms_event
from services.sms.inbox import Input, Item, Report, Settle, SettleBatch, Tick, tick_body
from services.sms.quiet import QuietHours
from services.sms.record import (
    DEFAULT_RETIREMENT,
    Pending,
    Retirement,
    SmsRecord,
    plan,
    retire_at,
    settle,
)
from services.sms.templates import Template


class SmsNotSent(Exception):
    """Why a message went to the dead-letter topic of the event that asked for it."""


@dataclass(frozen=True)
class Rules:
    """What the decisions need besides the records: fixed for the worker's life."""

    templates: Mapping[str, Template]
    opted_out: Container[str]
    quiet: QuietHours
    policy: SmsPolicy
    retirement: Retirement = DEFAULT_RETIREMENT


@dataclass(frozen=True)
class DeadLetter:
    topic: str  # the dead-letter topic
    key: bytes | None
    value: bytes
    error: Exception  # its type and text become the CONTRACT headers


@dataclass
class Outcome:
    records: dict[str, SmsRecord] = field(default_factory=dict)  # changed, by dossier id
    retired: set[str] = field(default_factory=set)  # dossier ids whose records leave
    events: list[CloudEvent[Any]] = field(default_factory=list)
    due: list[Pending] = field(default_factory=list)  # to hand to the sender now
    deferred: list[Pending] = field(default_factory=list)  # waiting for quiet hours to end
    settled: list[str] = field(default_factory=list)  # message keys no longer pending
    dead_letters: list[DeadLetter] = field(default_factory=list)
    # Prometheus increments, made once the outcome is written: (counter, labels)
    counts: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)


Load = Callable[[str], SmsRecord | None]


def fold(load: Load, items: Sequence[Item], rules: Rules, now: datetime) -> Outcome:
    """Apply `items` in order; `load` gives a dossier's record as it was before the batch."""
    return _Fold(load, rules, now).run(items)


class _Fold:
    def __init__(self, load: Load, rules: Rules, now: datetime) -> None:
        self.load = load
        self.rules = rules
        self.now = now
        self.out = Outcome()
        self.before: dict[str, SmsRecord | None] = {}

    def run(self, items: Sequence[Item]) -> Outcome:
        for item in items:
            if isinstance(item, Input):
                self.on_input(item)
            elif isinstance(item, SettleBatch):
                for news in item.items:
                    self.on_settle(news)
            elif isinstance(item, Report):
                self.on_report(item)
            else:
                assert isinstance(item, Tick)
                self.on_tick(item)
        return self.out

    # --- records -----------------------------------------------------------------------------

    def record(self, dossier_id: str) -> SmsRecord | None:
        found = self.out.records.get(dossier_id)
        if found is not None:
            return found
        if dossier_id not in self.before:
            self.before[dossier_id] = self.load(dossier_id)
        return self.before[dossier_id]

    def save(self, record: SmsRecord, event_time: datetime | None = None) -> None:
        """Keep the changed `record`, stamped with the clock and the latest event time."""
        dossier_id = record.state.dossier_id
        event_at = record.event_at
        if event_time is not None and (event_at is None or event_time > event_at):
            event_at = event_time
        self.out.records[dossier_id] = replace(record, event_at=event_at, touched_at=self.now)
        self.out.retired.discard(dossier_id)

    def retire(self, dossier_id: str) -> None:
        self.out.records.pop(dossier_id, None)
        self.before[dossier_id] = None  # a later item of the batch finds no record
        self.out.retired.add(dossier_id)

    # --- items -------------------------------------------------------------------------------

    def on_input(self, item: Input) -> None:
        record = self.record(item.dossier_id)
        if record is None and item.event.type == "dossier.overdue":
            return  # a retired (settled) dossier: no apology
        try:
            decision = apply(record.state if record else None, item.event, self.rules.policy)
        except InvalidEventError as exc:
            self.out.dead_letters.append(_poison(item, str(exc)))
            return
        before = record.state if record is not None else DossierState(dossier_id=item.dossier_id)
        if decision.state == before and not decision.outgoing:
            return  # nothing this service cares about
        poison = self.carry_out(
            record,
            decision,
            item.topic,
            item.origin.decode(errors="replace"),
            item.event.id,
            item.event.time,
        )
        if poison:
            self.out.dead_letters.append(_poison(item, "; ".join(poison)))

    def on_tick(self, item: Tick) -> None:
        record = self.record(item.dossier_id)
        if record is None:
            return
        decision = tick(record.state, self.now, self.rules.policy)
        origin = tick_body(item.dossier_id).decode()
        self.carry_out(record, decision, topics.DOSSIER_EVENTS, origin, event_id=None)
        current = self.record(item.dossier_id)
        if current is not None:
            moment = retire_at(current, self.rules.retirement)
            if moment is not None and moment <= self.now:
                self.retire(item.dossier_id)

    def on_settle(self, news: Settle) -> None:
        self.out.settled.append(news.key)
        record = self.record(news.dossier_id)
        if record is None:
            return
        new, _ = settle(
            record,
            news.key,
            template=news.template,
            segments=news.segments,
            provider=news.provider,
            status=news.status,
        )
        if new != record:
            self.save(new)

    def on_report(self, item: Report) -> None:
        report = item.report
        known = self.record(report.dossier_id)
        record = known or SmsRecord(state=DossierState(dossier_id=report.dossier_id))
        before = record.sent.get(report.reference)
        new, moved = settle(
            record,
            report.reference,
            template=before.template if before else "",
            segments=before.segments if before else 0,
            provider=item.provider,
            status=item.status,
        )
        if known is not None and new != known:
            self.save(new)  # a retired dossier's report is announced, not kept
        if moved is None or moved is DeliveryStatus.SENT:
            return  # a duplicate, or late or out-of-order news: nothing moves back
        entry = new.sent[report.reference]
        kind = sms_event_type(moved)
        if kind == "sms.delivered":
            self.out.counts.append(("delivered", (entry.template, item.provider)))
        else:
            self.out.counts.append(("failed", (entry.template, item.provider, moved.value)))
        self.out.events.append(
            sms_event(
                kind,
                key=report.reference,
                dossier_id=report.dossier_id,
                at=report.occurred_at or self.now,
                suffix=moved.value,
                template=entry.template or None,
                segments=entry.segments or None,
                provider=item.provider,
                reason=None if moved is DeliveryStatus.DELIVERED else moved.value,
                provider_status=report.status,
            )
        )

    # --- a decision's consequences -----------------------------------------------------------

    def carry_out(
        self,
        record: SmsRecord | None,
        decision: Decision,
        topic: str,
        origin: str,
        event_id: str | None,
        event_time: datetime | None = None,
    ) -> list[str]:
        """Plan the decision; returns why the deciding event itself is poison (if it is)."""
        rules, now, out = self.rules, self.now, self.out
        result = plan(
            record,
            decision,
            templates=rules.templates,
            opted_out=rules.opted_out,
            quiet=rules.quiet,
            now=now,
            source_topic=topic,
            origin=origin,
        )
        if result.record != record:  # else a redelivery: every message known already
            self.save(result.record, event_time)
        for suppressed in result.suppressed:
            out.counts.append(("suppressed", (suppressed.intent.template, suppressed.reason)))
            out.events.append(
                intent_event("sms.suppressed", suppressed.intent, suppressed.reason, now)
            )
        poison = []
        for intent, reason in result.unrenderable:
            out.counts.append(("failed", (intent.template, "none", "render")))
            out.events.append(intent_event("sms.failed", intent, reason, now))
            if intent.event_id == event_id:
                poison.append(reason)
            else:  # decided earlier (waiting for the phone number): dead-letter that intent
                out.dead_letters.append(_unrenderable_intent(intent, reason))
        for message in result.queued:
            if message.not_before > now:  # only a message that waits is announced as queued
                out.events.append(queued_event(message, now))
                out.deferred.append(message)
            else:
                out.due.append(message)
        return poison


def _poison(item: Input, reason: str) -> DeadLetter:
    return DeadLetter(topics.dlq(item.topic), item.key, item.origin, PoisonMessage(reason))


def _unrenderable_intent(intent: SmsIntent, reason: str) -> DeadLetter:
    prefix = intent.template.split("_", 1)[0]
    topic = {"payment": topics.PAYMENT_EVENTS, "postal": topics.POSTAL_EVENTS}.get(
        prefix, topics.DOSSIER_EVENTS
    )
    body = {
        "source": intent.source,
        "id": intent.event_id,
        "dossier_id": intent.dossier_id,
        "template": intent.template,
    }
    return DeadLetter(
        topics.dlq(topic), intent.dossier_id.encode(), orjson.dumps(body), SmsNotSent(reason)
    )
