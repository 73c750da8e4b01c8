"""Text rules of the SMS service: encodings, segments, folding, cap, money and dates."""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.sms.text import (
    GSM7_BASIC,
    GSM7_EXTENSION,
    MAX_MESSAGE_UNITS,
    Encoding,
    MessageTooLongError,
    NaiveDatetimeError,
    check_length,
    encoding_of,
    fold_diacritics,
    format_date,
    format_vnd,
    length_in_units,
    segment_count,
)

VIETNAMESE_VOWELS = "aăâeêioôơuưyAĂÂEÊIOÔƠUƯY"
TONE_MARKS = ("", "\u0300", "\u0301", "\u0303", "\u0309", "\u0323")  # huyền sắc ngã hỏi nặng
# Every Vietnamese letter, precomposed as people type it.
VIETNAMESE_LETTERS = sorted(
    {unicodedata.normalize("NFC", v + t) for v in VIETNAMESE_VOWELS for t in TONE_MARKS}
    | set("bcdđghklmnpqrstvxBCDĐGHKLMNPQRSTVX")
)
vietnamese_text = st.text(alphabet=[*VIETNAMESE_LETTERS, " ", ".", ",", "/", ":"], max_size=300)
gsm_text = st.text(alphabet=sorted(GSM7_BASIC | GSM7_EXTENSION), max_size=1200)

ICT = timezone(timedelta(hours=7))


def test_alphabets_are_the_gsm_03_38_tables() -> None:
    # 128 positions minus ESC, which only introduces the extension table.
    assert len(GSM7_BASIC) == 127
    assert "\x1b" not in GSM7_BASIC
    assert set("@£$¥èéùìòÇØøÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ¤¡ÄÖÑÜ§¿äöñüà") <= GSM7_BASIC
    assert set("^{}\\[~]|€") == GSM7_EXTENSION
    assert not GSM7_BASIC & GSM7_EXTENSION


@pytest.mark.parametrize(
    ("text", "encoding"),
    [
        ("Ho so cua Ong/Ba da co ket qua.", Encoding.GSM7),
        ("Giá 10€ [tạm tính]", Encoding.UCS2),
        ("Price 10€ {approx} ~ [x] | ^ \\", Encoding.GSM7),
        ("Hồ sơ", Encoding.UCS2),
        ("ok 👍", Encoding.UCS2),
        ("Straße Ñandù Øre", Encoding.GSM7),
        ("", Encoding.GSM7),
    ],
)
def test_encoding_detection(text: str, encoding: Encoding) -> None:
    assert encoding_of(text) is encoding


@pytest.mark.parametrize(
    ("text", "units", "segments"),
    [
        ("", 0, 0),
        ("a", 1, 1),
        ("a" * 160, 160, 1),
        ("a" * 161, 161, 2),
        ("a" * 153 * 2, 306, 2),
        ("a" * (153 * 2 + 1), 307, 3),
        ("a" * 918, 918, 6),
        # extension characters take two septets
        ("€" * 80, 160, 1),
        ("€" * 80 + "a", 161, 2),
        ("a" * 159 + "[", 161, 2),
        ("{}" * 76 + "a", 305, 2),
        ("{}" * 76 + "ab", 306, 2),
        ("{}" * 76 + "abc", 307, 3),
        # UCS-2: 70 / 67 per segment
        ("ơ" * 70, 70, 1),
        ("ơ" * 71, 71, 2),
        ("ơ" * 67 * 2, 134, 2),
        ("ơ" * (67 * 2 + 1), 135, 3),
        # one UCS-2 character switches the whole message, and € is then one unit, not two
        ("a" * 69 + "ơ", 70, 1),
        ("€" * 69 + "ơ", 70, 1),
        ("a" * 70 + "ơ", 71, 2),
        # characters outside the BMP are two UTF-16 code units
        ("😀" * 35, 70, 1),
        ("😀" * 35 + "a", 71, 2),
    ],
)
def test_units_and_segments_at_the_boundaries(text: str, units: int, segments: int) -> None:
    assert length_in_units(text) == units
    assert segment_count(text) == segments


def _capacity(encoding: Encoding, segments: int) -> int:
    single, multi = (160, 153) if encoding is Encoding.GSM7 else (70, 67)
    return 0 if segments == 0 else single if segments == 1 else multi * segments


@given(st.one_of(gsm_text, st.text(max_size=1200)))
def test_segment_count_is_the_fewest_segments_that_hold_the_text(text: str) -> None:
    encoding, units, segments = encoding_of(text), length_in_units(text), segment_count(text)
    assert units <= _capacity(encoding, segments)
    assert segments == 0 or units > _capacity(encoding, segments - 1)


