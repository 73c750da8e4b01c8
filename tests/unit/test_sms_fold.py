"""A poll folded into the records (`services.sms.fold.fold`): one record per dossier changed,
redeliveries add nothing, poison is dead-lettered alone, news only moves a message forward."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta, timezone

import orjson
import pytest

from services.common.dead_letters import PoisonMessage
from services.sms.decisions import DEFAULT_POLICY, Event
from services.sms.delivery import DeliveryStatus
from services.sms.fold import Outcome, Rules, fold
from services.sms.inbox import (
    DeliveryReport,
    Input,
    Item,
    Report,
    Settle,
    SettleBatch,
    decode_callback,
    settle_body,
)
from services.sms.quiet import QuietHours
from services.sms.record import SmsRecord
from services.sms.templates import load_templates

ICT = timezone(timedelta(hours=7))
NOON = datetime(2026, 11, 25, 5, 0, tzinfo=UTC)  # 12:00 in Vietnam: no quiet hours
NO_QUIET = QuietHours(start=time(0, 0), end=time(0, 0))
RULES = Rules(load_templates(), frozenset(), NO_QUIET, DEFAULT_POLICY)


def event(dossier: str, type_: str, data: dict[str, object], event_id: str) -> Input:
    topic = f"{type_.split('.', 1)[0]}.events"
    value = Event(
        type=type_,
        source="portal/test",
        id=event_id,
        time=datetime(2026, 11, 25, 8, 15, tzinfo=ICT),
        data={"dossier_id": dossier, **data},
    )
    return Input(topic, value, dossier.encode(), orjson.dumps({"id": event_id}))


def lifecycle(dossier: str) -> list[Item]:
    return [
        event(
            dossier,
            "dossier.submitted",
            {"applicant": {"phone": "0905123456"}, "postal": {"mode": "none"}},
            f"{dossier}-s",
        ),
        event(
            dossier,
            "dossier.received",
            {"receipt_no": "H34-1", "due_at": "2026-12-01T17:00:00+07:00"},
            f"{dossier}-r",
        ),
    ]


class Records:
    """The worker's view: what the last outcome wrote."""

    def __init__(self) -> None:
        self.by_dossier: dict[str, SmsRecord] = {}

    def load(self, dossier_id: str) -> SmsRecord | None:
        return self.by_dossier.get(dossier_id)

    def fold(self, items: list[Item], rules: Rules = RULES, now: datetime = NOON) -> Outcome:
        outcome = fold(self.load, items, rules, now)
        self.by_dossier.update(outcome.records)
        return outcome


def test_a_dossiers_events_make_one_record_and_a_redelivery_adds_nothing() -> None:
    records = Records()
    first = records.fold(lifecycle("D-1") + lifecycle("D-2"))
    assert set(first.records) == {"D-1", "D-2"}
    assert [m.dossier_id for m in first.due] == ["D-1", "D-2"]
    assert first.events == [] and first.dead_letters == []  # sent at once: nothing queued
    again = records.fold(lifecycle("D-1"))
    assert again.due == [] and again.records == {}


def test_settle_news_takes_a_message_out_of_pending_and_reports_only_move_forward() -> None:
    records = Records()
    [message] = records.fold(lifecycle("D-1")).due
    news = Settle(
        "D-1", message.key, message.template, message.segments, "primary", DeliveryStatus.SENT
    )
    settled = records.fold([decode_callback(settle_body([news]))])
    assert settled.settled == [message.key]
    record = records.by_dossier["D-1"]
    assert record.pending == {} and record.sent[message.key].status is DeliveryStatus.SENT

    def report(status: str, event_id: str) -> Report:
        body = {
            "event_id": event_id,
            "reference": message.key,
            "dossier_id": "D-1",
            "status": status,
        }
        return Report("primary", DeliveryReport.model_validate(body), DeliveryStatus(status))

    delivered = records.fold([report("delivered", "r1")])
    assert [e.type for e in delivered.events] == ["sms.delivered"]
    assert delivered.counts == [("delivered", (message.template, "primary"))]
    stale = records.fold([report("sent", "r2"), report("delivered", "r1")])
    assert stale.events == [] and stale.records == {}
    assert records.by_dossier["D-1"].sent[message.key].status is DeliveryStatus.DELIVERED


def test_a_poison_event_is_dead_lettered_alone_and_the_others_go_on() -> None:
    records = Records()
    no_link = event("D-1", "payment.requested", {"amount_vnd": 1}, "p1")
    bad_amount = event("D-3", "payment.succeeded", {"amount_vnd": "lots"}, "p2")
    outcome = records.fold([*lifecycle("D-1"), no_link, bad_amount, *lifecycle("D-2")])
    assert [m.dossier_id for m in outcome.due] == ["D-1", "D-2"]
    topics = [(d.topic, type(d.error)) for d in outcome.dead_letters]
    assert topics == [
        ("payment.events.dlq", PoisonMessage),
        ("payment.events.dlq", PoisonMessage),
    ]
    assert "payment_url" in str(outcome.dead_letters[0].error)
    assert outcome.dead_letters[0].value == no_link.origin
    assert [e.type for e in outcome.events] == ["sms.failed"]
    assert "D-3" not in outcome.records  # badly typed data changes nothing


def test_inside_quiet_hours_a_message_waits_and_is_announced_as_queued() -> None:
    records = Records()
    always_quiet = Rules(
        RULES.templates, frozenset(), QuietHours(time(0, 0), time(23, 59)), RULES.policy
    )
    outcome = records.fold(lifecycle("D-1"), rules=always_quiet)
    assert outcome.due == [] and len(outcome.deferred) == 1
    assert [e.type for e in outcome.events] == ["sms.queued"]
    assert records.by_dossier["D-1"].pending  # kept in the record: survives a restart


@pytest.mark.parametrize(
    "raw", [b"not json", b'{"kind": "other"}', b'{"kind": "report", "event_id": ""}', b"[]"]
)
def test_a_callback_that_is_not_one_is_poison(raw: bytes) -> None:
    with pytest.raises(PoisonMessage):
        decode_callback(raw)


def test_settle_batches_read_back_as_written() -> None:
    items = [Settle("D-1", "k1", "dossier_received", 1, None, DeliveryStatus.PERMANENT_FAILURE)]
    decoded = decode_callback(settle_body(items))
    assert isinstance(decoded, SettleBatch) and list(decoded.items) == items
