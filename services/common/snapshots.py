"""Snapshots of a changelog's partitions, so that a restore reads the live state, not the history.

A changelog (`changelog.py`) keeps one record per change; a broker compacts it eventually (Kafka)
or never (the embedded Tansu), so reading it from the beginning costs its whole history. A
snapshot of partition p is the latest value of every live key of p as of changelog offset `upto`
(every record before `upto` is in it): a restore reads the latest snapshot, then the changelog
from `upto` on. Reading records before `upto` again is harmless (the latest value wins), so a
snapshot may claim less than it holds, never more.

Snapshots live on their own topic, `<changelog>.snapshots`, with as many partitions as the
changelog (snapshot of p on partition p) and a time retention (a few days: only the latest one is
read). One snapshot is a run of chunk records (key `<id>:<index>`, value a run of framed (key,
value) pairs, each chunk under `CHUNK_BYTES`) followed by its manifest (key `manifest`, JSON
`{"format", "id", "upto", "chunks", "keys"}`), written after its chunks were acknowledged so that
it is the partition's last record. The chunks are framed and sent `CHUNKS_PER_WRITE` at a time, so
a writer holds a few MiB of a snapshot, not a partition's whole state a second time. `latest`
reads the partition's last record; a manifest whose chunks are not the records just before it
(another writer in between during a rebalance, a truncated topic) is no snapshot, and the restore
reads the whole changelog instead.
"""

from __future__ import annotations

import asyncio
import struct
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import orjson
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from services.common.kafka import DurablePublisher, ensure_topics
from services.common.logging import get_logger
from services.common.topics import SNAPSHOT_RETENTION_MS, TopicSpec, snapshots_of

log = get_logger("motcua.snapshots")

FORMAT = 1
CHUNK_BYTES = 512 * 1024
CHUNKS_PER_WRITE = 8  # chunks sent (and acknowledged) at a time
MANIFEST_KEY = b"manifest"
_FRAME = struct.Struct(">II")


class InvalidSnapshot(ValueError):
    """Records of a snapshot topic that do not make a whole snapshot."""


@dataclass(frozen=True)
class Snapshot:
    partition: int
    upto: int  # the changelog offset from which to read on
    records: dict[bytes, bytes]  # key -> latest value, in the order they were written


def chunks(records: Iterable[tuple[bytes, bytes]], limit: int = CHUNK_BYTES) -> Iterator[bytes]:
    """(key, value) pairs framed as length-prefixed bytes, cut into chunks of at most `limit`
    bytes (a single pair larger than that is a chunk of its own)."""
    parts: list[bytes] = []
    size = 0
    for key, value in records:
        frame = _FRAME.pack(len(key), len(value)) + key + value
        if parts and size + len(frame) > limit:
            yield b"".join(parts)
            parts, size = [], 0
        parts.append(frame)
        size += len(frame)
    if parts:
        yield b"".join(parts)


