"""Kafka plumbing shared by the services: topic creation and a durable producer."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.structs import RecordMetadata
from opentelemetry.trace import SpanKind

from services.common import tracing
from services.common.partitioning import KeyPartitioner, murmur2
from services.common.topics import TopicSpec


async def ensure_topics(bootstrap: str, specs: Sequence[TopicSpec], replication: int = 1) -> None:
    """Create whichever of `specs` does not exist yet; existing topics are left as they are."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [
            NewTopic(
                name=spec.name,
                num_partitions=spec.partitions,
                replication_factor=replication,
                topic_configs=topic_configs(spec),
            )
            for spec in specs
            if spec.name not in existing
        ]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                await admin.create_topics(missing)
    finally:
        await admin.close()


def topic_configs(spec: TopicSpec) -> dict[str, str]:
    """The topic-level settings a spec asks for: compaction, or its own retention; any other
    topic keeps the broker's default (the event log is kept, see deploy/README.md)."""
    if spec.compacted:
        return {"cleanup.policy": "compact"}
    if spec.retention_ms is not None:
        return {"retention.ms": str(spec.retention_ms)}
    return {}


class BrokerUnavailable(Exception):
    """The broker did not acknowledge in time: nothing may be claimed as published.

    `maybe_sent` says whether some of the messages may still reach the topic (they were handed
    to a connection before the failure: a stalled broker appends them when it resumes) or
    certainly did not (no connection could be made).
    """

    def __init__(self, message: str, *, maybe_sent: bool = True) -> None:
        super().__init__(message)
        self.maybe_sent = maybe_sent


# A partition's batch the producer fills while the one before is sent: a publish of thousands of
# records (a state changelog's writes) holds about a batch per partition and a request being
# encoded. 6 MB published 4,000 records at a time held 24-25 MiB at the peak with batches of
# 1 MiB, 8 MiB with 256 KiB, in the same time (`bench/publish.py`, docs/benchmarks.md).
MAX_BATCH_BYTES = 256 * 1024
MAX_REQUEST_BYTES = 2 * 1024 * 1024  # the largest record, too (a snapshot's chunk is 512 KiB)


class DurablePublisher:
    """An aiokafka producer with acks=all that (re)connects lazily.

    A service that fronts HTTP (intake) must keep answering, with 503, while the broker is
    away, and recover by itself when it is back.
    """

    def __init__(self, bootstrap: str, *, timeout: float = 10.0) -> None:
        self._bootstrap = bootstrap
        self._timeout = timeout
        self._producer: AIOKafkaProducer | None = None
        self._lock = asyncio.Lock()

    async def _ensure(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                producer = AIOKafkaProducer(
                    bootstrap_servers=self._bootstrap,
                    acks="all",
                    linger_ms=2,
                    max_batch_size=MAX_BATCH_BYTES,
                    max_request_size=MAX_REQUEST_BYTES,
                    request_timeout_ms=int(self._timeout * 1000),
                    compression_type=None,
                    partitioner=KeyPartitioner(),
                )
                try:
                    await asyncio.wait_for(producer.start(), self._timeout)
                except (KafkaError, OSError, TimeoutError) as exc:
                    with contextlib.suppress(Exception):
                        await producer.stop()
                    raise BrokerUnavailable(
                        f"cannot connect: {type(exc).__name__}", maybe_sent=False
                    ) from exc
                self._producer = producer
            return self._producer

    async def publish(
        self,
        messages: Sequence[tuple[str, bytes | None, bytes | None]],
        *,
        headers: Mapping[str, bytes] | None = None,
        partition: int | None = None,
    ) -> list[RecordMetadata]:
        """Send (topic, key, value) messages, each with `headers` if given, to the partition of
        their key (or to `partition`); return only when the broker acked every one, with where
        each one landed (topic, partition, offset). A None value is a tombstone (on a compacted
        topic)."""
        with tracing.child_span("kafka publish", kind=SpanKind.PRODUCER) as span:
            if span is not None:
                span.set_attributes(
                    {
                        "messaging.system": "kafka",
                        "messaging.destination.name": ",".join(sorted({m[0] for m in messages})),
                        "messaging.batch.message_count": len(messages),
                    }
                )
            return await self._publish(messages, headers, partition)

    async def _publish(
        self,
        messages: Sequence[tuple[str, bytes | None, bytes | None]],
        headers: Mapping[str, bytes] | None,
        partition: int | None,
    ) -> list[RecordMetadata]:
        producer = await self._ensure()
        extra = list(headers.items()) if headers else None
        try:
            futures = [
                await producer.send(topic, value=value, key=key, headers=extra, partition=partition)
                for topic, key, value in messages
            ]
            landed: list[RecordMetadata] = await asyncio.wait_for(
                asyncio.gather(*futures), self._timeout
            )
        except (KafkaError, OSError, TimeoutError) as exc:
            await self._reset()
            raise BrokerUnavailable(
                f"not acknowledged: {type(exc).__name__}", maybe_sent=True
            ) from exc
        return landed

    async def connected(self) -> bool:
        try:
            producer = await self._ensure()
            await asyncio.wait_for(producer.client.fetch_all_metadata(), 2.0)
        except (BrokerUnavailable, KafkaError, OSError, TimeoutError):
            return False
        return True

    async def _reset(self) -> None:
        async with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 2.0)

    async def close(self) -> None:
        await self._reset()


async def publish_once(
    bootstrap: str, messages: Sequence[tuple[str, bytes | None, bytes | None]]
) -> None:
    """`DurablePublisher.publish` with a publisher of its own, closed afterwards: for a command
    or a daily job that writes once."""
    publisher = DurablePublisher(bootstrap)
    try:
        await publisher.publish(messages)
    finally:
        await publisher.close()


def dossier_partition(key: bytes, partitions: int) -> int:
    """The partition the producers' default partitioner (Kafka's murmur2) gives a key: that of
    a dossier's records on every topic keyed by dossier id."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions
