"""A service's own changelog: a compacted topic holding the latest value per key.

Written with `DurablePublisher` (acks=all, the producer's default murmur2 partitioner, the same
as every producer of the input topics), so a key's record lands on the partition number of that
key's input records when both topics have the same partition count; a consumer assigned input
partitions P restores exactly the changelog partitions P. Restoring reads each of those
partitions from its latest snapshot (`snapshots.py`, when the changelog has a snapshot store and
the partition a snapshot) or from the beginning, to the end offsets taken when the restore starts;
an empty value is a tombstone.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.structs import TopicPartition

from services.common.kafka import DurablePublisher, ensure_topics
from services.common.logging import get_logger
from services.common.snapshots import SnapshotStore
from services.common.topics import TopicSpec

log = get_logger("motcua.changelog")

Value = TypeVar("Value")


class DecodedCache(Generic[Value]):
    """The decoded form of the most recently used records, trusted only while a record's bytes
    are the very object it was decoded from (a record replaced in memory is decoded again).

    Decoding every record a batch touches would be the hot path's main cost; `size` bounds
    memory.
    """

    def __init__(self, decode: Callable[[str, bytes], Value], size: int) -> None:
        self._decode = decode
        self._size = size
        self._entries: OrderedDict[str, tuple[bytes, Value]] = OrderedDict()

    def get(self, key: str, raw: bytes) -> Value:
        cached = self._entries.get(key)
        if cached is not None and cached[0] is raw:
            self._entries.move_to_end(key)
            return cached[1]
        value = self._decode(key, raw)
        self.remember(key, raw, value)
        return value

    def remember(self, key: str, raw: bytes, value: Value) -> None:
        if self._size <= 0:
            return
        self._entries[key] = (raw, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def forget(self, key: str) -> None:
        self._entries.pop(key, None)

    def clear(self) -> None:
        self._entries.clear()


class NotCopartitioned(Exception):
    """The changelog's partition count differs from its inputs': restoring by partition fails."""


@dataclass
class PartitionRead:
    """What a restore read of one partition: the latest value of every key, and the offset
    after the last record read (where the next write lands)."""

    latest: dict[bytes, bytes]
    next_offset: int
    snapshot_upto: int = 0  # the snapshot it started from (0: none, read from the beginning)


class Changelog:
    def __init__(
        self,
        bootstrap: str,
        spec: TopicSpec,
        publisher: DurablePublisher,
        *,
        replication: int = 1,
        snapshots: SnapshotStore | None = None,
    ) -> None:
        if not spec.compacted:
            raise ValueError(f"changelog {spec.name} must be a compacted topic")
        self._bootstrap = bootstrap
        self.spec = spec
        self._publisher = publisher
        self._replication = replication
        self._ensured = False
        self.snapshots = snapshots

    @property
    def topic(self) -> str:
        return self.spec.name

    async def ensure(self) -> None:
        """Create the topic if it is missing (existing topics are left as they are)."""
        await ensure_topics(self._bootstrap, [self.spec], self._replication)

    async def read(self, partitions: Collection[int]) -> dict[bytes, bytes]:
        """The latest value of every key on `partitions`, up to their end offsets now (the
        topic is created on the first read if it is missing).

        Raises `NotCopartitioned` when the topic's partition count is not the spec's (that of
        the inputs): partition p would then hold other keys than input partition p.
        """
        if not self._ensured:
            await self.ensure()
            self._ensured = True
        return await read_latest(
            self._bootstrap, self.topic, partitions, expect_partitions=self.spec.partitions
        )

    async def read_by_partition(self, partitions: Collection[int]) -> dict[int, PartitionRead]:
        """`read`, per partition: each partition's latest value of every key (its keys in the
        order they were written), starting from the partition's latest snapshot when there is
        one, and where the partition's next record will land."""
        if not self._ensured:
            await self.ensure()
            self._ensured = True
        snapshots = await self.snapshots.latest(partitions) if self.snapshots else {}
        out = {
            p: PartitionRead(dict(snapshots[p].records), snapshots[p].upto, snapshots[p].upto)
            if p in snapshots
            else PartitionRead({}, 0)
            for p in partitions
        }
        positions: dict[int, int] = {}
        async for batch in read_to_end(
            self._bootstrap,
            self.topic,
            partitions,
            expect_partitions=self.spec.partitions,
            start_offsets={p: s.upto for p, s in snapshots.items()},
            positions=positions,
        ):
            for tp, records in batch.items():
                _keep_latest(out[tp.partition].latest, {tp: records})
        for partition, position in positions.items():
            if position == 0 and partition in snapshots:
                # the partition is empty: its snapshot belongs to an earlier topic of that name
                # (deleting a changelog means deleting its snapshots too: deploy/README.md)
                log.warning("snapshot_of_empty_changelog", topic=self.topic, partition=partition)
                out[partition] = PartitionRead({}, 0)
            else:
                out[partition].next_offset = max(out[partition].next_offset, position)
        return out

    async def write_to(self, partition: int, key: bytes, value: bytes) -> int:
        """Send one record to `partition` (not that of its key); return once acknowledged,
        with the offset after it."""
        [landed] = await self._publisher.publish([(self.topic, key, value)], partition=partition)
        after: int = landed.offset + 1
        return after

    async def write(self, records: Mapping[bytes, bytes | None]) -> dict[int, int]:
        """Send one record per key (None: a tombstone); return once the broker acknowledged
        all of them, with the offset after the last one of each partition written."""
        after: dict[int, int] = {}
        if records:
            for landed in await self._publisher.publish(
                [(self.topic, key, value) for key, value in records.items()]
            ):
                after[landed.partition] = max(after.get(landed.partition, 0), landed.offset + 1)
        return after

    async def snapshot(
        self, partition: int, upto: int, records: Iterable[tuple[bytes, bytes]]
    ) -> int:
        """Write a snapshot of `partition` holding `records` as of offset `upto` (nothing when
        the changelog has no snapshot store); return how many keys it holds."""
        if self.snapshots is None:
            return 0
        return await self.snapshots.write(partition, upto, records)


async def read_latest(
    bootstrap: str,
    topic: str,
    partitions: Collection[int] | None = None,
    *,
    expect_partitions: int | None = None,
) -> dict[bytes, bytes]:
    """The latest value of every key of a compacted topic (of `partitions`, default all), up to
    the end offsets when the read starts; an empty value is a tombstone."""
    latest: dict[bytes, bytes] = {}
    async for batch in read_to_end(
        bootstrap, topic, partitions, expect_partitions=expect_partitions
    ):
        _keep_latest(latest, batch)
    return latest


async def read_to_end(
    bootstrap: str,
    topic: str,
    partitions: Collection[int] | None = None,
    *,
    since_ms: int | None = None,
    expect_partitions: int | None = None,
    start_offsets: Mapping[int, int] | None = None,
    positions: dict[int, int] | None = None,
) -> AsyncIterator[Mapping[TopicPartition, list[ConsumerRecord[bytes, bytes]]]]:
    """The records of `topic` (of `partitions`, default all) from the beginning, from
    `start_offsets` (partition -> offset) or from the first record written at or after
    `since_ms` (epoch milliseconds), up to the end offsets when the read starts, in `getmany`
    batches; `positions`, when given, receives each partition's offset after the last record
    read.

    Raises `NotCopartitioned` when `expect_partitions` is given and the topic has another
    partition count.
    """
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    # aiokafka 0.14: stopping before its coordinator task first ran raises CancelledError
    await asyncio.sleep(0)
    try:
        await consumer.topics()  # fetches fresh metadata, so the partition count is current
        existing = consumer.partitions_for_topic(topic) or set()
        if expect_partitions is not None and len(existing) != expect_partitions:
            raise NotCopartitioned(
                f"{topic} has {len(existing)} partitions, its inputs {expect_partitions}"
            )
        chosen = existing if partitions is None else partitions
        tps = [TopicPartition(topic, p) for p in sorted(chosen)]
        if not tps:
            return
        consumer.assign(tps)
        ends = await consumer.end_offsets(tps)
        starts = start_offsets or {}
        remaining = {tp for tp in tps if ends[tp] > starts.get(tp.partition, 0)}
        await consumer.seek_to_beginning(*tps)
        for tp in tps:
            if starts.get(tp.partition, 0) > 0:
                consumer.seek(tp, min(starts[tp.partition], ends[tp]))
        if since_ms is not None:
            # a broker may answer an earlier offset than asked (Tansu answers the first): the
            # records before `since_ms` are skipped below
            found = await consumer.offsets_for_times({tp: since_ms for tp in remaining})
            for tp, at in found.items():
                if at is None:
                    remaining.discard(tp)  # nothing written since
                else:
                    consumer.seek(tp, at.offset)
        while remaining:
            batch = await consumer.getmany(*remaining, timeout_ms=500, max_records=50_000)
            yield _written_since(batch, since_ms)
            for tp in list(remaining):
                if await consumer.position(tp) >= ends[tp]:
                    remaining.discard(tp)
        # Tansu answers the end offset as the last batch's base offset + 1: also take what
        # is left of that batch (anything newer is as good as the rest).
        while batch := await consumer.getmany(*tps, timeout_ms=0, max_records=50_000):
            yield _written_since(batch, since_ms)
        if positions is not None:
            for tp in tps:
                positions[tp.partition] = await consumer.position(tp)
    finally:
        await consumer.stop()


def _written_since(
    batch: Mapping[TopicPartition, list[ConsumerRecord[bytes, bytes]]], since_ms: int | None
) -> Mapping[TopicPartition, list[ConsumerRecord[bytes, bytes]]]:
    if since_ms is None:
        return batch
    return {tp: [r for r in records if r.timestamp >= since_ms] for tp, records in batch.items()}


def _keep_latest(latest: dict[bytes, bytes], batch: Mapping[TopicPartition, Any]) -> None:
    for records in batch.values():
        for record in records:
            if record.key is None:
                continue
            if record.value:
                latest[record.key] = record.value
            else:
                latest.pop(record.key, None)  # a tombstone