def pairs(chunk: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) pairs of one chunk."""
    at, end = 0, len(chunk)
    while at < end:
        if end - at < _FRAME.size:
            raise InvalidSnapshot("a chunk ends inside a frame header")
        key_len, value_len = _FRAME.unpack_from(chunk, at)
        at += _FRAME.size
        if at + key_len + value_len > end:
            raise InvalidSnapshot("a chunk ends inside a frame")
        yield chunk[at : at + key_len], chunk[at + key_len : at + key_len + value_len]
        at += key_len + value_len


def manifest(snapshot_id: str, upto: int, chunk_count: int, keys: int) -> bytes:
    return orjson.dumps(
        {"format": FORMAT, "id": snapshot_id, "upto": upto, "chunks": chunk_count, "keys": keys}
    )


def assemble(
    partition: int, manifest_value: bytes, chunk_records: list[tuple[bytes, bytes]]
) -> Snapshot:
    """The snapshot a manifest and the records just before it make (key, value each)."""
    try:
        body = orjson.loads(manifest_value)
        snapshot_id, upto, count = str(body["id"]), int(body["upto"]), int(body["chunks"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InvalidSnapshot(f"not a manifest: {type(exc).__name__}") from None
    if body.get("format") != FORMAT:
        raise InvalidSnapshot(f"manifest of format {body.get('format')!r}, not {FORMAT}")
    if len(chunk_records) != count:
        raise InvalidSnapshot(f"{len(chunk_records)} chunks before the manifest, {count} named")
    records: dict[bytes, bytes] = {}
    for index, (key, value) in enumerate(chunk_records):
        if key != f"{snapshot_id}:{index}".encode():
            raise InvalidSnapshot(f"chunk {index} of {snapshot_id} is {key[:60]!r}")
        records.update(pairs(value))
    return Snapshot(partition, upto, records)


def snapshot_spec(changelog: TopicSpec, retention_ms: int = SNAPSHOT_RETENTION_MS) -> TopicSpec:
    """The snapshots topic of a changelog (`topics.snapshots_of`)."""
    return TopicSpec(snapshots_of(changelog.name), changelog.partitions, retention_ms=retention_ms)


class SnapshotStore:
    """The snapshots of one changelog: write one per partition, read a partition's latest."""

    def __init__(
        self,
        bootstrap: str,
        spec: TopicSpec,
        publisher: DurablePublisher,
        *,
        replication: int = 1,
    ) -> None:
        self._bootstrap = bootstrap
        self.spec = spec
        self._publisher = publisher
        self._replication = replication
        self._ensured = False

    async def _ensure(self) -> None:
        if not self._ensured:
            await ensure_topics(self._bootstrap, [self.spec], self._replication)
            self._ensured = True

    async def write(self, partition: int, upto: int, records: Iterable[tuple[bytes, bytes]]) -> int:
        """Write a snapshot of `partition` as of changelog offset `upto`; return its key count."""
        await self._ensure()
        snapshot_id = uuid.uuid4().hex
        keys = 0

        def counted() -> Iterator[tuple[bytes, bytes]]:
            nonlocal keys
            for pair in records:
                keys += 1
                yield pair

        topic = self.spec.name
        written = 0
        group: list[tuple[str, bytes, bytes]] = []
        # a few chunks at a time: never a whole partition's state framed and in the producer
        for part in chunks(counted(), CHUNK_BYTES):
            group.append((topic, f"{snapshot_id}:{written}".encode(), part))
            written += 1
            if len(group) == CHUNKS_PER_WRITE:
                await self._publisher.publish(group, partition=partition)
                group = []
        if group:
            await self._publisher.publish(group, partition=partition)
        await self._publisher.publish(
            [(topic, MANIFEST_KEY, manifest(snapshot_id, upto, written, keys))],
            partition=partition,
        )
        return keys

    async def latest(self, partitions: Iterable[int]) -> dict[int, Snapshot]:
        """The latest whole snapshot of each of `partitions` that has one."""
        await self._ensure()
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 * 1024 * 1024,
        )
        await consumer.start()
        await asyncio.sleep(0)  # aiokafka 0.14: see changelog.read_to_end
        found: dict[int, Snapshot] = {}
        try:
            tps = [TopicPartition(self.spec.name, p) for p in sorted(set(partitions))]
            if not tps:
                return found
            consumer.assign(tps)
            ends = await consumer.end_offsets(tps)
            for tp in tps:
                if ends[tp] == 0:
                    continue
                try:
                    snapshot = await self._read_last(consumer, tp, ends[tp])
                except InvalidSnapshot as exc:
                    log.warning(
                        "snapshot_unusable",
                        topic=tp.topic,
                        partition=tp.partition,
                        reason=str(exc),
                    )
                    continue
                if snapshot is not None:
                    found[tp.partition] = snapshot
        finally:
            await consumer.stop()
        return found

    @staticmethod
    async def _read_last(
        consumer: AIOKafkaConsumer, tp: TopicPartition, end: int
    ) -> Snapshot | None:
        consumer.seek(tp, end - 1)
        last = await _records(consumer, tp, until=end)
        if not last or last[-1][1] != MANIFEST_KEY:
            return None
        manifest_offset, _, manifest_value = last[-1]
        try:
            count = int(orjson.loads(manifest_value)["chunks"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise InvalidSnapshot(f"not a manifest: {type(exc).__name__}") from None
        first = manifest_offset - count
        if first < 0:
            raise InvalidSnapshot(f"{count} chunks named, {manifest_offset} records before")
        consumer.seek(tp, first)
        before = [r for r in await _records(consumer, tp, until=manifest_offset) if r[0] >= first]
        return assemble(tp.partition, manifest_value, [(key, value) for _, key, value in before])


async def _records(
    consumer: AIOKafkaConsumer, tp: TopicPartition, *, until: int
) -> list[tuple[int, bytes, bytes]]:
    """(offset, key, value) of `tp` from its position to `until` (exclusive)."""
    out: list[tuple[int, bytes, bytes]] = []
    empty = 0
    while await consumer.position(tp) < until:
        batch = await consumer.getmany(tp, timeout_ms=1000, max_records=10_000)
        records = batch.get(tp, [])
        if not records:
            empty += 1
            if empty >= 5:
                raise InvalidSnapshot(f"{tp.topic}[{tp.partition}] ends before offset {until}")
            continue
        for record in records:
            if record.offset >= until:
                return out
            out.append((record.offset, record.key or b"", record.value or b""))
    return out
