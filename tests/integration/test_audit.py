"""The audit trail against the real broker: the recorder publishes (acks=all) one event per
action on `audit.events`, and `motcua audit` prints the recent ones."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import orjson

from services.common.audit import AuditRecorder
from services.common.events import AuditAction, parse_event
from services.common.kafka import DurablePublisher, ensure_topics
from services.common.operators import Operator, Role
from services.common.topics import declared_topics
from services.dev.embedded import Broker
from tests.support.kafka import read_all

ADMIN = Operator(sub="op-admin", roles=frozenset({Role.ADMIN}))
FINANCE = Operator(sub="op-finance", roles=frozenset({Role.FINANCE}), agencies=frozenset({"STP"}))
START = datetime(2026, 11, 26, 2, 0, tzinfo=UTC)


def ticking_clock() -> Callable[[], datetime]:
    """A clock one minute further on every call: the actions' order is their `at` order."""
    moments = (START + timedelta(minutes=n) for n in range(1000))
    return lambda: next(moments)


def motcua_audit(bootstrap: str, *args: str) -> list[list[str]]:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "audit", *args],
        env={**os.environ, "KAFKA_BOOTSTRAP": bootstrap},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return [line.split("\t") for line in done.stdout.splitlines()]


def test_one_event_per_action_and_motcua_audit_lists_the_recent_ones(broker: Broker) -> None:
    async def record_actions() -> None:
        await ensure_topics(broker.bootstrap, declared_topics(2))
        publisher = DurablePublisher(broker.bootstrap)
        recorder = AuditRecorder(publisher, "motcua/payments", clock=ticking_clock())
        try:
            await recorder.record(
                ADMIN,
                AuditAction.DEAD_LETTER_REPLAY,
                "payment.events",
                "succeeded",
                request_id="r-1",
            )
            await recorder.record(FINANCE, AuditAction.REFUND, "D-1", "denied", request_id="r-2")
            await recorder.record(
                ADMIN,
                AuditAction.RECONCILIATION_RUN,
                "vnpay/2026-11-25",
                "failed",
                request_id="r-3",
            )
            await recorder.record(ADMIN, AuditAction.REFUND, "D-2", "succeeded", request_id="r-4")
            # the same request again (a client's retry): the same event, recorded once more
            await recorder.record(ADMIN, AuditAction.REFUND, "D-2", "succeeded", request_id="r-4")
        finally:
            await publisher.close()

    asyncio.run(record_actions())

    records = asyncio.run(read_all(broker.bootstrap, "audit.events", expect=5))
    assert len(records) == 5
    events = [parse_event(orjson.loads(record.value)) for record in records]
    assert sorted(event.type for event in events) == [
        "audit.dead_letter_replay",
        "audit.reconciliation_run",
        "audit.refund",
        "audit.refund",
        "audit.refund",
    ]
    assert len({event.id for event in events}) == 4  # the retry has the id of its first record
    assert all(
        record.key == event.subject.encode() for record, event in zip(records, events, strict=True)
    )
    denied = next(event for event in events if event.data.outcome == "denied")
    assert denied.to_dict()["data"] == {
        "actor": "op-finance",
        "roles": ["finance"],
        "action": "refund",
        "target": "D-1",
        "outcome": "denied",
        "at": "2026-11-26T02:01:00Z",
    }

    assert motcua_audit(broker.bootstrap) == [
        ["2026-11-26T02:00:00+00:00", "dead_letter_replay", "succeeded", "op-admin", "admin",
         "payment.events"],
        ["2026-11-26T02:01:00+00:00", "refund", "denied", "op-finance", "finance", "D-1"],
        ["2026-11-26T02:02:00+00:00", "reconciliation_run", "failed", "op-admin", "admin",
         "vnpay/2026-11-25"],
        ["2026-11-26T02:03:00+00:00", "refund", "succeeded", "op-admin", "admin", "D-2"],
    ]  # fmt: skip
    recent = motcua_audit(broker.bootstrap, "--limit", "2")
    assert [(row[0], row[1], row[5]) for row in recent] == [
        ("2026-11-26T02:02:00+00:00", "reconciliation_run", "vnpay/2026-11-25"),
        ("2026-11-26T02:03:00+00:00", "refund", "D-2"),
    ]
    refunds = motcua_audit(broker.bootstrap, "--action", "refund")
    assert [(row[2], row[5]) for row in refunds] == [("denied", "D-1"), ("succeeded", "D-2")]
    last_refund = motcua_audit(broker.bootstrap, "--action", "refund", "--limit", "1")
    assert [(row[2], row[5]) for row in last_refund] == [("succeeded", "D-2")]


def test_motcua_audit_refuses_an_unknown_action(broker: Broker) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "audit", "--action", "teleport"],
        env={**os.environ, "KAFKA_BOOTSTRAP": broker.bootstrap},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2
    assert "unknown action 'teleport'" in done.stderr