@given(gsm_text, st.sampled_from(["ơ", "đ", "😀", "中"]))
def test_one_non_gsm_character_makes_the_whole_message_ucs2(text: str, odd: str) -> None:
    assert encoding_of(text) is Encoding.GSM7
    assert encoding_of(text + odd) is Encoding.UCS2
    assert encoding_of(odd + text) is Encoding.UCS2


@pytest.mark.parametrize(
    ("vietnamese", "folded"),
    [
        ("Đường Trần Hưng Đạo", "Duong Tran Hung Dao"),
        ("Hồ sơ của Ông/Bà đã được tiếp nhận", "Ho so cua Ong/Ba da duoc tiep nhan"),
        ("Thành phố Nha Trang, tỉnh Khánh Hòa", "Thanh pho Nha Trang, tinh Khanh Hoa"),
        ("ĂÂÊÔƠƯăâêôơư", "AAEOOUaaeoou"),
        ("Ỷ Ỹ Ỵ ỳ ý", "Y Y Y y y"),
        ("Khánh Hoà", "Khanh Hoa"),  # old-style tone placement, decomposed input
        ("đ Đ", "d D"),
    ],
)
def test_folding_vietnamese(vietnamese: str, folded: str) -> None:
    assert fold_diacritics(vietnamese) == folded
    assert fold_diacritics(unicodedata.normalize("NFD", vietnamese)) == folded


@given(vietnamese_text)
def test_folded_vietnamese_is_always_gsm7_and_never_longer(text: str) -> None:
    folded = fold_diacritics(text)
    assert encoding_of(folded) is Encoding.GSM7
    assert folded.isascii()
    assert len(folded) == len(unicodedata.normalize("NFC", text))


@given(st.text())
def test_folding_is_idempotent(text: str) -> None:
    once = fold_diacritics(text)
    assert fold_diacritics(once) == once


@given(st.text(alphabet=st.characters(max_codepoint=127)))
def test_folding_leaves_ascii_alone(text: str) -> None:
    assert fold_diacritics(text) == text


def test_folding_keeps_what_has_no_plain_form() -> None:
    folded = fold_diacritics("Cảm ơn 👍 中文")
    assert folded == "Cam on 👍 中文"
    assert encoding_of(folded) is Encoding.UCS2


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("a" * MAX_MESSAGE_UNITS, True),
        ("a" * (MAX_MESSAGE_UNITS + 1), False),
        ("€" * (MAX_MESSAGE_UNITS // 2), True),
        ("€" * (MAX_MESSAGE_UNITS // 2) + "a", False),
        ("ơ" * MAX_MESSAGE_UNITS, True),
        ("ơ" * (MAX_MESSAGE_UNITS + 1), False),
    ],
)
def test_918_character_cap(text: str, ok: bool) -> None:
    if ok:
        assert check_length(text).units == MAX_MESSAGE_UNITS
    else:
        with pytest.raises(MessageTooLongError) as caught:
            check_length(text)
        assert caught.value.units == MAX_MESSAGE_UNITS + 1
        assert caught.value.limit == MAX_MESSAGE_UNITS


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        (0, "0 đ"),
        (999, "999 đ"),
        (1000, "1.000 đ"),
        (150000, "150.000 đ"),
        (1234567, "1.234.567 đ"),
        (1000000000, "1.000.000.000 đ"),
    ],
)
def test_money_in_vietnamese_style(amount: int, text: str) -> None:
    assert format_vnd(amount) == text


def test_money_folds_to_plain_d() -> None:
    assert fold_diacritics(format_vnd(150000)) == "150.000 d"


@pytest.mark.parametrize("bad", [-1, 1.5, True, "150000"])
def test_money_refuses_what_is_not_a_vnd_amount(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        format_vnd(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("moment", "day"),
    [
        (datetime(2019, 3, 4, 8, 15, tzinfo=ICT), "04/03/2019"),
        (datetime(2019, 3, 4, 16, 59, 59, tzinfo=UTC), "04/03/2019"),  # 23:59:59 in Vietnam
        (datetime(2019, 3, 4, 17, 0, tzinfo=UTC), "05/03/2019"),  # midnight in Vietnam
        (datetime(2019, 12, 31, 20, 0, tzinfo=timezone(timedelta(hours=-5))), "01/01/2020"),
        (datetime(2019, 1, 1, 0, 30, tzinfo=ICT), "01/01/2019"),
    ],
)
def test_dates_are_the_vietnamese_calendar_day(moment: datetime, day: str) -> None:
    assert format_date(moment) == day


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(NaiveDatetimeError):
        format_date(datetime(2019, 3, 4, 8, 15))


@given(st.datetimes(timezones=st.just(UTC), min_value=datetime(1990, 1, 1)))
def test_date_is_the_day_at_utc_plus_seven(moment: datetime) -> None:
    shifted = moment.replace(tzinfo=None) + timedelta(hours=7)
    assert format_date(moment) == shifted.strftime("%d/%m/%Y")
