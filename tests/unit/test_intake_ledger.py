"""The pure parts of intake's ledger: reading accepted events back from the topic."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from services.common.events import parse_event
from services.intake.domain import PORTAL_TYPES, canonical_json, digest_of
from services.intake.ledger import accepted_entry, uncertain_since
from tests.support.factories import submitted


def test_an_event_as_published_gives_its_source_id_and_content_hash() -> None:
    event = parse_event(submitted(), allowed_types=PORTAL_TYPES)
    raw = canonical_json(event)
    assert accepted_entry(raw) == (event.source, event.id, digest_of(raw))


@given(st.binary(max_size=64))
def test_anything_else_on_the_topic_is_skipped_not_fatal(raw: bytes) -> None:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        value = None
    expected_some = (
        isinstance(value, dict)
        and isinstance(value.get("source"), str)
        and isinstance(value.get("id"), str)
    )
    assert (accepted_entry(raw) is not None) == expected_some


def test_tombstones_and_non_objects_are_skipped() -> None:
    assert accepted_entry(None) is None
    assert accepted_entry(b"") is None
    assert accepted_entry(b"[1, 2]") is None
    assert accepted_entry(b'{"source": "portal/x", "id": 7}') is None


def test_an_uncertain_claim_tells_when_it_was_sent() -> None:
    assert uncertain_since("u:" + "ab" * 32 + ":1795705946725") == 1795705946725
    assert uncertain_since("p:" + "ab" * 32) is None
    assert uncertain_since("ab" * 32) is None
    assert uncertain_since("u:" + "ab" * 32) is None
