"""`motcua dlq-replay` against the real broker: dead letters go back once, nothing is lost."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

from aiokafka import AIOKafkaConsumer

from services.common.dlq import REPLAYED_HEADER, replay_dead_letters
from services.common.kafka import ensure_topics
from services.common.topics import declared_topics
from services.dev.embedded import Broker
from tests.support.kafka import produce

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


def test_the_command_reports_by_error_type(broker: Broker) -> None:
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(2)))
    asyncio.run(dead_letter(broker.bootstrap, 2, "ValueError", topic="postal.events"))
    done = subprocess.run(
        [sys.executable, "-m", "services.cli", "dlq-replay", "postal.events", "--dry-run"],
        env={**os.environ, "KAFKA_BOOTSTRAP": broker.bootstrap},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "ValueError\t2" in done.stdout
    assert "postal.events.dlq: 2 dead letters, would copy 2" in done.stdout
