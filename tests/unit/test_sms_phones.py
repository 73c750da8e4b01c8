"""Vietnamese phone numbers: E.164 normalisation, the 2018 migration, suppression, masking."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.logging import mask_phone
from services.sms.phones import (
    OLD_TO_NEW_MOBILE_PREFIX,
    MobileNumber,
    SuppressionReason,
    Unreachable,
    migrate_old_prefix,
    normalise_phone,
)

# Copied from REFERENCES.md on purpose, so the table in the code is checked, not echoed.
MIGRATION_FROM_REFERENCES = {
    **{f"016{d}": f"03{d}" for d in "23456789"},  # Viettel 0162-0169 -> 032-039
    "0120": "070",
    "0121": "079",
    "0122": "077",
    "0126": "076",
    "0128": "078",
    "0123": "083",
    "0124": "084",
    "0125": "085",
    "0127": "081",
    "0129": "082",
    "0186": "056",
    "0188": "058",
    "0199": "059",
}
# The migrated prefixes plus prefixes that were 10-digit all along.
NEW_MOBILE_PREFIXES = sorted(
    {
        *MIGRATION_FROM_REFERENCES.values(),
        "086",
        "088",
        "090",
        "091",
        "093",
        "094",
        "096",
        "097",
        "098",
    }
)
seven_digits = st.text(alphabet="0123456789", min_size=7, max_size=7)


def test_the_migration_table_is_complete() -> None:
    assert dict(OLD_TO_NEW_MOBILE_PREFIX) == MIGRATION_FROM_REFERENCES
    assert len(OLD_TO_NEW_MOBILE_PREFIX) == 21


@pytest.mark.parametrize(("old", "new"), sorted(MIGRATION_FROM_REFERENCES.items()))
@pytest.mark.parametrize(
    "written_as",
    [
        "{old} 234 5678",
        "{old}.234.5678",
        "+84 {old_nsn}-234-5678",
        "84{old_nsn}2345678",
        "{old_nsn}2345678",
        "0084 {old_nsn} 234 5678",
    ],
)
def test_every_old_prefix_maps_to_its_new_one(old: str, new: str, written_as: str) -> None:
    raw = written_as.format(old=old, old_nsn=old[1:])
    assert normalise_phone(raw) == MobileNumber(f"+84{new[1:]}2345678")


@given(st.sampled_from(sorted(MIGRATION_FROM_REFERENCES.items())), seven_digits)
def test_old_and_new_number_are_the_same_subscriber(prefixes: tuple[str, str], tail: str) -> None:
    old, new = prefixes
    assert migrate_old_prefix(old + tail) == new + tail
    assert (
        normalise_phone(old + tail)
        == normalise_phone(new + tail)
        == MobileNumber(f"+84{new[1:]}{tail}")
    )


@given(st.sampled_from(NEW_MOBILE_PREFIXES), seven_digits)
def test_current_mobile_numbers_are_kept_in_every_written_form(prefix: str, tail: str) -> None:
    expected = MobileNumber(f"+84{prefix[1:]}{tail}")
    nsn = prefix[1:] + tail
    for raw in (
        f"0{nsn}",
        f"84{nsn}",
        f"+84{nsn}",
        f"+84 0{nsn}",
        f"0084{nsn}",
        nsn,
        f"{prefix} {tail[:3]} {tail[3:]}",
        f"({prefix}) {tail[:3]}-{tail[3:]}",
    ):
        assert normalise_phone(raw) == expected, raw


@pytest.mark.parametrize(
    "raw",
    [
        "0912345678",
        "0912 345 678",
        "0912.345.678",
        "0912-345-678",
        "+84 912 345 678",
        "84912345678",
        "(+84) 912-345-678",
        "0084912345678",
        "+84 0912345678",
        "912345678",
        " 0912345678 \n",
    ],
)
def test_usual_ways_of_writing_one_number(raw: str) -> None:
    assert normalise_phone(raw) == MobileNumber("+84912345678")


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (None, SuppressionReason.MISSING_NUMBER),
        ("", SuppressionReason.MISSING_NUMBER),
        ("   ", SuppressionReason.MISSING_NUMBER),
        # landlines: Khánh Hòa, Hà Nội, Hồ Chí Minh City
        ("0258 3822 123", SuppressionReason.LANDLINE),
        ("024 3825 1234", SuppressionReason.LANDLINE),
        ("+84 28 3829 1234", SuppressionReason.LANDLINE),
        # foreign numbers
        ("+1 650 253 0000", SuppressionReason.FOREIGN_NUMBER),
        ("+44 20 7946 0958", SuppressionReason.FOREIGN_NUMBER),
        ("0044 20 7946 0958", SuppressionReason.FOREIGN_NUMBER),
        ("+81 90-1234-5678", SuppressionReason.FOREIGN_NUMBER),
        # special numbers a message cannot go to
        ("+84 1800 1234", SuppressionReason.NOT_MOBILE),
        ("+84 1900 1234", SuppressionReason.NOT_MOBILE),
        # invalid
        ("abc", SuppressionReason.INVALID_NUMBER),
        ("0912", SuppressionReason.INVALID_NUMBER),
        ("091234567890123", SuppressionReason.INVALID_NUMBER),
        ("09123x5678", SuppressionReason.INVALID_NUMBER),
        ("+84 52 123 4567", SuppressionReason.INVALID_NUMBER),  # unassigned prefix
        ("+84 912 345 678 9", SuppressionReason.INVALID_NUMBER),
        ("+999 123", SuppressionReason.INVALID_NUMBER),
        ("01302345678", SuppressionReason.INVALID_NUMBER),  # 11 digits, not a migrated prefix
        ("0912345678 ext 12", SuppressionReason.INVALID_NUMBER),
    ],
)
def test_numbers_we_must_not_send_to(raw: str | None, reason: SuppressionReason) -> None:
    assert normalise_phone(raw) == Unreachable(reason)


@given(st.text(max_size=30))
def test_any_input_gives_a_mobile_or_a_reason(raw: str) -> None:
    result = normalise_phone(raw)
    if isinstance(result, MobileNumber):
        assert result.e164.startswith("+84")
        assert len(result.e164) == 12
        assert result.e164[1:].isdigit()
    else:
        assert isinstance(result.reason, SuppressionReason)


@pytest.mark.parametrize(
    ("number", "masked"),
    [
        ("+84901234567", "+8490*****67"),
        ("+84321234567", "+8432*****67"),
        ("0901234567", "090*****67"),
        ("not a number", "not a number"),
        ("", ""),
    ],
)
def test_mask_phone(number: str, masked: str) -> None:
    assert mask_phone(number) == masked


@given(st.sampled_from(NEW_MOBILE_PREFIXES), seven_digits)
def test_a_masked_number_never_shows_the_subscriber_part(prefix: str, tail: str) -> None:
    number = f"+84{prefix[1:]}{tail}"
    masked = mask_phone(number)
    assert len(masked) == len(number)
    assert masked[5:-2] == "*****"  # the five digits that tell subscribers apart are hidden
    assert masked[:5] == number[:5]
    assert masked[-2:] == number[-2:]
