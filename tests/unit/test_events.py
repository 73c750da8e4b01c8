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
    ADDRESS_JSON_MAX,
    ADDRESS_TEXT_MAX,
    CODE_MAX,
    DATA_MODELS,
    EMAIL_MAX,
    ENVELOPE_ID_MAX,
    MONEY_MAX,
    NAME_MAX,
    PHONE_MAX,
    REASON_MAX,
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


# --- bounds: what every consumer can handle ----------------------------------------------------

ID_FIELDS = ["dossier_id", "agency_code", "procedure_code", "sector"]


def with_data(event: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """`event` with its data changed; a new `dossier_id` becomes the `subject` too."""
    changed = copy.deepcopy(event)
    changed["data"].update(changes)
    if "dossier_id" in changes:
        changed["subject"] = changes["dossier_id"]
    return changed


@pytest.mark.parametrize("field", ID_FIELDS)
def test_ids_and_codes_are_bounded(field: str) -> None:
    event = submitted()
    longest = "D" * CODE_MAX
    assert parse_event(with_data(event, **{field: longest})).data.model_dump()[field] == longest
    assert errors_of(with_data(event, **{field: "D" * (CODE_MAX + 1)})) >= {
        (f"/data/{field}", f"String should have at most {CODE_MAX} characters")
    }


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize("blank", ["", " ", "\u3000 \u00a0"])
def test_ids_and_codes_are_never_blank(field: str, blank: str) -> None:
    assert f"/data/{field}" in pointers(with_data(submitted(), **{field: blank}))


@pytest.mark.parametrize("field", ID_FIELDS)
@pytest.mark.parametrize("char", ["\x00", "\n", "\t", "\x1b", "\x7f", "\x85", "\u2028"])
def test_ids_and_codes_hold_no_control_characters(field: str, char: str) -> None:
    found = errors_of(with_data(submitted(), **{field: f"D-{char}1"}))
    assert (
        f"/data/{field}",
        f"must not contain control characters (U+{ord(char):04X} at position 2)",
    ) in found


def test_ids_of_other_types_are_bounded_too() -> None:
    at = "2019-03-04T09:00:00+07:00"
    received = envelope("dossier.received", "D-1", {"received_at": at, "due_at": at})
    assert "/data/receipt_no" in pointers(with_data(received, receipt_no=" "))
    assert "/data/receipt_no" in pointers(with_data(received, receipt_no="R" * (CODE_MAX + 1)))
    transferred = envelope("dossier.transferred", "D-1", {"to_agency_code": "A\x00"})
    assert pointers(transferred) == {"/data/to_agency_code"}


@pytest.mark.parametrize("field", ["id", "source", "subject"])
def test_envelope_ids_are_bounded(field: str) -> None:
    event = submitted()
    assert f"/{field}" in pointers({**event, field: "x" * (ENVELOPE_ID_MAX + 1)})
    assert f"/{field}" in pointers({**event, field: "  "})
    assert f"/{field}" in pointers({**event, field: "a\rb"})


def test_an_event_id_may_be_longer_than_a_dossier_id() -> None:
    # services derive their events' ids from a dossier id and more (postal:<dossier>:...)
    event = {**submitted(), "id": "e" * ENVELOPE_ID_MAX}
    assert parse_event(event).id == "e" * ENVELOPE_ID_MAX


def test_applicant_fields_are_bounded() -> None:
    event = submitted()
    applicant = event["data"]["applicant"]

    def bad(**changes: Any) -> set[str]:
        return pointers(with_data(event, applicant={**applicant, **changes}))

    assert bad(name="N" * (NAME_MAX + 1)) == {"/data/applicant/name"}
    assert bad(name=" \n ") == {"/data/applicant/name"}
    assert bad(name="N\x00") == {"/data/applicant/name"}
    assert bad(phone="0" * (PHONE_MAX + 1)) == {"/data/applicant/phone"}
    assert bad(phone="0905\n123456") == {"/data/applicant/phone"}
    assert bad(email="a" * EMAIL_MAX + "@x") == {"/data/applicant/email"}
    assert bad(address="a" * (ADDRESS_TEXT_MAX + 1)) == {"/data/applicant/address"}
    assert bad(address={"street": "a" * ADDRESS_JSON_MAX}) == {"/data/applicant/address"}
    # within the limits, names and addresses may hold line breaks and tabs; phone may be empty
    fine = with_data(
        event,
        applicant={
            **applicant,
            "name": "N" * NAME_MAX,
            "phone": "",
            "address": "1 Trần Phú,\n\tNha Trang",
        },
    )
    assert parse_event(fine).data.applicant.name == "N" * NAME_MAX


def test_postal_address_and_money_are_bounded() -> None:
    event = submitted()
    too_long = {"mode": "return", "address": {"street": "a" * ADDRESS_JSON_MAX}}
    assert pointers(with_data(event, postal=too_long)) == {"/data/postal/address"}
    over = {"amount_vnd": MONEY_MAX + 1, "method": "online"}
    assert pointers(with_data(event, fee=over)) == {"/data/fee/amount_vnd"}
    most = {"amount_vnd": MONEY_MAX, "method": "online"}
    assert parse_event(with_data(event, fee=most)).data.fee.amount_vnd == MONEY_MAX


@pytest.mark.parametrize(
    ("type_", "data"),
    [
        ("dossier.rejected", {}),
        ("dossier.supplement_requested", {"requested_at": "2019-03-04T09:00:00+07:00"}),
        ("dossier.apology_issued", {"new_due_at": "2019-03-11T17:00:00+07:00"}),
    ],
)
def test_reasons_are_bounded_and_never_blank(type_: str, data: dict[str, Any]) -> None:
    def reason(text: str) -> dict[str, Any]:
        return envelope(type_, "D-1", {**data, "reason": text})

    assert pointers(reason("r" * (REASON_MAX + 1))) == {"/data/reason"}
    assert errors_of(reason(" \n\t ")) == {("/data/reason", "must not be blank")}
    assert pointers(reason("bad\x00")) == {"/data/reason"}
    assert parse_event(reason("Thiếu giấy tờ:\n- bản sao")).type == type_


def test_a_supplements_new_due_at_is_a_timestamp_when_given() -> None:
    at = "2019-03-04T09:00:00+07:00"
    given_ = envelope("dossier.supplement_received", "D-1", {"received_at": at, "new_due_at": at})
    assert parse_event(given_).data.new_due_at is not None
    bad = envelope("dossier.supplement_received", "D-1", {"received_at": at, "new_due_at": "soon"})
    assert pointers(bad) == {"/data/new_due_at"}
    absent = envelope("dossier.supplement_received", "D-1", {"received_at": at})
    assert "new_due_at" not in parse_event(absent).to_dict()["data"]


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
# What an id or a name may hold: anything but control characters, and not only whitespace.
texts = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\u2028\u2029"),
    min_size=1,
    max_size=40,
).filter(str.strip)


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
