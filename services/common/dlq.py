"""Putting dead letters back on their topic after a fix (`motcua dlq-replay`).

A dead letter keeps the original key and bytes; every effect in motcua is idempotent, so a
message put back is safe even if part of it had been applied. The copy reads `<topic>.dlq` in a
consumer group of its own and commits only after the broker acked the copies: a second run copies
only newer dead letters, and a crash mid-way copies some again (harmless) rather than losing any.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from services.common.kafka import DurablePublisher
from services.common.topics import dlq

REPLAYED_HEADER = "replayed_from"


@dataclass
class DeadLetters:
    """What a run found (and, unless it was a dry run, put back), by error type."""

    topic: str
    by_error_type: Counter[str] = field(default_factory=Counter)
    copied: int = 0

    @property
    def found(self) -> int:
        return sum(self.by_error_type.values())


def replay_group(topic: str) -> str:
    return f"motcua-dlq-replay-{topic}"


async def replay_dead_letters(
    bootstrap: str,
    topic: str,
    *,
    dry_run: bool = False,
    limit: int | None = None,
    idle_seconds: float = 2.0,
) -> DeadLetters:
    """Copy the dead letters of `topic` not copied before back onto `topic` (at most `limit`);
    with `dry_run`, only count them by error type."""
    result = DeadLetters(topic)
    # Assigned, not subscribed: offsets are still committed under the group, without the
    # seconds a group join (and the previous member's session) costs on every run.
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=replay_group(topic),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=200,
    )
    publisher = DurablePublisher(bootstrap)
    await consumer.start()
    await asyncio.sleep(0)  # aiokafka 0.14: stopping before its tasks ran raises Cancelled
    try:
        await consumer.topics()  # fresh metadata
        partitions = consumer.partitions_for_topic(dlq(topic)) or set()
        consumer.assign([TopicPartition(dlq(topic), p) for p in sorted(partitions)])
        while limit is None or result.found < limit:
            want = None if limit is None else limit - result.found
            batch = await consumer.getmany(timeout_ms=int(idle_seconds * 1000), max_records=want)
            records = [r for rs in batch.values() for r in rs]
            if not records:
                break  # idle: nothing newer than what was read
            for record in records:
                headers = dict(record.headers or ())
                result.by_error_type[headers.get("error_type", b"?").decode(errors="replace")] += 1
            if dry_run:
                continue
            await publisher.publish(
                [(topic, r.key, r.value or b"") for r in records],
                headers={REPLAYED_HEADER: dlq(topic).encode()},
            )
            await consumer.commit({tp: rs[-1].offset + 1 for tp, rs in batch.items() if rs})
            result.copied += len(records)
    finally:
        await consumer.stop()
        await publisher.close()
    return result
