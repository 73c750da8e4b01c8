"""Intake's pure rules: batches, foreign sources, duplicates and conflicts."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.events import parse_event
from services.intake.domain import (
    MAX_BATCH,
    BatchInvalid,
    Candidate,
    canonical_json,
    digest_of,
    foreign_sources,
    read_batch,
    triage,
)
from tests.support.factories import submitted


def test_one_envelope_or_an_array() -> None:
    one = submitted()
    assert [e.id for e in read_batch(orjson.dumps(one))] == [one["id"]]
    many = [submitted(), submitted()]
    assert [e.id for e in read_batch(orjson.dumps(many))] == [e["id"] for e in many]


def test_empty_oversized_and_malformed_batches() -> None:
    with pytest.raises(BatchInvalid, match="empty"):
        read_batch(b"[]")
    with pytest.raises(BatchInvalid, match="at most 500"):
        read_batch(orjson.dumps([submitted() for _ in range(MAX_BATCH + 1)]))
    assert len(read_batch(orjson.dumps([submitted() for _ in range(MAX_BATCH)]))) == MAX_BATCH
    with pytest.raises(BatchInvalid, match="malformed JSON"):
        read_batch(b'[{"a":')


def test_every_bad_event_is_named_by_index() -> None:
    batch = [submitted(), submitted(tier="x"), submitted(), submitted(channel="fax", sector="")]
    with pytest.raises(BatchInvalid) as caught:
        read_batch(orjson.dumps(batch))
    assert {(e.index, e.pointer) for e in caught.value.errors} == {
        (1, "/data/tier"),
        (3, "/data/channel"),
        (3, "/data/sector"),
    }
    assert caught.value.detail == "2 of 4 events are invalid; none was published"


def test_foreign_sources() -> None:
    events = [parse_event(submitted()), parse_event(submitted(source="portal/other"))]
    assert [(e.index, e.pointer) for e in foreign_sources(events, "portal/test")] == [
        (1, "/source")
    ]


def content_hash(value: object) -> str:
    return digest_of(canonical_json(parse_event(value)))


def test_content_hash_ignores_key_order_but_not_content() -> None:
    event = submitted()
    reordered = dict(reversed(list(event.items())))
    assert content_hash(event) == content_hash(reordered)
    changed = {**event, "time": "2019-03-04T08:16:00+07:00"}
    assert content_hash(event) != content_hash(changed)


def candidate(index: int, event_id: str, digest: str) -> Candidate:
    return Candidate(index, f"k:{event_id}", digest, parse_event(submitted(event_id=event_id)))


def test_triage_against_history_and_within_the_batch() -> None:
    batch = [
        candidate(0, "a", "h1"),
        candidate(1, "b", "h2"),
        candidate(2, "b", "h2"),
        candidate(3, "c", "h3"),
        candidate(4, "d", "other"),
    ]
    result = triage(batch, {"k:c": "h3", "k:d": "h4"})
    assert [c.index for c in result.new] == [0, 1]
    assert result.duplicates == 2
    assert [(e.index, e.pointer) for e in result.conflicts] == [(4, "/id")]


def test_the_same_id_with_other_content_in_one_batch_is_a_conflict() -> None:
    result = triage([candidate(0, "a", "h1"), candidate(1, "a", "h2")], {})
    assert [c.index for c in result.new] == [0]
    assert [e.index for e in result.conflicts] == [1]


@given(
    st.lists(st.tuples(st.sampled_from("abcde"), st.sampled_from(["h1", "h2"])), max_size=30),
    st.dictionaries(st.sampled_from("abcde"), st.sampled_from(["h1", "h2"])),
)
def test_triage_accounts_for_every_event_exactly_once(
    items: list[tuple[str, str]], seen: dict[str, str]
) -> None:
    batch = [candidate(i, event_id, digest) for i, (event_id, digest) in enumerate(items)]
    result = triage(batch, {f"k:{k}": v for k, v in seen.items()})
    assert len(result.new) + result.duplicates + len(result.conflicts) == len(batch)
    new_keys = [c.key for c in result.new]
    assert len(new_keys) == len(set(new_keys))  # never publish one (source, id) twice
    assert not set(new_keys) & {f"k:{k}" for k in seen}
