"""Retirement of SMS records: when a record's story is over (`record.retire_at`), the tick that
retires it (`fold`), and what a late event does for a retired dossier: no apology, no SMS (the
phone number left with the record), a delivery report announced but not kept."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta, timezone

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from services.sms.decisions import (
    DEFAULT_POLICY,
    Contact,
    DossierState,
    Event,
    PendingOverdue,
    SmsIntent,
)
from services.sms.delivery import FINAL_STATUSES, DeliveryStatus
from services.sms.fold import Outcome, Rules, fold
from services.sms.inbox import DeliveryReport, Input, Item, Report, Settle, SettleBatch, Tick
from services.sms.phones import normalise_phone
from services.sms.quiet import QuietHours
from services.sms.record import (
    Pending,
    Retirement,
    Sent,
    SmsRecord,
    decode_record,
    encode_record,
    retire_at,
)
from services.sms.settings import SmsSettings
from services.sms.templates import load_templates
from services.sms.worker import open_with_phone

ICT = timezone(timedelta(hours=7))
T0 = datetime(2026, 11, 25, 5, 0, tzinfo=UTC)  # noon in Vietnam
EVENT_TIME = datetime(2026, 11, 25, 8, 15, tzinfo=ICT)
RETIREMENT = Retirement(
    after=timedelta(days=1), idle=timedelta(hours=1), report_wait=timedelta(days=3)
)
NO_QUIET = QuietHours(start=time(0, 0), end=time(0, 0))
RULES = Rules(load_templates(), frozenset(), NO_QUIET, DEFAULT_POLICY, RETIREMENT)
D = "000.00.12.H34-261125-0001"


def event(type_: str, data: dict[str, object], event_id: str, at: datetime = EVENT_TIME) -> Input:
    topic = f"{type_.split('.', 1)[0]}.events"
    value = Event(
        type=type_, source="portal/test", id=event_id, time=at, data={"dossier_id": D, **data}
    )
    return Input(topic, value, D.encode(), orjson.dumps({"id": event_id}))


SUBMITTED = event(
    "dossier.submitted", {"applicant": {"phone": "0905123456"}, "postal": {"mode": "return"}}, "s"
)
RECEIVED = event(
    "dossier.received", {"receipt_no": "H34-1", "due_at": "2026-12-01T17:00:00+07:00"}, "r"
)
RESOLVED = event("dossier.resolved", {"resolved_at": "2026-11-26T09:00:00+07:00"}, "v")


class Worker:
    """The records as the worker keeps them: changed ones put, retired ones deleted."""

    def __init__(self) -> None:
        self.records: dict[str, SmsRecord] = {}

    def fold(self, items: list[Item], now: datetime) -> Outcome:
        outcome = fold(self.records.get, items, RULES, now)
        self.records.update(outcome.records)
        for dossier_id in outcome.retired:
            del self.records[dossier_id]
        return outcome

    def send_all(self, outcome: Outcome, now: datetime, status: DeliveryStatus) -> None:
        """The sender's news for every message due: accepted (or failed) by a provider."""
        news = [Settle(D, m.key, m.template, m.segments, "primary", status) for m in outcome.due]
        self.fold([SettleBatch(tuple(news))], now)


def report(key: str, status: DeliveryStatus, event_id: str) -> Report:
    body = {"event_id": event_id, "reference": key, "dossier_id": D, "status": status.value}
    return Report("primary", DeliveryReport.model_validate(body), status)


def settled_and_delivered() -> tuple[Worker, list[str], datetime]:
    """A dossier received and resolved, its two messages delivered; the moment it may leave."""
    worker = Worker()
    outcome = worker.fold([SUBMITTED, RECEIVED, RESOLVED], T0)
    keys = [m.key for m in outcome.due]
    assert len(keys) == 2
    worker.send_all(outcome, T0, DeliveryStatus.SENT)
    worker.fold([report(k, DeliveryStatus.DELIVERED, f"rep-{k}") for k in keys], T0)
    moment = retire_at(worker.records[D], RETIREMENT)
    assert moment == max(EVENT_TIME + RETIREMENT.after, T0 + RETIREMENT.idle)
    return worker, keys, moment


