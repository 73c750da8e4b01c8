"""Snapshot records (`services/common/snapshots.py`): the framing of (key, value) pairs into
chunks, and what makes a whole snapshot out of a manifest and the records before it."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.snapshots import (
    InvalidSnapshot,
    assemble,
    chunks,
    manifest,
    pairs,
)

PAIRS = st.lists(st.tuples(st.binary(max_size=40), st.binary(max_size=300)), max_size=60)


@given(PAIRS, st.integers(min_value=1, max_value=2000))
def test_chunks_hold_every_pair_in_order_and_respect_the_limit(
    records: list[tuple[bytes, bytes]], limit: int
) -> None:
    parts = list(chunks(records, limit))
    assert [pair for part in parts for pair in pairs(part)] == records
    for part in parts:
        # a chunk is over the limit only when it is one pair larger than the limit itself
        assert len(part) <= limit or len(list(pairs(part))) == 1


def test_a_chunk_cut_short_is_no_snapshot() -> None:
    [part] = chunks([(b"D-1", b"state")])
    with pytest.raises(InvalidSnapshot, match="ends inside"):
        list(pairs(part[:-2]))
    with pytest.raises(InvalidSnapshot, match="header"):
        list(pairs(part[:5]))


def chunk_records(
    snapshot_id: str, records: list[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    return [(f"{snapshot_id}:{i}".encode(), part) for i, part in enumerate(chunks(records, 64))]


def test_a_manifest_and_its_chunks_make_the_snapshot() -> None:
    records = [(f"D-{i}".encode(), b"x" * 30) for i in range(10)]
    before = chunk_records("abc", records)
    assert len(before) > 1
    snapshot = assemble(3, manifest("abc", 1234, len(before), 10), before)
    assert snapshot.partition == 3 and snapshot.upto == 1234
    assert list(snapshot.records.items()) == records


def test_chunks_of_another_snapshot_or_a_wrong_count_are_no_snapshot() -> None:
    records = [(f"D-{i}".encode(), b"x" * 30) for i in range(10)]
    ours = chunk_records("abc", records)
    theirs = chunk_records("zzz", records)
    with pytest.raises(InvalidSnapshot, match="chunk 1 of abc"):
        assemble(0, manifest("abc", 5, len(ours), 10), [ours[0], *theirs[1:]])
    with pytest.raises(InvalidSnapshot, match="named"):
        assemble(0, manifest("abc", 5, len(ours) + 1, 10), ours)
    with pytest.raises(InvalidSnapshot, match="not a manifest"):
        assemble(0, b"{}", ours)
    with pytest.raises(InvalidSnapshot, match="format"):
        assemble(0, b'{"format": 99, "id": "abc", "upto": 5, "chunks": 0}', [])


def test_an_empty_partition_snapshot_has_no_chunks() -> None:
    snapshot = assemble(1, manifest("e", 77, 0, 0), [])
    assert snapshot.records == {} and snapshot.upto == 77
