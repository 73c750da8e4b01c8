"""The contract's event models: every error case names its field, and valid events round-trip."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.events import (
    DATA_MODELS,
    InvalidEvent,
    decode_event,
    make_event,
    parse_event,
    topic_of,
)
from tests.support.factories import envelope, submitted


def errors_of(value: Any) -> set[tuple[str, str]]:
    with pytest.raises(InvalidEvent) as caught:
        parse_event(value)
    return {(e.pointer, e.detail) for e in caught.value.errors}


def pointers(value: Any) -> set[str]:
    return {p for p, _ in errors_of(value)}


def test_a_valid_submission_parses_into_typed_fields() -> None:
    event = parse_event(submitted("D-1", event_id="e-1"))
    assert event.id == "e-1"
    assert event.data.tier == "province"
    assert event.data.fee.amount_vnd == 150000
    assert event.data.submitted_at.utcoffset() == timedelta(hours=7)
    assert event.topic == "dossier.events"
    assert event.key == b"D-1"


def test_unknown_type_lists_the_known_ones() -> None:
    [(pointer, detail)] = errors_of(envelope("dossier.teleported", "D-1", {}))
    assert pointer == "/type"
    assert "unknown event type 'dossier.teleported'" in detail
    assert "dossier.submitted" in detail


@pytest.mark.parametrize(
    ("field", "value", "pointer"),
    [
        ("tier", "galaxy", "/data/tier"),
        ("channel", "fax", "/data/channel"),
        ("online_level", 2, "/data/online_level"),
        ("submitted_at", "2019-03-04T08:15:00", "/data/submitted_at"),
        ("submitted_at", "yesterday", "/data/submitted_at"),
        ("fee", {"amount_vnd": -1, "method": "online"}, "/data/fee/amount_vnd"),
        ("fee", {"amount_vnd": "150000", "method": "online"}, "/data/fee/amount_vnd"),
        ("fee", {"amount_vnd": 1.5, "method": "online"}, "/data/fee/amount_vnd"),
        ("fee", {"amount_vnd": 10, "method": "cheque"}, "/data/fee/method"),
        ("postal", {"mode": "drone"}, "/data/postal/mode"),
        ("applicant", {"phone": "0905123456"}, "/data/applicant/name"),
    ],
)
def test_each_bad_field_is_named_by_pointer(field: str, value: Any, pointer: str) -> None:
    event = submitted()
    event["data"][field] = value
    assert pointers(event) == {pointer}


@pytest.mark.parametrize(
    "field",
    [
        "procedure_code",
        "tier",
        "sector",
        "channel",
        "applicant",
        "fee",
        "postal",
        "submitted_at",
        "agency_code",
        "online_level",
    ],
)
def test_a_missing_required_field_is_named(field: str) -> None:
    event = submitted()
    del event["data"][field]
    assert errors_of(event) == {(f"/data/{field}", "Field required")}


@pytest.mark.parametrize("field", ["specversion", "id", "source", "type", "subject", "time"])
def test_a_missing_envelope_attribute_is_named(field: str) -> None:
    event = submitted()
    del event[field]
    assert f"/{field}" in pointers(event)


def test_envelope_rules() -> None:
    event = submitted()
    assert pointers({**event, "specversion": "0.3"}) == {"/specversion"}
    assert pointers({**event, "time": "2019-03-04 08:15"}) == {"/time"}
    assert pointers({**event, "datacontenttype": "text/xml"}) == {"/datacontenttype"}
    assert pointers({**event, "id": ""}) == {"/id"}
    [(pointer, detail)] = errors_of({**event, "subject": "other"})
    assert pointer == "/subject"
    assert "must equal data.dossier_id" in detail


def test_not_an_object_and_malformed_json() -> None:
    assert pointers([1, 2]) == {""}
    with pytest.raises(InvalidEvent, match="malformed JSON"):
        decode_event(b"{oops")


@pytest.mark.parametrize(
    ("type_", "data", "pointer"),
    [
        (
            "dossier.received",
            {"received_at": "2019-03-04T09:00:00+07:00", "due_at": "2019-03-11T17:00:00+07:00"},
            "/data/receipt_no",
        ),
        (
            "dossier.resolved",
            {"resolved_at": "2019-03-04T09:00:00+07:00", "outcome": "maybe"},
            "/data/outcome",
        ),
        (
            "dossier.result_returned",
            {"returned_at": "2019-03-04T09:00:00+07:00", "via": "pigeon"},
            "/data/via",
        ),
        ("dossier.apology_issued", {"reason": "late"}, "/data/new_due_at"),
        ("dossier.transferred", {}, "/data/to_agency_code"),
        ("payment.failed", {"amount_vnd": 1000}, "/data/reason"),
        ("payment.succeeded", {"amount_vnd": -5}, "/data/amount_vnd"),
        ("sms.suppressed", {}, "/data/reason"),
        ("postal.failed", {"reason": ""}, "/data/reason"),
    ],
)
def test_per_type_rules(type_: str, data: dict[str, Any], pointer: str) -> None:
    assert pointer in pointers(envelope(type_, "D-1", data))


def test_every_type_has_a_topic_by_its_prefix() -> None:
    for type_ in DATA_MODELS:
        assert topic_of(type_) == type_.split(".")[0] + ".events"


def test_unknown_optional_fields_are_kept_for_forward_compatibility() -> None:
    event = submitted()
    event["data"]["priority"] = "high"
    event["traceparent"] = "00-abc-def-01"
    round_tripped = orjson.loads(parse_event(event).to_json())
    assert round_tripped["data"]["priority"] == "high"
    assert round_tripped["traceparent"] == "00-abc-def-01"


def test_make_event_builds_a_valid_outcome_event() -> None:
    event = make_event(
        "payment.succeeded",
        source="motcua/payments",
        id="p-1",
        subject="D-1",
        time=datetime(2019, 3, 4, 1, 0, tzinfo=UTC),
        data={"dossier_id": "D-1", "amount_vnd": 150000},
    )
    assert event.topic == "payment.events"
    assert decode_event(event.to_json()) == event


offsets = st.integers(min_value=-12 * 60, max_value=14 * 60).map(
    lambda m: timezone(timedelta(minutes=m))
)
instants = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=offsets
)
texts = st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=40)


@given(
    dossier_id=texts,
    event_id=texts,
    amount=st.integers(min_value=0, max_value=10**12),
    tier=st.sampled_from(["province", "district", "commune", "vertical"]),
    level=st.sampled_from([None, 3, 4]),
    at=instants,
    name=texts,
    method=st.sampled_from(["online", "counter", "postal_cod", "none"]),
)
def test_valid_submissions_round_trip_through_json(
    dossier_id: str,
    event_id: str,
    amount: int,
    tier: str,
    level: int | None,
    at: datetime,
    name: str,
    method: str,
) -> None:
    value = submitted(
        dossier_id,
        event_id=event_id,
        tier=tier,
        online_level=level,
        submitted_at=at.isoformat(),
        fee={"amount_vnd": amount, "method": method},
        applicant={"name": name},
    )
    value["time"] = at.isoformat()
    event = parse_event(copy.deepcopy(value))
    again = decode_event(event.to_json())
    assert again == event
    assert again.data.submitted_at == at
    assert again.data.fee.amount_vnd == amount