def test_a_settled_dossier_leaves_at_its_tick_once_both_graces_passed() -> None:
    worker, _, moment = settled_and_delivered()
    early = worker.fold([Tick(D)], moment - timedelta(seconds=1))
    assert early.retired == set() and D in worker.records
    on_time = worker.fold([Tick(D)], moment + timedelta(seconds=1))
    assert on_time.retired == {D} and on_time.records == {} and on_time.events == []
    assert D not in worker.records


def test_a_record_awaiting_a_delivery_report_waits_longer() -> None:
    worker = Worker()
    outcome = worker.fold([SUBMITTED, RECEIVED, RESOLVED], T0)
    worker.send_all(outcome, T0, DeliveryStatus.SENT)  # accepted, no final report
    moment = retire_at(worker.records[D], RETIREMENT)
    assert moment == T0 + RETIREMENT.report_wait
    assert worker.fold([Tick(D)], T0 + timedelta(days=2)).retired == set()
    assert worker.fold([Tick(D)], T0 + timedelta(days=3, seconds=1)).retired == {D}


def test_an_open_dossier_or_one_with_a_message_pending_never_leaves() -> None:
    worker = Worker()
    worker.fold([SUBMITTED, RECEIVED], T0)  # open: news will come
    assert retire_at(worker.records[D], RETIREMENT) is None
    assert worker.fold([Tick(D)], T0 + timedelta(days=400)).retired == set()
    worker.fold([RESOLVED], T0)  # settled, but its message is still with the sender
    assert worker.records[D].pending
    assert retire_at(worker.records[D], RETIREMENT) is None
    assert worker.fold([Tick(D)], T0 + timedelta(days=400)).retired == set()


def test_late_events_for_a_retired_dossier_send_nothing_and_leave_again() -> None:
    worker, keys, moment = settled_and_delivered()
    later = moment + timedelta(seconds=1)
    worker.fold([Tick(D)], later)
    assert D not in worker.records

    # The overdue detected before the resolution, read late: no apology, no record.
    overdue = event(
        "dossier.overdue",
        {"due_at": "2026-12-01T17:00:00+07:00", "detected_at": "2026-12-01T17:05:00+07:00"},
        "o",
    )
    nothing = worker.fold([overdue], later)
    assert nothing.records == {} and nothing.events == [] and nothing.due == []
    # An event that says nothing to the applicant keeps no record either.
    returned = event("dossier.result_returned", {"returned_at": "x", "via": "counter"}, "rr")
    assert worker.fold([returned], later).records == {}

    # A postal leg after retirement: the phone number left with the record, so the message
    # waits for one and is suppressed after the contact wait; nothing is sent.
    delivered = event("postal.delivered", {}, "pd", at=later)
    waiting = worker.fold([delivered], later)
    assert waiting.due == [] and waiting.deferred == []
    assert len(worker.records[D].state.awaiting_contact) == 1
    given_up = worker.fold([Tick(D)], later + DEFAULT_POLICY.contact_wait)
    assert given_up.due == []
    assert [(e.type, e.data.reason) for e in given_up.events] == [("sms.suppressed", "no_contact")]
    # No phone, nothing pending: that record leaves in its turn.
    again = retire_at(worker.records[D], RETIREMENT)
    assert again is not None
    assert worker.fold([Tick(D)], again + timedelta(seconds=1)).retired == {D}

    # The topic read again from the start: the messages come back with their first keys,
    # whose send claims in Redis stop a second send (see the integration test).
    replayed = worker.fold([SUBMITTED, RECEIVED, RESOLVED], later)
    assert sorted(m.key for m in replayed.due) == sorted(keys)


