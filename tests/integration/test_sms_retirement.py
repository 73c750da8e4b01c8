"""SMS records leave once their story is over: the real broker, the real Redis, a sandbox gateway
over loopback HTTP sending delivery reports, and the worker as a real process (graces of
seconds). A settled dossier whose messages are delivered is tombstoned in the changelog and
counted; a restarted worker does not hold it; its late events send nothing twice."""

from __future__ import annotations

import asyncio
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from services.common import topics
from services.common.kafka import ensure_topics
from services.common.topics import declared_topics
from services.dev.embedded import Broker, free_port
from services.sms.decisions import idempotency_key
from tests.conftest import service_env
from tests.support.factories import envelope, submitted
from tests.support.kafka import read_all
from tests.support.processes import motcua, process, until, wait_http
from tests.support.prometheus import metric_total

pytestmark = pytest.mark.integration

SECRET = "test-sms-secret"


class Sms:
    def __init__(self, env: dict[str, str], port: int, gateway: str) -> None:
        self.env = env
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.gateway = gateway

    def figure(self, name: str, **labels: str) -> float:
        return metric_total(self.url, name, **labels)

    def references(self) -> list[str]:
        accepted = httpx.get(f"{self.gateway}/v1/messages", timeout=10).json()["accepted"]
        return [m["reference"] for m in accepted]


@pytest.fixture(scope="module")
def sms(broker: Broker, redis_url: str) -> Iterator[Sms]:
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    namespace = f"motcua-test-sms-retire-{uuid.uuid4().hex[:10]}"
    port, gateway_port = free_port(), free_port()
    env = service_env(
        broker,
        redis_url,
        namespace,
        SMS_PORT=str(port),
        SMS_PUBLIC_URL=f"http://127.0.0.1:{port}",
        SMS_PRIMARY_URL=f"http://127.0.0.1:{gateway_port}",
        SMS_PRIMARY_SANDBOX_PORT=str(gateway_port),
        SMS_SECRETS=SECRET,
        SMS_WEIGHTS='{"primary": 100}',
        SMS_SANDBOX_REPORT_DELAY_MS="50",
        MOTCUA_DATA_DIR=tempfile.mkdtemp(prefix="motcua-sms-retire-"),
        SMS_QUIET_START="00:00",
        SMS_QUIET_END="00:00",
        SMS_PER_NUMBER_RATE="1000",
        SMS_PER_NUMBER_BURST="1000",
        SMS_TIMER_SECONDS="0.3",
        SMS_OVERDUE_GRACE_SECONDS="0",  # an apology, were one decided, would go at once
        SMS_RETIRE_AFTER_SECONDS="2",
        SMS_RETIRE_IDLE_SECONDS="1",
        SMS_RETIRE_REPORT_WAIT_SECONDS="2",
    )
    with process(["services.cli", "run", "sms-primary-sandbox"], env, "sms-retire-sandbox"):
        gateway = f"http://127.0.0.1:{gateway_port}"
        wait_http(f"{gateway}/healthz", timeout=30)
        yield Sms(env, port, gateway)


def worker(sms: Sms) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """The SMS worker as a process, ready (its records restored) on entry."""
    return motcua("sms", sms.env, sms.port, log_name="sms-retire-worker")


async def produce(bootstrap: str, events: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for event in events:
            await producer.send_and_wait(
                "dossier.events", orjson.dumps(event), key=event["subject"].encode()
            )
    finally:
        await producer.stop()


def tombstoned(bootstrap: str, dossier: str) -> bool:
    records = asyncio.run(read_all(bootstrap, topics.SMS_STATE_CHANGELOG, idle=0.5, timeout=10))
    mine = [r for r in records if r.key == dossier.encode()]
    return bool(mine) and mine[-1].value is None


def test_a_settled_dossier_leaves_and_its_late_events_send_nothing_twice(
    sms: Sms, broker: Broker
) -> None:
    dossier = "000.00.12.H34-261126-0001"
    still_open = "000.00.12.H34-261126-0002"  # submitted only: it stays
    now = datetime.now(UTC).isoformat()
    story = [
        submitted(dossier, time=now),
        envelope(
            "dossier.received",
            dossier,
            {"received_at": now, "due_at": now, "receipt_no": "H34-R-1"},
            time=now,
        ),
        envelope(
            "dossier.resolved", dossier, {"resolved_at": now, "outcome": "approved"}, time=now
        ),
    ]
    keys = {
        idempotency_key("portal/test", story[1]["id"], "dossier_received"),
        idempotency_key("portal/test", story[2]["id"], "result_ready_at_desk"),
    }
    with worker(sms):
        asyncio.run(produce(broker.bootstrap, [submitted(still_open, time=now), *story]))
        until(lambda: keys <= set(sms.references()), "both messages accepted")
        # Delivered, then both graces over: the record leaves, its tombstone written.
        until(lambda: sms.figure("motcua_states_retired_total", service="sms") >= 1, "retired")
        assert sms.figure("motcua_states_live", service="sms") == 1  # the open one
        assert tombstoned(broker.bootstrap, dossier)

        # Late: the overdue detected before the resolution (no apology), and the whole story
        # again (the topic read from an old offset): its messages come back with their first
        # keys, the send claims say they went, and nothing reaches the gateway a second time.
        overdue = envelope(
            "dossier.overdue",
            dossier,
            {"due_at": now, "detected_at": now},
            source="motcua/metrics",
            time=now,
        )
        consumed = sms.figure("motcua_events_consumed_total", topic="dossier.events")
        asyncio.run(produce(broker.bootstrap, [overdue]))
        until(
            lambda: sms.figure("motcua_events_consumed_total", topic="dossier.events") > consumed,
            "the overdue read",
        )
        assert sms.figure("motcua_states_live", service="sms") == 1  # no record made for it
        asyncio.run(produce(broker.bootstrap, story))
        until(
            lambda: (
                sms.figure("motcua_events_consumed_total", topic="dossier.events") >= consumed + 4
            ),
            "the story read again",
        )
        # The record made again by the redelivery leaves in its turn.
        until(lambda: sms.figure("motcua_states_retired_total", service="sms") >= 2, "again")

    references = sms.references()
    assert sorted(references) == sorted(keys)  # each message once, no apology
    apologies = idempotency_key("motcua/metrics", overdue["id"], "overdue_apology")
    sms_events = asyncio.run(read_all(broker.bootstrap, "sms.events", idle=1.0, timeout=15))
    assert not [r for r in sms_events if apologies.encode() in (r.value or b"")]

    # A restarted worker restores the open dossier only.
    with worker(sms):
        assert sms.figure("motcua_states_live", service="sms") == 1
        assert tombstoned(broker.bootstrap, dossier)
