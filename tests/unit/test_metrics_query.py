"""The metrics API's range parameters: RFC 3339 in any of its spellings, offsets required."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from services.metrics.query import parse_query

NOW = datetime(2026, 11, 26, tzinfo=UTC)


@pytest.mark.parametrize(
    "spelled",
    [
        "2019-03-01T00:00:00Z",
        "2019-03-01t00:00:00z",  # RFC 3339 allows lowercase
        "2019-03-01T07:00:00+07:00",
        "2019-03-01T07:00:00 07:00",  # a '+' left unescaped in a URL
    ],
)
def test_every_rfc_3339_spelling_of_one_instant_is_that_instant(spelled: str) -> None:
    query, errors = parse_query({"from": spelled}, NOW)
    assert errors == [] and query is not None
    assert query.start == datetime(2019, 3, 1, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["2019-03-01T00:00:00", "yesterday", "2019-13-01T00:00:00Z"])
def test_a_timestamp_without_offset_or_unreadable_names_its_parameter(bad: str) -> None:
    query, errors = parse_query({"to": bad}, NOW)
    assert query is None and [e.parameter for e in errors] == ["to"]
