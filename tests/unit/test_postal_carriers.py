"""The VNPost status mapping, code by code and leg by leg (the table below is the spec)."""

from __future__ import annotations

import pytest

from services.postal.carriers import (
    CARRIERS,
    VNPOST,
    CarrierTable,
    Leg,
    NoTransition,
    PostalStatus,
    Transition,
    UnknownCode,
    lookup,
)

S = PostalStatus
NC = None  # no transition, on purpose

# code: (pickup leg, return leg)
EXPECTED: dict[int, tuple[PostalStatus | None, PostalStatus | None]] = {
    0: (NC, NC),  # draft
    1: (S.PICKUP_REQUESTED, S.RETURN_REQUESTED),  # created
    2: (NC, NC),  # assigned to postman
    3: (NC, NC),  # processing
    4: (NC, NC),  # collecting
    5: (S.FAILED, S.FAILED),  # collection failed
    6: (S.PICKED_UP, NC),  # collected
    7: (S.PICKED_UP, NC),  # received at post office
    8: (S.FAILED, S.FAILED),  # retrieve failed
    9: (S.FAILED, S.FAILED),  # collection cancelled
    10: (S.PICKED_UP, NC),  # in transport
    11: (S.PICKED_UP, NC),  # arrived at post office
    12: (S.PICKED_UP, S.OUT_FOR_DELIVERY),  # delivering
    13: (NC, NC),  # forwarded
    14: (S.DELIVERED_TO_AGENCY, S.DELIVERED),  # delivered
    15: (S.FAILED, S.FAILED),  # delivery failed
    16: (NC, NC),  # waiting for return
    18: (S.FAILED, S.FAILED),  # return started
    19: (S.FAILED, S.RETURNED_TO_AGENCY),  # completed (return to sender completed)
    20: (S.FAILED, S.RETURNED_TO_AGENCY),  # partly returned
    21: (S.COD_COLLECTED, S.COD_COLLECTED),  # COD paid
    22: (S.FAILED, S.FAILED),  # delivery cancelled
}

PICKUP_ONLY = {S.PICKUP_REQUESTED, S.PICKED_UP, S.DELIVERED_TO_AGENCY}
RETURN_ONLY = {S.RETURN_REQUESTED, S.OUT_FOR_DELIVERY, S.DELIVERED, S.RETURNED_TO_AGENCY}


def _cases() -> list[tuple[int, Leg, PostalStatus | None]]:
    return [
        (code, leg, meanings[i])
        for code, meanings in EXPECTED.items()
        for i, leg in enumerate((Leg.PICKUP, Leg.RETURN))
    ]


@pytest.mark.parametrize(("code", "leg", "expected"), _cases())
def test_every_vnpost_code_on_both_legs(code: int, leg: Leg, expected: PostalStatus | None) -> None:
    for form in (code, str(code), f" {code} "):
        result = lookup("vnpost", leg, form)
        if expected is None:
            assert isinstance(result, NoTransition), (code, leg)
        else:
            assert result == Transition(status=expected, label=VNPOST.codes[str(code)].label)


def test_codes_0_to_22_are_all_listed_except_17() -> None:
    assert set(EXPECTED) == set(range(23)) - {17}
    assert set(VNPOST.codes) == {str(c) for c in EXPECTED}


@pytest.mark.parametrize("code", [17, 23, 99, -1, "abc", "", "1.0", "07"])
@pytest.mark.parametrize("leg", list(Leg))
def test_unknown_codes_are_an_explicit_result(code: int | str, leg: Leg) -> None:
    result = lookup("vnpost", leg, code)
    assert result == UnknownCode(carrier="vnpost", code=str(code).strip(), reason="unknown_code")


def test_unknown_carrier_is_an_explicit_result() -> None:
    assert lookup("ghn", Leg.PICKUP, 14) == UnknownCode(
        carrier="ghn", code="14", reason="unknown_carrier"
    )


@pytest.mark.parametrize("table", list(CARRIERS.values()), ids=list(CARRIERS))
def test_each_leg_only_reaches_its_own_statuses(table: CarrierTable) -> None:
    for row in table.codes.values():
        assert row.pickup not in RETURN_ONLY
        assert row.return_ not in PICKUP_ONLY


def test_every_internal_status_is_reachable_and_names_an_event_type() -> None:
    reached = {m for row in VNPOST.codes.values() for m in (row.pickup, row.return_)}
    assert set(PostalStatus) <= reached
    assert {s.event_type for s in PostalStatus} == {
        "postal.pickup_requested",
        "postal.picked_up",
        "postal.delivered_to_agency",
        "postal.return_requested",
        "postal.out_for_delivery",
        "postal.delivered",
        "postal.failed",
        "postal.returned_to_agency",
        "postal.cod_collected",
    }


def test_labels_are_snake_case_reasons() -> None:
    for row in VNPOST.codes.values():
        assert row.label.replace("_", "").isalnum() and row.label == row.label.lower()
