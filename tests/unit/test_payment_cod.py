"""Postal cash: a remittance statement against the cash the carriers collected, each kind of
difference, the day taken in Vietnam time, and statements that cannot be read."""

from __future__ import annotations

from datetime import date, datetime

import pytest

from services.payments.cod import (
    CodKind,
    Collected,
    RemittanceError,
    collected_of,
    days_of,
    mismatch_event,
    parse_remittance,
    reconcile_cod,
    report_csv,
    summary,
)

DAY = date(2026, 11, 20)
HEADER = "order_id,dossier_id,amount_vnd,collected_at\n"


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


COLLECTED = [
    Collected("VN1", "D1", 150_000, at("2026-11-20T09:00:00+07:00")),  # remitted as is
    Collected("VN2", "D2", 150_000, at("2026-11-20T10:00:00+07:00")),  # remitted short
    Collected("VN3", "D3", 80_000, at("2026-11-20T11:00:00+07:00")),  # never remitted
    Collected("VN9", "D9", 50_000, at("2026-11-21T08:00:00+07:00")),  # another day
]
STATEMENT = HEADER + "\n".join(
    [
        "VN1,D1,150000,2026-11-20T09:05:00+07:00",
        "VN2,D2,140000,2026-11-20T10:05:00+07:00",
        "VN4,D4,60000,2026-11-20T16:59:00Z",  # 23:59 in Vietnam: the same day; no collection
    ]
)


def test_each_kind_of_difference_is_found_once() -> None:
    result = reconcile_cod(DAY, parse_remittance(STATEMENT), COLLECTED)
    found = {(d.kind, d.dossier_id, d.remitted_vnd, d.collected_vnd) for d in result.differences}
    assert found == {
        (CodKind.AMOUNT_MISMATCH, "D2", 140_000, 150_000),
        (CodKind.MISSING_IN_REMITTANCE, "D3", None, 80_000),
        (CodKind.EXTRA_IN_REMITTANCE, "D4", 60_000, None),
    }
    assert (result.matched, result.remitted_rows, result.collections) == (1, 3, 3)
    assert summary(result)["by_kind"] == {
        "missing_in_remittance": 1,
        "extra_in_remittance": 1,
        "amount_mismatch": 1,
    }
    assert report_csv(result).count("\r\n") == 4  # header and three rows


def test_a_statement_that_matches_has_no_difference() -> None:
    rows = parse_remittance(HEADER + "VN1,D1,150000,2026-11-20T09:05:00+07:00")
    result = reconcile_cod(DAY, rows, COLLECTED[:1])
    assert result.differences == () and result.matched == 1


def test_a_remittance_without_order_id_matches_by_dossier() -> None:
    rows = parse_remittance(HEADER + ",D1,150000,2026-11-20T09:05:00+07:00")
    assert reconcile_cod(DAY, rows, COLLECTED[:1]).matched == 1


def test_mismatch_events_are_the_same_each_run() -> None:
    result = reconcile_cod(DAY, parse_remittance(STATEMENT), COLLECTED)
    again = reconcile_cod(DAY, parse_remittance(STATEMENT), COLLECTED)
    first = [mismatch_event(result, d).to_json() for d in result.differences]
    assert first == [mismatch_event(again, d).to_json() for d in again.differences]
    event = mismatch_event(result, result.differences[0])
    assert event.type == "postal.cod_mismatch" and event.id.startswith(event.subject + "/cod/")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("order_id,amount_vnd\nVN1,5\n", "line 1"),
        (HEADER + "VN1,D1,lots,2026-11-20T09:05:00+07:00\n", "line 2"),
        (HEADER + "VN1,D1,5,2026-11-20T09:05:00+07:00\nVN2,D2,5,2026-11-20T09:05:00\n", "line 3"),
    ],
)
def test_an_unreadable_statement_names_the_line(text: str, line: str) -> None:
    with pytest.raises(RemittanceError, match=line):
        parse_remittance(text)


def test_a_bom_is_allowed_and_the_days_are_vietnamese() -> None:
    rows = parse_remittance("\ufeff" + STATEMENT)
    assert days_of(rows) == {DAY}


def test_a_collection_event_is_read_from_its_cloudevent() -> None:
    event = {
        "type": "postal.cod_collected",
        "subject": "D1",
        "time": "2026-11-20T09:00:00+07:00",
        "data": {"dossier_id": "D1", "order_id": "VN1", "amount_vnd": 150_000},
    }
    assert collected_of(event) == COLLECTED[0]
    assert collected_of({**event, "type": "postal.delivered"}) is None
