"""Reading the recent audit trail off `audit.events` (`motcua audit`).

The reader assigns itself every partition (no consumer group, nothing committed), reads each
from `limit` records before its end (from its beginning when only one action is wanted: the trail
holds operators' actions, a few thousand a year) up to the end it found on start, and returns the
last `limit` events by time, oldest first. An event recorded again (a retried request: same
`source` and `id`) is listed once, at its first record. A record that is no audit event is
counted, not returned.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from services.common.events import (
    AuditAction,
    CloudEvent,
    InvalidEvent,
    audit_type,
    decode_event_of,
)
from services.common.topics import AUDIT_EVENTS


@dataclass
class AuditTrail:
    """The recent audit events, oldest first, and how many records did not decode."""

    events: list[CloudEvent[Any]] = field(default_factory=list)
    unreadable: int = 0


async def recent_audit_events(
    bootstrap: str,
    *,
    limit: int = 50,
    action: AuditAction | None = None,
    timeout_seconds: float = 10.0,
) -> AuditTrail:
    """The last `limit` audit events (only `action`'s when given), oldest first."""
    types = frozenset({audit_type(action)} if action else {audit_type(a) for a in AuditAction})
    trail = AuditTrail()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        fetch_max_wait_ms=200,
    )
    await consumer.start()
    await asyncio.sleep(0)  # aiokafka 0.14: stopping before its tasks ran raises Cancelled
    try:
        await consumer.topics()  # fresh metadata
        numbers = consumer.partitions_for_topic(AUDIT_EVENTS) or set()
        partitions = [TopicPartition(AUDIT_EVENTS, p) for p in sorted(numbers)]
        if not partitions:
            return trail
        consumer.assign(partitions)
        beginnings = await consumer.beginning_offsets(partitions)
        ends = await consumer.end_offsets(partitions)
        for tp in partitions:
            start = beginnings[tp] if action else max(beginnings[tp], ends[tp] - limit)
            consumer.seek(tp, start)
        pending = {tp for tp in partitions if ends[tp] > beginnings[tp]}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        while pending and loop.time() < deadline:
            batch = await consumer.getmany(*pending, timeout_ms=200)
            for tp, records in batch.items():
                for record in records:
                    if record.offset >= ends[tp]:
                        continue
                    try:
                        event = decode_event_of(record.value or b"", types)
                    except InvalidEvent:
                        trail.unreadable += 1
                        continue
                    if event is not None:
                        trail.events.append(event)
            for tp in list(pending):
                if await consumer.position(tp) >= ends[tp]:
                    pending.discard(tp)
    finally:
        await consumer.stop()
    trail.events.sort(key=lambda event: (event.time, event.id))
    seen: set[tuple[str, str]] = set()
    once = []
    for event in trail.events:
        if (event.source, event.id) not in seen:
            seen.add((event.source, event.id))
            once.append(event)
    trail.events = once[-limit:]
    return trail
