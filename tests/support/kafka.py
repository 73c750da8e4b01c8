"""Put messages on a topic, and read what is on one, for assertions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import ConsumerRecord


async def read_all(
    bootstrap: str,
    topic: str,
    *,
    expect: int | None = None,
    timeout: float = 15.0,
    idle: float = 1.0,
) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record on `topic` from the start: until `expect` are there, or quiet for `idle` s."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False
    )
    await consumer.start()
    records: list[ConsumerRecord[bytes, bytes]] = []
    deadline = time.monotonic() + timeout
    quiet_since = time.monotonic()
    try:
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=200)
            got = [r for rs in batch.values() for r in rs]
            if got:
                records.extend(got)
                quiet_since = time.monotonic()
            if expect is not None and len(records) >= expect:
                break
            if expect is None and time.monotonic() - quiet_since > idle and records:
                break
            await asyncio.sleep(0)
    finally:
        await consumer.stop()
    return records


async def produce(
    bootstrap: str,
    topic: str,
    messages: Sequence[tuple[bytes | None, bytes]],
    *,
    headers: Sequence[tuple[str, bytes]] | None = None,
) -> None:
    """Send (key, value) messages to `topic` in order, each acked (acks=all) before the next."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for key, value in messages:
            await producer.send_and_wait(topic, value=value, key=key, headers=headers)
    finally:
        await producer.stop()


async def audit_events_of(bootstrap: str, source: str, *, timeout: float = 5.0) -> list[Any]:
    """The audit events `source` (`motcua/cli`, `motcua/payments`...) recorded on `audit.events`,
    as JSON, in the order recorded (an event recorded again is there again)."""
    records = await read_all(bootstrap, "audit.events", timeout=timeout, idle=0.5)
    events = [orjson.loads(record.value) for record in records]
    return [event for event in events if event["source"] == source]
