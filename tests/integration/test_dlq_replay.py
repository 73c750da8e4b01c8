"""`motcua dlq-replay` against the real broker: dead letters go back once, nothing is lost, and a
replay (not a dry run) is one `audit.dead_letter_replay` of `cli/<OS user>`."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from aiokafka import AIOKafkaConsumer

from services.common.audit import command_operator
from services.common.command_audit import CLI_SOURCE
from services.common.dlq import REPLAYED_HEADER, replay_dead_letters
from services.common.kafka import ensure_topics
from services.common.topics import declared_topics
from services.dev.embedded import Broker
from tests.support.kafka import audit_events_of, produce

TOPIC = "payment.events"


async def dead_letter(
    bootstrap: str, n: int, error_type: str, start: int = 0, topic: str = TOPIC
) -> None:
    await produce(
        bootstrap,
        f"{topic}.dlq",
        [(f"D-{i}".encode(), f'{{"n": {i}}}'.encode()) for i in range(start, start + n)],
        headers=[("error_type", error_type.encode()), ("attempts", b"3")],
    )


async def on_topic(bootstrap: str) -> list[tuple[bytes, bytes, dict[str, bytes]]]:
    consumer = AIOKafkaConsumer(TOPIC, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        batch = await consumer.getmany(timeout_ms=3000)
        return [(r.key, r.value, dict(r.headers)) for rs in batch.values() for r in rs]
    finally:
        await consumer.stop()


def test_dead_letters_go_back_once_and_a_dry_run_changes_nothing(broker: Broker) -> None:
    async def scenario() -> None:
        await ensure_topics(broker.bootstrap, declared_topics(2))
        await dead_letter(broker.bootstrap, 3, "InvalidEvent")
        await dead_letter(broker.bootstrap, 2, "TimeoutError", start=3)

        dry = await replay_dead_letters(broker.bootstrap, TOPIC, dry_run=True, idle_seconds=1.0)
        assert dry.found == 5 and dry.copied == 0
        assert dry.by_error_type == {"InvalidEvent": 3, "TimeoutError": 2}
        assert await on_topic(broker.bootstrap) == []

        first = await replay_dead_letters(broker.bootstrap, TOPIC, limit=4, idle_seconds=1.0)
        rest = await replay_dead_letters(broker.bootstrap, TOPIC, idle_seconds=1.0)
        again = await replay_dead_letters(broker.bootstrap, TOPIC, idle_seconds=1.0)
        assert (first.copied, rest.copied, again.copied) == (4, 1, 0)

        copies = await on_topic(broker.bootstrap)
        assert sorted((k, v) for k, v, _ in copies) == [
            (f"D-{i}".encode(), f'{{"n": {i}}}'.encode()) for i in range(5)
        ]
        assert all(h == {REPLAYED_HEADER: f"{TOPIC}.dlq".encode()} for _, _, h in copies)

    asyncio.run(scenario())


def dlq_replay(bootstrap: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "dlq-replay", *args],
        env={**os.environ, "KAFKA_BOOTSTRAP": bootstrap},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )


def test_the_command_reports_by_error_type_and_audits_a_replay(broker: Broker) -> None:
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(2)))
    asyncio.run(dead_letter(broker.bootstrap, 2, "ValueError", topic="postal.events"))
    done = dlq_replay(broker.bootstrap, "postal.events", "--dry-run")
    assert "ValueError\t2" in done.stdout
    assert "postal.events.dlq: 2 dead letters, would copy 2" in done.stdout
    # a dry run changes nothing: no audit event
    assert asyncio.run(audit_events_of(broker.bootstrap, CLI_SOURCE, timeout=3)) == []

    replayed = dlq_replay(broker.bootstrap, "postal.events")
    assert "postal.events.dlq: 2 dead letters, copied 2" in replayed.stdout
    [event] = asyncio.run(audit_events_of(broker.bootstrap, CLI_SOURCE))
    assert (event["type"], event["subject"]) == ("audit.dead_letter_replay", "postal.events")
    assert {**event["data"], "at": "-"} == {
        "actor": command_operator().sub,  # cli/<OS user>: no token, so no role
        "roles": [],
        "action": "dead_letter_replay",
        "target": "postal.events",
        "outcome": "succeeded",
        "at": "-",
    }
