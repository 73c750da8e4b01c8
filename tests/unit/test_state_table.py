"""The per-dossier state table, against a changelog faked in memory: what is kept, what is
written on `save` (only what changed since the last one, tombstones for deletions), and what a
restore replaces."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from typing import cast

import orjson

from services.common.changelog import Changelog, PartitionRead
from services.common.kafka import dossier_partition
from services.common.state import StateTable
from services.common.topics import TopicSpec

State = dict[str, int]


class FakeChangelog:
    """`Changelog.read_by_partition`/`write` over a dict per partition; every write is kept."""

    def __init__(self, partitions: Mapping[int, dict[bytes, bytes]] | None = None) -> None:
        self.partitions = {p: dict(records) for p, records in (partitions or {}).items()}
        self.writes: list[dict[bytes, bytes | None]] = []
        self.restored: list[frozenset[int]] = []
        self.during_write: list[Callable[[], object]] = []  # run while a write is in flight

    async def read_by_partition(self, partitions: Collection[int]) -> dict[int, PartitionRead]:
        self.restored.append(frozenset(partitions))
        return {p: PartitionRead(dict(self.partitions.get(p, {})), 0) for p in partitions}

    async def write(self, records: Mapping[bytes, bytes | None]) -> dict[int, int]:
        self.writes.append(dict(records))
        for action in self.during_write:
            action()
        return {}


def encode(state: State) -> bytes:
    return orjson.dumps(state, option=orjson.OPT_SORT_KEYS)


def table_on(
    changelog: FakeChangelog, decoded: list[str] | None = None, cache_size: int = 0
) -> StateTable[State]:
    def decode(key: str, raw: bytes) -> State:
        if decoded is not None:
            decoded.append(key)
        loaded: State = orjson.loads(raw)
        return loaded

    return StateTable(
        cast(Changelog, changelog), encode=encode, decode=decode, cache_size=cache_size
    )


async def test_put_keeps_the_state_and_marks_it_unsaved() -> None:
    table = table_on(FakeChangelog())
    assert table.put("D-1", {"paid": 1}) is True
    assert table.get("D-1") == {"paid": 1}
    assert table.raw("D-1") == b'{"paid":1}'
    assert "D-1" in table and len(table) == 1 and list(table) == ["D-1"]
    assert table.unsaved == {"D-1"}
    assert table.get("D-2") is None and table.raw("D-2") is None and "D-2" not in table


async def test_an_unchanged_encoding_is_not_written_again() -> None:
    changelog = FakeChangelog()
    table = table_on(changelog)
    table.put("D-1", {"a": 1, "b": 2})
    await table.save()
    assert table.put("D-1", {"b": 2, "a": 1}) is False  # the same bytes
    assert table.unsaved == frozenset()
    await table.save()
    assert changelog.writes == [{b"D-1": b'{"a":1,"b":2}'}]


async def test_save_writes_only_the_unsaved_keys_once() -> None:
    changelog = FakeChangelog()
    table = table_on(changelog)
    table.put("D-1", {"n": 1})
    table.put("D-2", {"n": 1})
    table.put("D-1", {"n": 2})  # changed twice before the save: written once, the latest
    await table.save()
    assert changelog.writes == [{b"D-1": b'{"n":2}', b"D-2": b'{"n":1}'}]
    assert table.unsaved == frozenset()

    await table.save()  # nothing changed since
    assert len(changelog.writes) == 1

    table.put("D-2", {"n": 5})
    await table.save()
    assert changelog.writes[-1] == {b"D-2": b'{"n":5}'}


async def test_delete_forgets_the_key_and_writes_its_tombstone() -> None:
    changelog = FakeChangelog()
    table = table_on(changelog)
    table.put("D-1", {"n": 1})
    table.put("D-2", {"n": 1})
    await table.save()
    table.delete("D-1")
    table.delete("D-absent")  # nothing to forget, nothing to write
    assert "D-1" not in table and table.get("D-1") is None and len(table) == 1
    assert table.unsaved == {"D-1"}
    await table.save()
    assert changelog.writes[-1] == {b"D-1": None}
    assert table.unsaved == frozenset()


async def test_a_key_changed_while_its_write_is_in_flight_stays_unsaved() -> None:
    changelog = FakeChangelog()
    table = table_on(changelog)
    table.put("D-1", {"n": 1})
    changelog.during_write.append(lambda: table.put("D-1", {"n": 2}))
    await table.save()
    assert changelog.writes == [{b"D-1": b'{"n":1}'}]
    assert table.unsaved == {"D-1"}  # the newer state still has to be written
    changelog.during_write.clear()
    await table.save()
    assert changelog.writes[-1] == {b"D-1": b'{"n":2}'}
    assert table.unsaved == frozenset()


async def test_restore_replaces_the_table_and_clears_what_was_unsaved() -> None:
    changelog = FakeChangelog(
        {0: {b"D-0": b'{"n":0}'}, 1: {b"D-1": b'{"n":1}'}, 2: {b"D-2": b'{"n":2}'}}
    )
    decoded: list[str] = []
    table = table_on(changelog, decoded, cache_size=10)
    table.put("D-local", {"n": 9})  # from inputs that were not committed: they come again
    table.put("D-1", {"n": 7})
    await table.restore({0, 1})
    assert changelog.restored == [frozenset({0, 1})]
    assert sorted(table) == ["D-0", "D-1"]
    assert table.unsaved == frozenset()
    assert table.get("D-1") == {"n": 1}  # the changelog's, not the unsaved one
    assert "D-local" not in table and "D-2" not in table
    assert table.items_raw() == [("D-0", b'{"n":0}'), ("D-1", b'{"n":1}')]
    await table.save()
    assert changelog.writes == []  # nothing of the old table is written


async def test_decoded_states_are_cached_beside_their_bytes() -> None:
    decoded: list[str] = []
    table = table_on(FakeChangelog({0: {b"D-1": b'{"n":1}'}}), decoded, cache_size=10)
    await table.restore({0})
    assert table.get("D-1") == table.get("D-1") == {"n": 1}
    assert decoded == ["D-1"]  # decoded once
    table.put("D-1", {"n": 2})
    assert table.get("D-1") == {"n": 2} and decoded == ["D-1"]  # put remembers its state
    assert table.decode("D-1", b'{"n":3}') == {"n": 3}  # a scan's decode leaves the cache be
    assert table.get("D-1") == {"n": 2}


async def test_a_rolled_back_attempt_leaves_the_table_as_it_found_it() -> None:
    changelog = FakeChangelog()
    table = table_on(changelog)
    table.put("D-1", {"v": 1})
    table.put("D-2", {"v": 1})
    await table.save()
    table.put("D-3", {"v": 0})  # changed before the attempt: stays unsaved

    table.checkpoint()
    table.put("D-1", {"v": 2})
    table.put("D-1", {"v": 3})
    table.delete("D-2")
    table.put("D-3", {"v": 4})
    table.put("D-4", {"v": 1})
    table.rollback()

    assert table.get("D-1") == {"v": 1} and table.get("D-2") == {"v": 1}
    assert table.get("D-3") == {"v": 0} and "D-4" not in table
    assert table.unsaved == {"D-3"}
    await table.save()
    assert changelog.writes[-1] == {b"D-3": b'{"v":0}'}


async def test_a_kept_attempt_is_written_and_a_later_rollback_does_not_undo_it() -> None:
    changelog = FakeChangelog()
    table = table_on(changelog)
    table.checkpoint()
    table.put("D-1", {"v": 1})
    table.keep()
    table.rollback()  # nothing remembered since `keep`
    assert table.get("D-1") == {"v": 1} and table.unsaved == {"D-1"}
    await table.save()
    assert changelog.writes[-1] == {b"D-1": b'{"v":1}'}


async def test_restore_hands_reserved_records_over_instead_of_keeping_them() -> None:
    changelog = FakeChangelog(
        {
            0: {b"D-1": b'{"a":1}', b"\x00fold:1": b"first", b"\x00fold:2": b"second"},
            1: {b"\x00fold:3": b"third", b"D-2": b'{"b":2}'},
        }
    )
    seen: list[tuple[int, str, bytes]] = []
    table: StateTable[State] = StateTable(
        cast(Changelog, changelog),
        encode=encode,
        decode=lambda _key, raw: orjson.loads(raw),
        on_reserved=lambda partition, key, value: seen.append((partition, key, value)),
    )
    await table.restore([0, 1])
    assert sorted(table) == ["D-1", "D-2"]
    assert seen == [(0, "\x00fold:1", b"first"), (0, "\x00fold:2", b"second"),
                    (1, "\x00fold:3", b"third")]  # fmt: skip


async def test_decoded_shares_the_tables_own_state_for_the_bytes_it_holds() -> None:
    decoded: list[str] = []
    table = table_on(FakeChangelog(), decoded, cache_size=10)
    table.put("D-1", {"a": 1})
    held = table.get("D-1")
    assert table.decoded("D-1", b'{"a":1}') is held and decoded == []  # equal bytes, no decode
    assert table.decoded("D-1", b'{"a":2}') == {"a": 2} and decoded == ["D-1"]  # another version
    assert table.decoded("D-9", b'{"b":1}') == {"b": 1}  # not held here


async def test_a_deleted_state_leaves_the_decoded_cache_too() -> None:
    decoded: list[str] = []
    table = table_on(FakeChangelog(), decoded, cache_size=10)
    table.put("D-1", {"a": 1})
    table.delete("D-1")
    assert table._decoded._entries == {}  # nothing of a retired dossier stays in memory
    table.put("D-1", {"a": 1})  # a new story of the same dossier is decoded afresh
    assert table.get("D-1") == {"a": 1}


class SnapshottingChangelog(FakeChangelog):
    """A fake changelog of 4 partitions that places keys as the producers do, numbers its
    records per partition, and keeps the snapshots it is given."""

    spec = TopicSpec("states", 4, compacted=True)
    topic = "states"
    snapshots = object()  # has a snapshot store

    def __init__(self) -> None:
        super().__init__()
        self.offsets: dict[int, int] = {}
        self.taken: list[tuple[int, int, list[tuple[bytes, bytes]]]] = []

    async def read_by_partition(self, partitions: Collection[int]) -> dict[int, PartitionRead]:
        return {p: PartitionRead({}, self.offsets.get(p, 0)) for p in partitions}

    async def write(self, records: Mapping[bytes, bytes | None]) -> dict[int, int]:
        for key in records:
            p = dossier_partition(key, 4)
            self.offsets[p] = self.offsets.get(p, 0) + 1
        return {p: self.offsets[p] for p in {dossier_partition(k, 4) for k in records}}

    async def write_to(self, partition: int, key: bytes, value: bytes) -> int:
        self.offsets[partition] = self.offsets.get(partition, 0) + 1
        return self.offsets[partition]

    async def snapshot(
        self, partition: int, upto: int, records: Iterable[tuple[bytes, bytes]]
    ) -> int:
        held = list(records)
        self.taken.append((partition, upto, held))
        return len(held)


async def test_a_partition_is_snapshotted_once_its_changelog_outgrew_its_live_states() -> None:
    changelog = SnapshottingChangelog()
    table = StateTable(
        cast(Changelog, changelog), encode=encode, decode=orjson_decode, snapshot_min_records=10
    )
    await table.restore({0, 1, 2, 3})
    for round_ in range(8):  # 40 keys rewritten 8 times: 320 records, 40 live states
        for i in range(40):
            table.put(f"D-{i}", {"round": round_})
        await table.save()
        await table.write_snapshots()
    await table.write_reserved(2, "\x00fold:1", b"first")
    await table.write_reserved(2, "\x00fold:2", b"last")
    table.delete("D-0")
    await table.save()
    for partition in range(4):  # a snapshot per partition, of what it held at its offset
        taken = [t for t in changelog.taken if t[0] == partition]
        assert taken, f"partition {partition} never snapshotted"
    changelog.taken.clear()
    for i in range(40):
        table.put(f"D-{i}", {"round": 99})
    await table.save()
    await table.write_snapshots()
    assert changelog.taken  # due again: the changelog grew by more than twice its live states
    for partition, upto, records in changelog.taken:
        assert upto == changelog.offsets[partition]
        keys = [key for key, _ in records]
        assert all(dossier_partition(k, 4) == partition for k in keys if not k.startswith(b"\x00"))
        assert b"D-0" not in keys
        states = {k: v for k, v in records if not k.startswith(b"\x00")}
        assert all(v == b'{"round":99}' for v in states.values())
        if partition == 2:
            assert records[-1] == (b"\x00fold:2", b"last")  # only the latest reserved record
            assert (b"\x00fold:1", b"first") not in records


async def test_no_snapshot_while_states_are_unsaved_or_before_the_changelog_grew() -> None:
    changelog = SnapshottingChangelog()
    table = StateTable(
        cast(Changelog, changelog), encode=encode, decode=orjson_decode, snapshot_min_records=10
    )
    await table.restore({0, 1, 2, 3})
    for i in range(100):
        table.put(f"D-{i}", {"n": i})
    assert table.snapshots_due() == []  # nothing written yet
    await table.save()
    assert table.snapshots_due() == []  # 100 records, 100 live states: not twice as many
    for i in range(100):
        table.put(f"D-{i}", {"n": -i})
    await table.save()
    for i in range(100):
        table.put(f"D-{i}", {"n": i + 1})
    await table.save()
    assert table.snapshots_due()
    table.put("D-new", {"n": 0})
    await table.write_snapshots()
    assert changelog.taken == []  # D-new is not written yet
    await table.save()
    await table.write_snapshots()
    assert {p for p, _, _ in changelog.taken} == {0, 1, 2, 3}
    assert table.snapshots_due() == []


def orjson_decode(key: str, raw: bytes) -> State:
    loaded: State = orjson.loads(raw)
    return loaded


async def test_a_scan_after_a_restore_decodes_every_state_and_skips_one_that_does_not() -> None:
    changelog = FakeChangelog({0: {b"D-1": b'{"n":1}', b"D-2": b"not json", b"D-3": b'{"n":3}'}})
    decoded: list[str] = []
    table = table_on(changelog, decoded)
    await table.restore([0])
    decoded.clear()
    assert sorted(table.readable()) == [("D-1", {"n": 1}), ("D-3", {"n": 3})]
    assert sorted(decoded) == ["D-1", "D-2", "D-3"]  # every one tried, none of them cached
    assert "D-2" in table  # kept as it is: its next input fails and is dead-lettered
