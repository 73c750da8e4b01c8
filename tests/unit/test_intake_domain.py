"""Intake's pure rules: batches, bounds, media types, foreign sources, duplicates, conflicts."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from functools import partial
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.events import CODE_MAX, parse_event
from services.intake.domain import (
    EARLIEST,
    HORIZON,
    MAX_BATCH,
    BatchInvalid,
    Candidate,
    canonical_json,
    digest_of,
    foreign_sources,
    triage,
    unsupported_media_type,
)
from services.intake.domain import read_batch as read_batch_at
from tests.support.factories import envelope, submitted

NOW = datetime(2026, 11, 26, 15, 0, tzinfo=UTC)
read_batch = partial(read_batch_at, now=NOW)


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


def errors_of(batch: list[dict[str, Any]]) -> set[tuple[int, str]]:
    with pytest.raises(BatchInvalid) as caught:
        read_batch(orjson.dumps(batch))
    return {(e.index, e.pointer) for e in caught.value.errors}


@pytest.mark.parametrize(
    "moment",
    ["9999-12-31T23:59:59+07:00", "0001-01-01T00:00:00+07:00", "1999-12-31T23:59:59Z"],
)
def test_time_outside_the_window_is_refused(moment: str) -> None:
    with pytest.raises(BatchInvalid) as caught:
        read_batch(orjson.dumps([submitted(), submitted(time=moment)]))
    [error] = caught.value.errors
    assert (error.index, error.pointer) == (1, "/time")
    assert error.detail.startswith(f"{moment.replace('Z', '+00:00')} is outside 2000-01-01")
    assert "(now + 10 years)" in error.detail
    assert caught.value.detail == "1 of 2 events are invalid; none was published"


def test_every_timestamp_in_data_is_in_the_window() -> None:
    far = "9999-01-01T00:00:00+07:00"
    ok = "2019-03-04T08:15:00+07:00"
    batch = [
        submitted(submitted_at=far),
        envelope("dossier.received", "D-1", {"received_at": ok, "due_at": far, "receipt_no": "R"}),
        envelope("dossier.supplement_received", "D-1", {"received_at": ok, "new_due_at": far}),
        envelope("dossier.supplement_requested", "D-1", {"reason": "r", "requested_at": far}),
        envelope("dossier.apology_issued", "D-1", {"reason": "r", "new_due_at": far}),
        envelope("dossier.resolved", "D-1", {"resolved_at": far, "outcome": "approved"}),
        envelope("dossier.result_returned", "D-1", {"returned_at": far, "via": "counter"}),
        envelope("dossier.withdrawn", "D-1", {"withdrawn_at": far}),
    ]
    assert errors_of(batch) == {
        (0, "/data/submitted_at"),
        (1, "/data/due_at"),
        (2, "/data/new_due_at"),
        (3, "/data/requested_at"),
        (4, "/data/new_due_at"),
        (5, "/data/resolved_at"),
        (6, "/data/returned_at"),
        (7, "/data/withdrawn_at"),
    }


def test_the_window_edges_are_inside() -> None:
    earliest = EARLIEST.isoformat()
    latest = (NOW + HORIZON).isoformat()
    events = read_batch(orjson.dumps([submitted(time=earliest, submitted_at=latest)]))
    assert events[0].time == EARLIEST
    just_after = (NOW + HORIZON + timedelta(seconds=1)).isoformat()
    just_before = (EARLIEST - timedelta(microseconds=1)).isoformat()
    assert errors_of([submitted(time=just_before, submitted_at=just_after)]) == {
        (0, "/time"),
        (0, "/data/submitted_at"),
    }


def test_the_window_moves_with_the_clock_passed_in() -> None:
    in_twelve_years = (NOW + timedelta(days=365 * 12)).isoformat()
    body = orjson.dumps(submitted(time=in_twelve_years))
    with pytest.raises(BatchInvalid):
        read_batch_at(body, now=NOW)
    assert len(read_batch_at(body, now=NOW + timedelta(days=365 * 3))) == 1
    with pytest.raises(ValueError, match="timezone-aware"):
        read_batch_at(body, now=datetime(2026, 11, 26))


def test_blank_long_and_control_character_ids_are_refused() -> None:
    blank = submitted(" ")
    long = submitted("D" * (CODE_MAX + 1))
    control = submitted("D-\x1b[31m-1")
    event_id = submitted(event_id="e" * 10_000)
    agency = submitted(agency_code="")
    procedure = submitted(procedure_code="P\n1")
    assert errors_of([submitted(), blank, long, control, event_id, agency, procedure]) >= {
        (1, "/data/dossier_id"),
        (2, "/data/dossier_id"),
        (3, "/data/dossier_id"),
        (4, "/id"),
        (5, "/data/agency_code"),
        (6, "/data/procedure_code"),
    }


def test_long_texts_are_refused() -> None:
    name = submitted(applicant={"name": "N" * 10_000})
    address = submitted(applicant={"name": "N", "address": "a" * 10_000})
    postal = submitted(postal={"mode": "return", "address": {"street": "s" * 10_000}})
    reason = envelope("dossier.rejected", "D-1", {"reason": "r" * 10_000})
    assert errors_of([name, address, postal, reason]) == {
        (0, "/data/applicant/name"),
        (1, "/data/applicant/address"),
        (2, "/data/postal/address"),
        (3, "/data/reason"),
    }


@pytest.mark.parametrize(
    "content_type",
    [
        "application/json",
        "application/json; charset=utf-8",
        'Application/JSON;charset="UTF-8"',
        "application/cloudevents+json",
        "application/cloudevents-batch+json; charset=utf-8",
    ],
)
def test_json_media_types_are_read(content_type: str) -> None:
    assert unsupported_media_type(content_type) is None


@pytest.mark.parametrize(
    ("content_type", "says"),
    [
        (None, "a Content-Type is required"),
        ("", "a Content-Type is required"),
        ("text/plain", "Content-Type 'text/plain' is not JSON"),
        ("application/x-www-form-urlencoded", "is not JSON"),
        ("multipart/form-data; boundary=x", "Content-Type 'multipart/form-data' is not JSON"),
        ("application/jsonx", "is not JSON"),
        ("application/json; charset=iso-8859-1", "charset 'iso-8859-1' is not supported"),
    ],
)
def test_other_media_types_are_named_with_what_is_expected(
    content_type: str | None, says: str
) -> None:
    detail = unsupported_media_type(content_type)
    assert detail is not None and says in detail
    if "charset" not in says:
        assert "application/json, application/cloudevents+json" in detail


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
