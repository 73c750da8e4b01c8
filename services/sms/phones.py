"""Vietnamese phone numbers: normalise to E.164 mobile numbers, or say why not to send.

Applicant records are typed by hand and still hold pre-2018 11-digit numbers, so the input is
taken loosely (0…, 84…, +84…, 0084…, spaces, dots, dashes, brackets, a lost leading zero) and the
result is strict: a valid Vietnamese mobile number, or a suppression reason.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Final

import phonenumbers
from phonenumbers import NumberParseException, PhoneNumberType

VN_COUNTRY_CODE: Final = "84"

# 2018-2019 migration of 11-digit mobile numbers to 10 digits (last 7 digits kept), written as
# national prefixes with the trunk zero.
OLD_TO_NEW_MOBILE_PREFIX: Final = MappingProxyType(
    {
        # Viettel
        "0162": "032",
        "0163": "033",
        "0164": "034",
        "0165": "035",
        "0166": "036",
        "0167": "037",
        "0168": "038",
        "0169": "039",
        # MobiFone
        "0120": "070",
        "0121": "079",
        "0122": "077",
        "0126": "076",
        "0128": "078",
        # VinaPhone
        "0123": "083",
        "0124": "084",
        "0125": "085",
        "0127": "081",
        "0129": "082",
        # Vietnamobile
        "0186": "056",
        "0188": "058",
        # Gmobile
        "0199": "059",
    }
)

_SEPARATORS = re.compile(r"[\s.\-()/]")
_DIGITS_WITH_OPTIONAL_PLUS = re.compile(r"\+?\d+")


class SuppressionReason(StrEnum):
    MISSING_NUMBER = "missing_number"
    INVALID_NUMBER = "invalid_number"
    LANDLINE = "landline"
    FOREIGN_NUMBER = "foreign_number"
    NOT_MOBILE = "not_mobile"  # toll-free, premium rate, VoIP, ...
    # Decided by the worker when it opens a sealed number (`contacts.py`): on the opt-out list,
    # or the dossier's personal data erased (CONTRACT section 10).
    OPTED_OUT = "opted_out"
    ERASED = "erased"


@dataclass(frozen=True)
class MobileNumber:
    e164: str  # "+84912345678"


@dataclass(frozen=True)
class Unreachable:
    reason: SuppressionReason


PhoneResult = MobileNumber | Unreachable


def migrate_old_prefix(national: str) -> str:
    """'01662345678' -> '0362345678'; any other national number is returned unchanged."""
    if len(national) == 11:
        new_prefix = OLD_TO_NEW_MOBILE_PREFIX.get(national[:4])
        if new_prefix is not None:
            return new_prefix + national[4:]
    return national


def _classify(e164_candidate: str) -> PhoneResult:
    try:
        parsed = phonenumbers.parse(e164_candidate, None)
    except NumberParseException:
        return Unreachable(SuppressionReason.INVALID_NUMBER)
    if not phonenumbers.is_valid_number(parsed):
        return Unreachable(SuppressionReason.INVALID_NUMBER)
    if phonenumbers.region_code_for_number(parsed) != "VN":
        return Unreachable(SuppressionReason.FOREIGN_NUMBER)
    kind = phonenumbers.number_type(parsed)
    if kind == PhoneNumberType.MOBILE:
        e164: str = phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)
        return MobileNumber(e164)
    if kind in (PhoneNumberType.FIXED_LINE, PhoneNumberType.FIXED_LINE_OR_MOBILE):
        return Unreachable(SuppressionReason.LANDLINE)
    return Unreachable(SuppressionReason.NOT_MOBILE)


def _national_form(digits: str) -> str | None:
    """The national number with its trunk zero, from digits written without '+'/'00'."""
    if digits.startswith("0"):
        return digits
    # 84 + 9 digits (new) or 84 + 10 digits (old 11-digit form) is the country code; shorter
    # strings starting with 84 are national numbers that lost their zero (e.g. 084 VinaPhone).
    if digits.startswith(VN_COUNTRY_CODE) and len(digits) in (11, 12):
        return "0" + digits[2:]
    if len(digits) in (9, 10):  # a leading zero lost in a spreadsheet
        return "0" + digits
    return None


def normalise_phone(raw: str | None) -> PhoneResult:
    """A Vietnamese mobile number in E.164, or the reason not to send to `raw`."""
    if raw is None or not raw.strip():
        return Unreachable(SuppressionReason.MISSING_NUMBER)
    compact = _SEPARATORS.sub("", raw)
    if not _DIGITS_WITH_OPTIONAL_PLUS.fullmatch(compact):
        return Unreachable(SuppressionReason.INVALID_NUMBER)

    if compact.startswith(("+", "00")):
        international = compact.removeprefix("+") if compact[0] == "+" else compact[2:]
        if not international.startswith(VN_COUNTRY_CODE):
            return _classify("+" + international)
        rest = international[2:]
        # People write "+84 0912 ..." keeping the trunk zero.
        national = rest if rest.startswith("0") else "0" + rest
    else:
        maybe_national = _national_form(compact)
        if maybe_national is None:
            return Unreachable(SuppressionReason.INVALID_NUMBER)
        national = maybe_national

    return _classify("+" + VN_COUNTRY_CODE + migrate_old_prefix(national)[1:])
