"""Snapshots of a state table's changelog on the real broker: a restore that starts from the
latest snapshot of each partition holds exactly what a read of the whole history holds, reads
only the tail after the snapshot, and falls back to the whole history when a partition's latest
snapshot is not whole."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import orjson
import pytest

from services.common import snapshots
from services.common.changelog import Changelog, read_latest
from services.common.kafka import DurablePublisher
from services.common.snapshots import MANIFEST_KEY, SnapshotStore, manifest, snapshot_spec
from services.common.state import StateTable
from services.common.topics import TopicSpec
from services.dev.embedded import Broker

PARTITIONS = 4
State = dict[str, int]


def encode(state: State) -> bytes:
    return orjson.dumps(state, option=orjson.OPT_SORT_KEYS)


def decode(_key: str, raw: bytes) -> State:
    loaded: State = orjson.loads(raw)
    return loaded


@pytest.fixture
async def publisher(broker: Broker) -> AsyncIterator[DurablePublisher]:
    publisher = DurablePublisher(broker.bootstrap)
    yield publisher
    await publisher.close()


def changelog_of(
    broker: Broker, publisher: DurablePublisher, name: str, *, snapshots: bool
) -> Changelog:
    spec = TopicSpec(name, PARTITIONS, compacted=True)
    store = SnapshotStore(broker.bootstrap, snapshot_spec(spec, 60_000), publisher)
    return Changelog(broker.bootstrap, spec, publisher, snapshots=store if snapshots else None)


def table_on(changelog: Changelog, reserved: dict[int, bytes] | None = None) -> StateTable[State]:
    return StateTable(
        changelog,
        encode=encode,
        decode=decode,
        snapshot_min_records=10,
        on_reserved=None if reserved is None else (lambda p, _k, v: reserved.__setitem__(p, v)),
    )


async def history(table: StateTable[State]) -> None:
    """500 dossiers changed over 6 rounds, 200 of them retired, a reserved record on each
    partition; snapshots written along the way, then more changes after the last one."""
    await table.restore(set(range(PARTITIONS)))
    for round_ in range(6):
        for i in range(500):
            if round_ < 5 or i % 5:
                table.put(f"D-{i}", {"round": round_, "i": i})
        if round_ == 3:
            for i in range(0, 500, 5):
                table.delete(f"D-{i}")
        await table.save()
        await table.write_snapshots()
    for partition in range(PARTITIONS):
        await table.write_reserved(partition, f"\x00fold:{partition}:a", b"older")
        await table.write_reserved(
            partition, f"\x00fold:{partition}:b", f"latest-{partition}".encode()
        )
    await table.write_snapshots()
    for i in range(1, 500, 7):  # the tail after the last snapshots: changes and retirements
        table.put(f"D-{i}", {"round": 99, "i": i})
    for i in range(2, 500, 11):
        table.delete(f"D-{i}")
    await table.save()


@pytest.mark.parametrize("small_chunks", [False, True])
async def test_a_restore_from_snapshots_holds_what_the_whole_history_holds(
    broker: Broker, publisher: DurablePublisher, monkeypatch: pytest.MonkeyPatch, small_chunks: bool
) -> None:
    if small_chunks:  # a snapshot of many chunks, written a few at a time
        monkeypatch.setattr(snapshots, "CHUNK_BYTES", 256)
        monkeypatch.setattr(snapshots, "CHUNKS_PER_WRITE", 3)
    name = f"states-{uuid.uuid4().hex[:8]}"
    writer = table_on(changelog_of(broker, publisher, name, snapshots=True))
    await history(writer)
    expected = dict(writer.items_raw())
    assert len(expected) == 500 - len(range(2, 500, 11))

    # what a reader of the whole history finds is what the writer holds
    whole = await read_latest(broker.bootstrap, name)
    assert {k.decode(): v for k, v in whole.items() if not k.startswith(b"\x00")} == expected

    reserved: dict[int, bytes] = {}
    restored = table_on(changelog_of(broker, publisher, name, snapshots=True), reserved)
    await restored.restore(set(range(PARTITIONS)))
    assert dict(restored.items_raw()) == expected
    assert reserved == {p: f"latest-{p}".encode() for p in range(PARTITIONS)}

    reads = await changelog_of(broker, publisher, name, snapshots=True).read_by_partition(
        set(range(PARTITIONS))
    )
    full = await changelog_of(broker, publisher, name, snapshots=False).read_by_partition(
        set(range(PARTITIONS))
    )
    for partition in range(PARTITIONS):
        assert reads[partition].snapshot_upto > 0, f"partition {partition} read whole"
        assert full[partition].snapshot_upto == 0
        assert reads[partition].next_offset == full[partition].next_offset
        states = {k: v for k, v in reads[partition].latest.items() if not k.startswith(b"\x00")}
        assert states == {
            k: v for k, v in full[partition].latest.items() if not k.startswith(b"\x00")
        }

    # the restored table goes on from where the writer stopped, snapshots due alike
    assert restored.snapshots_due() == writer.snapshots_due()


async def test_a_partition_whose_latest_snapshot_is_not_whole_is_read_from_the_beginning(
    broker: Broker, publisher: DurablePublisher
) -> None:
    name = f"states-{uuid.uuid4().hex[:8]}"
    writer = table_on(changelog_of(broker, publisher, name, snapshots=True))
    await history(writer)
    expected = dict(writer.items_raw())
    # a manifest naming two chunks that are not the records before it (another writer's)
    snapshots = f"{name}.snapshots"
    await publisher.publish([(snapshots, b"other:0", b"")], partition=1)
    await publisher.publish([(snapshots, MANIFEST_KEY, manifest("mine", 10, 2, 3))], partition=1)

    reads = await changelog_of(broker, publisher, name, snapshots=True).read_by_partition(
        set(range(PARTITIONS))
    )
    assert reads[1].snapshot_upto == 0  # read whole
    assert reads[0].snapshot_upto > 0
    restored = table_on(changelog_of(broker, publisher, name, snapshots=True))
    await restored.restore(set(range(PARTITIONS)))
    assert dict(restored.items_raw()) == expected
