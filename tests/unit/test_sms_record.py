"""The table record: deferral past quiet hours is kept in the record (so it survives a restart),
redelivered events add nothing, and delivery news only moves a message forward."""

from __future__ import annotations

from datetime import datetime, time, timedelta, timezone

from services.sms.decisions import DossierState, Event, apply
from services.sms.delivery import DeliveryStatus
from services.sms.quiet import QuietHours
from services.sms.record import SmsRecord, decode_record, encode_record, plan, settle
from services.sms.templates import load_templates

ICT = timezone(timedelta(hours=7))
DOSSIER = "000.00.12.H34-190304-0001"
TEMPLATES = load_templates()


def event(type_: str, data: dict[str, object], event_id: str) -> Event:
    return Event(
        type=type_,
        source="portal/test",
        id=event_id,
        time=datetime(2019, 3, 4, 8, 15, tzinfo=ICT),
        data={"dossier_id": DOSSIER, **data},
    )


SUBMITTED = event(
    "dossier.submitted", {"applicant": {"phone": "0905123456"}, "postal": {"mode": "none"}}, "e1"
)
RECEIVED = event(
    "dossier.received",
    {"receipt_no": "H34-1", "due_at": "2019-03-11T17:00:00+07:00"},
    "e2",
)


def planned(record: SmsRecord | None, ev: Event, now: datetime) -> tuple[SmsRecord, int]:
    decision = apply(record.state if record else None, ev)
    result = plan(
        record,
        decision,
        templates=TEMPLATES,
        opted_out=frozenset(),
        quiet=QuietHours(),
        now=now,
        source_topic="dossier.events",
        origin="{}",
    )
    return result.record, len(result.queued)


def test_a_message_decided_at_night_waits_in_the_record_until_seven() -> None:
    night = datetime(2019, 3, 4, 23, 30, tzinfo=ICT)
    record, _ = planned(None, SUBMITTED, night)
    record, queued = planned(record, RECEIVED, night)
    assert queued == 1
    [pending] = record.pending.values()
    assert pending.not_before == datetime(2019, 3, 5, 7, 0, tzinfo=ICT)
    # What the faust table stores brings it back intact after a restart.
    assert decode_record(encode_record(record)) == record


def test_quiet_hours_turned_off_when_start_equals_end() -> None:
    off = QuietHours(start=time(0, 0), end=time(0, 0))
    assert not off.contains(datetime(2019, 3, 4, 23, 30, tzinfo=ICT))


def test_a_redelivered_event_queues_nothing_new() -> None:
    now = datetime(2019, 3, 4, 9, 0, tzinfo=ICT)
    record, _ = planned(None, SUBMITTED, now)
    record, first = planned(record, RECEIVED, now)
    record, again = planned(record, RECEIVED, now)
    assert (first, again) == (1, 0)
    [key] = record.pending
    record, _ = settle(
        record,
        key,
        template="dossier_received",
        segments=1,
        provider="p",
        status=DeliveryStatus.SENT,
    )
    record, again = planned(record, RECEIVED, now)
    assert again == 0 and not record.pending


def test_delivered_never_moves_back() -> None:
    record = SmsRecord(state=DossierState(dossier_id=DOSSIER))
    moves = []
    for status in (
        DeliveryStatus.DELIVERED,  # the report overtook our own sms.sent
        DeliveryStatus.SENT,
        DeliveryStatus.TEMPORARY_FAILURE,
        DeliveryStatus.DELIVERED,
    ):
        record, moved = settle(
            record, "k", template="t", segments=1, provider="primary", status=status
        )
        moves.append(moved)
    assert moves == [DeliveryStatus.DELIVERED, None, None, None]
    assert record.sent["k"].status is DeliveryStatus.DELIVERED