def test_a_late_delivery_report_is_announced_and_not_kept() -> None:
    worker, keys, moment = settled_and_delivered()
    worker.fold([Tick(D)], moment + timedelta(seconds=1))
    late = worker.fold([report(keys[0], DeliveryStatus.PERMANENT_FAILURE, "late")], moment)
    assert [e.type for e in late.events] == ["sms.failed"]
    assert late.events[0].id == f"{keys[0]}:permanent_failure"
    assert late.records == {} and D not in worker.records


def test_an_item_after_the_retiring_tick_in_the_same_poll_starts_afresh() -> None:
    worker, _, moment = settled_and_delivered()
    leg = event("postal.out_for_delivery", {}, "ofd", at=moment)
    outcome = worker.fold([Tick(D), leg], moment + timedelta(seconds=1))
    assert outcome.retired == set()  # the leg's record replaces the retired one
    assert outcome.records[D].state.contact is None
    assert len(outcome.records[D].state.awaiting_contact) == 1


def test_records_read_back_with_their_moments_and_old_ones_without() -> None:
    worker, _, _ = settled_and_delivered()
    record = worker.records[D]
    assert decode_record(encode_record(record)) == record
    older = orjson.loads(encode_record(record))
    del older["event_at"], older["touched_at"]
    old = decode_record(orjson.dumps(older))
    assert old.event_at is None and old.touched_at is None
    moment = retire_at(old, RETIREMENT)
    assert moment is not None and moment < T0  # written before they were kept: long ago


# --- every shape of record --------------------------------------------------------------------

MOMENTS = st.none() | st.integers(0, 1000).map(lambda h: T0 + timedelta(hours=h))
INTENT = SmsIntent(D, "dossier_received", (), "portal/test", "e", T0)
PENDING = Pending("k", D, "dossier_received", "+84905123456", "x", 1, False, T0, "t", "{}")


@given(
    settled=st.booleans(),
    has_contact=st.booleans(),
    pending=st.booleans(),
    overdue=st.booleans(),
    awaiting=st.booleans(),
    statuses=st.lists(st.sampled_from(list(DeliveryStatus)), max_size=3),
    event_at=MOMENTS,
    touched_at=MOMENTS,
)
def test_retire_at_for_every_shape(
    settled: bool,
    has_contact: bool,
    pending: bool,
    overdue: bool,
    awaiting: bool,
    statuses: list[DeliveryStatus],
    event_at: datetime | None,
    touched_at: datetime | None,
) -> None:
    state = DossierState(
        D,
        contact=Contact(normalise_phone("0905123456")) if has_contact else None,
        pending_overdue=PendingOverdue(INTENT, T0, T0) if overdue else None,
        awaiting_contact=(INTENT,) if awaiting else (),
        settled=settled,
    )
    record = SmsRecord(
        state,
        pending={"k": PENDING} if pending else {},
        sent={f"s{i}": Sent("t", 1, "primary", s) for i, s in enumerate(statuses)},
        event_at=event_at,
        touched_at=touched_at,
    )
    moment = retire_at(record, RETIREMENT)
    # the restore knows an open dossier's record by its bytes, and skips it
    assert open_with_phone(encode_record(record)) == (has_contact and not settled)
    something_to_do = pending or overdue or awaiting or (has_contact and not settled)
    assert (moment is None) is something_to_do
    if moment is None:
        return
    wait = RETIREMENT.idle
    if any(s not in FINAL_STATUSES for s in statuses):
        wait = RETIREMENT.report_wait
    if event_at is not None:
        assert moment >= event_at + RETIREMENT.after
    if touched_at is not None:
        assert moment >= touched_at + wait
    candidates = {e + RETIREMENT.after for e in [event_at] if e is not None}
    candidates |= {t + wait for t in [touched_at] if t is not None}
    assert moment in candidates or (not candidates and moment < T0)


def test_the_send_claims_must_outlive_the_event_time_grace() -> None:
    assert SmsSettings().retirement == Retirement(
        after=timedelta(days=21), idle=timedelta(hours=1), report_wait=timedelta(days=3)
    )
    with pytest.raises(ValidationError, match="SMS_CLAIM_TTL_SECONDS"):
        SmsSettings(retire_after_seconds=3600, claim_ttl_seconds=3600)
