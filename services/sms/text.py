"""Pure text rules for SMS: GSM-7 vs UCS-2, segments, diacritic folding, money and dates.

Modelled on GOV.UK Notify's notifications-utils. No I/O.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from services.common.tz import VIETNAM_TZ

# GSM 03.38 default alphabet, in table order, without ESC (0x1B): ESC only introduces the
# extension table and is never a character of the text itself.
GSM7_BASIC: frozenset[str] = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ"
    " !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§"
    "¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# Extension table: each costs ESC + the character, i.e. two septets.
GSM7_EXTENSION: frozenset[str] = frozenset("^{}\\[~]|€")

GSM7_SINGLE_SEGMENT = 160
GSM7_MULTI_SEGMENT = 153  # 7 septets of every part go to the concatenation header
UCS2_SINGLE_SEGMENT = 70
UCS2_MULTI_SEGMENT = 67
MAX_MESSAGE_UNITS = 918  # Notify's cap: 6 GSM-7 segments


class Encoding(StrEnum):
    GSM7 = "gsm7"
    UCS2 = "ucs2"


class MessageTooLongError(ValueError):
    """The message is over the cap; it must not be sent (nor silently cut)."""

    def __init__(self, units: int, limit: int = MAX_MESSAGE_UNITS) -> None:
        super().__init__(f"message is {units} characters long, the limit is {limit}")
        self.units = units
        self.limit = limit


class NaiveDatetimeError(ValueError):
    """A datetime without an offset: its local day is unknowable, so it is refused."""


@dataclass(frozen=True)
class SmsText:
    """A message body with what the gateway will make of it."""

    text: str
    encoding: Encoding
    units: int
    segments: int


GSM7: frozenset[str] = GSM7_BASIC | GSM7_EXTENSION


def is_gsm7(text: str) -> bool:
    return GSM7.issuperset(text)


def encoding_of(text: str) -> Encoding:
    # One character outside GSM-7 turns the whole message into UCS-2.
    return Encoding.GSM7 if is_gsm7(text) else Encoding.UCS2


def _units(text: str, encoding: Encoding) -> int:
    if encoding is Encoding.GSM7:
        return len(text) + sum(text.count(c) for c in GSM7_EXTENSION)
    return len(text.encode("utf-16-le")) // 2


def _segments(units: int, encoding: Encoding) -> int:
    if units == 0:
        return 0
    if encoding is Encoding.GSM7:
        single, multi = GSM7_SINGLE_SEGMENT, GSM7_MULTI_SEGMENT
    else:
        single, multi = UCS2_SINGLE_SEGMENT, UCS2_MULTI_SEGMENT
    return 1 if units <= single else math.ceil(units / multi)


def length_in_units(text: str) -> int:
    """Septets for GSM-7 (extension characters count two), UTF-16 code units for UCS-2."""
    return _units(text, encoding_of(text))


def segment_count(text: str) -> int:
    encoding = encoding_of(text)
    return _segments(_units(text, encoding), encoding)


def describe(text: str) -> SmsText:
    encoding = encoding_of(text)
    units = _units(text, encoding)
    return SmsText(text=text, encoding=encoding, units=units, segments=_segments(units, encoding))


def check_length(text: str, limit: int = MAX_MESSAGE_UNITS) -> SmsText:
    """Describe `text`, raising MessageTooLongError when it is over the cap."""
    described = describe(text)
    if described.units > limit:
        raise MessageTooLongError(described.units, limit)
    return described


_FOLD_OVERRIDES = str.maketrans({"đ": "d", "Đ": "D"})  # đ has no NFD decomposition


_STRIP_COMBINING_KEPT = 4096


class _WithoutCombining(dict[int, str | None]):
    """A `str.translate` table that drops combining marks: a code point is looked up in
    `unicodedata` once, then answered from the table (which keeps at most
    `_STRIP_COMBINING_KEPT` of them: the alphabets the messages are written in)."""

    def __missing__(self, code: int) -> str | None:
        kept = None if unicodedata.combining(chr(code)) else chr(code)
        if len(self) < _STRIP_COMBINING_KEPT:
            self[code] = kept
        return kept


_STRIP_COMBINING = _WithoutCombining()


def fold_diacritics(text: str) -> str:
    """Vietnamese to plain letters so the message stays GSM-7 (cheaper, fewer segments).

    Characters with no plain form (emoji, CJK, ...) are kept: the message then goes as UCS-2
    rather than losing meaning.
    """
    decomposed = unicodedata.normalize("NFD", text.translate(_FOLD_OVERRIDES))
    stripped = decomposed.translate(_STRIP_COMBINING)
    # Recompose what is left so untouched non-Latin text keeps its usual form.
    return unicodedata.normalize("NFC", stripped)


def format_vnd(amount: int) -> str:
    """150000 -> '150.000 đ' (Vietnamese thousands separator is the dot)."""
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise TypeError(f"amount must be an int number of VND, got {type(amount).__name__}")
    if amount < 0:
        raise ValueError(f"amount must not be negative, got {amount}")
    return f"{amount:,}".replace(",", ".") + " đ"


def to_local(moment: datetime) -> datetime:
    """The same instant in Asia/Ho_Chi_Minh; naive datetimes are refused."""
    if moment.tzinfo is None or moment.tzinfo.utcoffset(moment) is None:
        raise NaiveDatetimeError(f"datetime without an offset: {moment.isoformat()}")
    return moment.astimezone(VIETNAM_TZ)


def format_date(moment: datetime) -> str:
    """dd/mm/yyyy of the calendar day in Asia/Ho_Chi_Minh."""
    return to_local(moment).strftime("%d/%m/%Y")
