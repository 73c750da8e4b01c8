"""The audit event builder (CONTRACT section 8): who did what to which target, how it ended, when;
the same request gives the same event id; nothing else fits in it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest

from services.common.audit import AuditRecorder, audit_event, audit_event_id, command_operator
from services.common.events import (
    DATA_MODELS,
    AuditAction,
    AuditData,
    InvalidEvent,
    audit_type,
    parse_event,
    topic_of,
)
from services.common.operators import Operator, Role
from services.common.topics import (
    AUDIT_EVENTS,
    AUDIT_RETENTION_MS,
    declared_topics,
    dlq,
)
from services.metrics.codec import decode_state

AT = datetime(2026, 11, 26, 9, 30, tzinfo=timezone(timedelta(hours=7)))
ADMIN = Operator(sub="op-7f3a", roles=frozenset({Role.ADMIN, Role.VIEWER}))
SOURCE = "motcua/payments"


def replay_event(**overrides: Any) -> Any:
    arguments: dict[str, Any] = {
        "request_id": "req-1",
        "at": AT,
        "source": SOURCE,
    }
    arguments.update(overrides)
    return audit_event(
        ADMIN, AuditAction.DEAD_LETTER_REPLAY, "payment.events", "succeeded", **arguments
    )


def test_the_event_says_who_did_what_to_which_target_how_it_ended_and_when() -> None:
    event = replay_event()
    assert event.type == "audit.dead_letter_replay"
    assert event.topic == AUDIT_EVENTS == "audit.events"
    assert event.source == SOURCE
    assert event.subject == "payment.events" and event.key == b"payment.events"
    assert event.time == AT
    assert event.to_dict()["data"] == {
        "actor": "op-7f3a",
        "roles": ["viewer", "admin"],
        "action": "dead_letter_replay",
        "target": "payment.events",
        "outcome": "succeeded",
        "at": "2026-11-26T09:30:00+07:00",
    }


def test_the_same_request_gives_the_same_id_and_anything_else_another() -> None:
    first = replay_event()
    assert replay_event().id == first.id
    assert replay_event(at=AT + timedelta(seconds=5)).id == first.id  # a retry, later
    others = {
        replay_event(request_id="req-2").id,
        audit_event(ADMIN, AuditAction.DEAD_LETTER_REPLAY, "sms.events", "succeeded",
                    request_id="req-1", at=AT, source=SOURCE).id,
        audit_event(ADMIN, AuditAction.DEAD_LETTER_REPLAY, "payment.events", "failed",
                    request_id="req-1", at=AT, source=SOURCE).id,
        audit_event(ADMIN, AuditAction.RECONCILIATION_RUN, "payment.events", "succeeded",
                    request_id="req-1", at=AT, source=SOURCE).id,
        audit_event(Operator(sub="op-other", roles=frozenset({Role.ADMIN})),
                    AuditAction.DEAD_LETTER_REPLAY, "payment.events", "succeeded",
                    request_id="req-1", at=AT, source=SOURCE).id,
    }  # fmt: skip
    assert first.id not in others and len(others) == 5
    assert first.id == audit_event_id(
        ADMIN, AuditAction.DEAD_LETTER_REPLAY, "payment.events", "succeeded", "req-1"
    )


def test_the_event_round_trips_through_the_wire_format() -> None:
    event = replay_event()
    again = parse_event(orjson.loads(event.to_json()))
    assert again == event
    assert isinstance(again.data, AuditData)


def test_every_action_is_an_audit_type_on_the_audit_topic() -> None:
    for action in AuditAction:
        assert DATA_MODELS[audit_type(action)] is AuditData
        assert topic_of(audit_type(action)) == "audit.events"
        event = audit_event(
            ADMIN, action, "D-1", "denied", request_id="r", at=AT.astimezone(UTC), source=SOURCE
        )
        assert event.data.action == action


def wire(**data: Any) -> dict[str, Any]:
    body = {
        "actor": "op-7f3a",
        "roles": ["admin"],
        "action": "refund",
        "target": "D-1",
        "outcome": "succeeded",
        "at": "2026-11-26T09:30:00+07:00",
        **data,
    }
    return {
        "specversion": "1.0",
        "id": "audit-1",
        "source": SOURCE,
        "type": "audit.refund",
        "subject": "D-1",
        "time": "2026-11-26T09:30:00+07:00",
        "data": body,
    }


def pointers(value: dict[str, Any]) -> set[str]:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(value)
    return {error.pointer for error in caught.value.errors}


def test_no_field_beyond_the_contract_fits_so_no_personal_data_does() -> None:
    assert parse_event(wire()).data.target == "D-1"
    assert "/data/applicant_name" in pointers(wire(applicant_name="Nguyễn Thị B"))
    assert "/data/phone" in pointers(wire(phone="0905123456"))


@pytest.mark.parametrize(
    ("data", "pointer"),
    [
        ({"actor": ""}, "/data/actor"),
        ({"roles": ["auditor"]}, "/data/roles/0"),
        ({"outcome": "maybe"}, "/data/outcome"),
        ({"at": "2026-11-26T09:30:00"}, "/data/at"),
        ({"target": "D-2"}, "/subject"),
        ({"action": "dead_letter_replay"}, "/data/action"),
    ],
)
def test_a_malformed_audit_event_names_its_field(data: dict[str, Any], pointer: str) -> None:
    assert pointer in pointers(wire(**data))


def test_the_audit_topic_is_declared_with_long_retention_and_no_dead_letter_twin() -> None:
    specs = {spec.name: spec for spec in declared_topics(12)}
    audit = specs["audit.events"]
    assert audit.retention_ms == AUDIT_RETENTION_MS >= 365 * 24 * 3600 * 1000
    assert not audit.compacted and audit.partitions == 12
    assert dlq("audit.events") not in specs


def test_metrics_state_written_before_the_audit_types_decodes_the_same() -> None:
    """The metrics changelog stores event types as small numbers; new types must not move them."""
    record = orjson.dumps(
        [1, [["portal/test", "e-1", 6, "2019-03-04T08:15:00+07:00", "000.00.12.H34", 150000]]]
    )
    state = decode_state("D-1", record)
    assert [fact.type for fact in state.facts] == ["dossier.submitted"]


class Broker:
    """What the recorder publishes to; `away` makes every publish fail as a broker away does."""

    def __init__(self) -> None:
        self.outcomes: list[str] = []
        self.away = False

    async def publish(self, messages: Any) -> list[Any]:
        if self.away:
            raise ConnectionError("broker away")
        self.outcomes += [orjson.loads(value)["data"]["outcome"] for _, _, value in messages]
        return []


async def test_an_audited_change_is_recorded_after_it_is_written_or_failed_when_it_is_not() -> None:
    broker = Broker()
    recorder = AuditRecorder(broker, SOURCE)
    written: list[str] = []

    async def write() -> None:
        written.append("change")

    args = (ADMIN, AuditAction.PORTAL_KEY_ADD, "portal/a")
    await recorder.audited(*args, write, request_id="r1", errors=(ConnectionError,))
    assert written == ["change"] and broker.outcomes == ["succeeded"]

    async def away() -> None:
        raise ConnectionError("broker away")

    with pytest.raises(ConnectionError):
        await recorder.audited(*args, away, request_id="r2", errors=(ConnectionError,))
    assert broker.outcomes == ["succeeded", "failed"]

    # written, then the broker goes: the change stands and nothing is raised (it is logged)
    async def write_then_away() -> None:
        written.append("change")
        broker.away = True

    await recorder.audited(*args, write_then_away, request_id="r3", errors=(ConnectionError,))
    assert written == ["change", "change"] and broker.outcomes == ["succeeded", "failed"]


def test_a_command_line_action_is_the_os_user_without_a_role(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    operator = command_operator("ops-nguyen")
    assert (operator.sub, operator.roles) == ("cli/ops-nguyen", frozenset())
    event = audit_event(
        operator,
        AuditAction.DEAD_LETTER_REPLAY,
        "payment.events",
        "succeeded",
        request_id="run-1",
        at=AT,
        source="motcua/cli",
    )
    assert (event.data.actor, event.data.roles) == ("cli/ops-nguyen", [])
    parse_event(orjson.loads(event.to_json()))  # an event the model accepts

    def nameless() -> str:
        raise OSError("no user name for this uid")

    monkeypatch.setattr("getpass.getuser", nameless)
    assert command_operator().sub.startswith("cli/uid-")
