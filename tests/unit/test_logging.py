"""Logs never carry a full phone number, a name, an address or a secret, and input cannot forge a
line: control characters are escaped. Nothing that is not a phone number is masked."""

from __future__ import annotations

import json
import logging
import re
import unicodedata
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from services.common.logging import (
    clean,
    configure_logging,
    escape_control,
    get_logger,
    is_national_number,
    mask_phone,
)
from services.payments.domain import txn_ref_for


@pytest.mark.parametrize(
    ("text", "masked"),
    [
        ("0905123456", "090*****56"),
        ("+84905123456", "+8490*****56"),
        ("84905123456", "8490*****56"),
        ("01651234567", "016*****67"),
        ("sent to 0905123456 ok", "sent to 090*****56 ok"),
        ("0905 333 444", "090*****44"),
        ("0905.333.444", "090*****44"),
        ("0905-333-444", "090*****44"),
        ("090 533 3444", "090*****44"),
        ("+84 905 333 444", "+8490*****44"),
        ("+84905333444", "+8490*****44"),
        ("84905333444", "8490*****44"),
        ("(+84) 905-333-444", "(+84)90*****44"),
        ("(+84)905333444", "(+84)90*****44"),
        ("+84 (0) 905 333 444", "+8490*****44"),
        ("+84 0905 333 444", "+8490*****44"),
        ("0084 905 333 444", "008490*****44"),
        ("024 3825 1234", "024*****34"),
        ("028.3829.1234", "028*****34"),
        ("0236 3821 234", "023*****34"),
        ("phone=0905 333 444,", "phone=090*****44,"),
        ("to:+84905333444", "to:+8490*****44"),
        ("/v1/lookup/0905333444", "/v1/lookup/090*****44"),
        ("call 0905 333 444 12 times", "call 090*****44 12 times"),
        ("0905333444/0912345678", "090*****44/091*****78"),
        ("(0905-333-444)", "(090*****44)"),
    ],
)
def test_every_common_written_form_is_masked(text: str, masked: str) -> None:
    assert mask_phone(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "000.00.05.H34-261126-0001",
        "000.00.12.H34-190304-0001",
        "receipt 000.00.12.H34-190304-0001",
        "000.00.05.H34",
        "H34.05-0905333444",
        "2026-11-26",
        "2026-11-26T15:05:14+07:00",
        "2026-11-26T15:05:14.084905333+00:00",
        "26/11/2026 09:05",
        "09-11-2026 10:00",
        "150000",
        "amount_vnd=150000",
        "9999999999",
        "0.905333444",
        "127.0.0.1:8001",
        "http://127.0.0.1:8004/v1/webhooks/sms/primary",
        "3f0e4b2a-0905-4333-8444-905333444123",
        "190304123456",
        "+07:00",
        "v0905333444",
        "0905333444a",
        "00905333444",
        "09053334445",
        "090533344",
    ],
)
def test_what_is_not_a_phone_number_survives(text: str) -> None:
    assert mask_phone(text) == text


# --- properties ----------------------------------------------------------------------------------

SEPARATORS = st.sampled_from(["", " ", ".", "-"])


@st.composite
def national_numbers(draw: st.DrawFn) -> str:
    """A mobile (9 digits), a landline (2 + 9 digits) or an old 11-digit-plan mobile."""
    kind = draw(st.sampled_from(["mobile", "landline", "old"]))
    rest = draw(st.text("0123456789", min_size=8, max_size=8))
    if kind == "mobile":
        return draw(st.sampled_from("35789")) + rest
    return ("2" if kind == "landline" else "1") + draw(st.sampled_from("0123456789")) + rest


def grouped(digits: str, first: int, second: int, sep: str) -> str:
    """`digits` in groups of `first`, `second`, then groups of two to four digits."""
    rest = len(digits) - first - second
    sizes = [first, second, *([rest] if rest <= 4 else [rest - 3, 3])]
    groups, start = [], 0
    for size in sizes:
        groups.append(digits[start : start + size])
        start += size
    return sep.join(groups)


@st.composite
def written_phones(draw: st.DrawFn) -> tuple[str, str, str]:
    """(as written, the prefix it is masked with, the national number)."""
    number = draw(national_numbers())
    sep = draw(SEPARATORS)
    # the first group, with a trunk 0, has at least three digits; the others at least two
    first = draw(st.integers(2, 4))
    second = draw(st.integers(2, 3))
    body = grouped(number, first, second, sep) if sep else number
    form = draw(st.sampled_from(["national", "plus", "bare", "paren", "plus_trunk", "paren_trunk"]))
    space = draw(st.sampled_from(["", " "]))
    if form == "national":
        return "0" + body, "0", number
    if form == "plus":
        return f"+84{space}{body}", "+84", number
    if form == "bare":
        return f"84{number}", "84", number
    if form == "paren":
        return f"(+84){space}{body}", "(+84)", number
    if form == "plus_trunk":
        return f"+84{space}0{body}", "+84", number
    return f"+84 (0){space}{body}", "+84", number


WORDS = st.text(alphabet=st.sampled_from("abcdeđươạ ,;:=()[]\"'"), max_size=12).filter(
    lambda t: not t or not (t[-1].isalnum() or t[-1] in "+")
)


@given(written_phones(), WORDS, WORDS)
def test_a_phone_written_any_common_way_is_masked_wherever_it_stands(
    phone: tuple[str, str, str], before: str, after: str
) -> None:
    written, prefix, number = phone
    after = after if not after or not after[0].isalnum() else " " + after
    masked = mask_phone(f"{before}{written}{after}")
    assert masked == f"{before}{prefix}{number[:2]}*****{number[-2:]}{after}"
    assert number[2:-2] not in re.sub(r"\D", "", masked)


def dossier_ids() -> st.SearchStrategy[str]:
    agency = st.builds(
        lambda a, b, c, d: f"{a:03d}.{b:02d}.{c:02d}.H{d:02d}",
        st.integers(0, 999),
        st.integers(0, 99),
        st.integers(0, 99),
        st.integers(0, 99),
    )
    return st.builds(
        lambda code, day, n: f"{code}-{day:%y%m%d}-{n:04d}",
        agency,
        st.dates(),
        st.integers(0, 9999),
    )


def timestamps() -> st.SearchStrategy[str]:
    offsets = st.sampled_from([UTC, timezone(timedelta(hours=7))])
    return st.builds(
        lambda moment, offset: moment.replace(tzinfo=offset).isoformat(),
        st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2099, 12, 31)),
        offsets,
    )


NOT_PHONES = st.one_of(
    dossier_ids(),
    dossier_ids().map(lambda d: d.split("-")[0]),  # an agency code
    dossier_ids().map(txn_ref_for),
    timestamps(),
    st.dates().map(lambda d: d.isoformat()),
    st.integers(0, 10**10).map(str),  # amounts in VND up to ten billion
    st.uuids().map(str),
    st.uuids().map(lambda u: u.hex),
)


@given(st.lists(NOT_PHONES, min_size=1, max_size=4), st.sampled_from([" ", ", ", "=", "/"]))
def test_ids_codes_dates_amounts_and_uuids_are_never_masked(tokens: list[str], joiner: str) -> None:
    text = joiner.join(tokens)
    assert mask_phone(text) == text


@given(st.text())
def test_a_digitless_text_is_left_alone_and_masking_is_idempotent(text: str) -> None:
    once = mask_phone(text)
    assert mask_phone(once) == once
    if not any(c.isdigit() for c in text):
        assert once == text


def is_invisible(char: str) -> bool:
    return unicodedata.category(char) in {"Cc", "Cf", "Zl", "Zp", "Cs"}


@given(st.text())
def test_escaped_text_has_no_control_or_invisible_character(text: str) -> None:
    escaped = escape_control(text)
    assert not any(is_invisible(c) for c in escaped)
    assert len(escaped.splitlines() or [""]) == 1
    if not any(is_invisible(c) for c in text):
        assert escaped == text


@given(st.text(st.characters(exclude_categories=["Cc", "Cf", "Zl", "Zp", "Cs"])))
def test_printable_text_including_vietnamese_is_unchanged(text: str) -> None:
    assert escape_control(text) == text


def test_escapes_name_what_was_sent() -> None:
    assert escape_control("a\nb\r\tc") == "a\\nb\\r\\tc"
    assert escape_control("\x1b[31mred\x00") == "\\x1b[31mred\\x00"
    assert escape_control("evil\u202etxt.exe\u2028") == "evil\\u202etxt.exe\\u2028"
    assert escape_control("Nguyễn Văn A, Hồ Chí Minh") == "Nguyễn Văn A, Hồ Chí Minh"


@given(national_numbers())
def test_the_generator_makes_national_numbers(number: str) -> None:
    assert is_national_number(number)


# --- log lines, end to end -----------------------------------------------------------------------


@pytest.fixture
def logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    yield capsys
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


@pytest.mark.parametrize("as_json", [True, False])
def test_log_lines_are_scrubbed(logs: pytest.CaptureFixture[str], as_json: bool) -> None:
    configure_logging("INFO", json=as_json)
    get_logger("t").info(
        "sms_sent",
        to="+84 905 123 456",
        name="Nguyễn Văn A",
        address="1 Trần Phú",
        secret="s3cr3t",
        dossier_id="D-1",
    )
    out = logs.readouterr().err
    for leaked in ("905 123 456", "Nguyễn", "Trần Phú", "s3cr3t"):
        assert leaked not in out
    assert "D-1" in out and "+8490*****56" in out


@pytest.mark.parametrize("as_json", [True, False])
def test_an_id_cannot_forge_a_line_or_repaint_the_terminal(
    logs: pytest.CaptureFixture[str], as_json: bool
) -> None:
    configure_logging("INFO", json=as_json)
    forged = "X\n2026-11-26T00:00:00Z [info     ] payment_confirmed amount=1\x1b[2J"
    get_logger("t").warning("webhook_rejected", event_id=forged, ids=[forged])
    logging.getLogger("uvicorn.error").warning("bad request %s", forged)
    out = logs.readouterr().err
    lines = out.splitlines()
    assert len(lines) == 2, out
    assert "\x1b" not in out
    # shown escaped (the console's key=value column quotes it once more)
    assert "\\n2026-11-26T00:00:00Z" in lines[0] and "x1b[2J" in lines[0]
    assert "\\n2026-11-26T00:00:00Z" in lines[1] and "\\x1b[2J" in lines[1]


def test_the_libraries_lines_have_our_format(logs: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", json=True)
    logging.getLogger("uvicorn.error").warning("client %s sent 0905 333 444", "127.0.0.1")
    logging.getLogger("httpx").info("HTTP Request: POST http://x/ 200")  # DEBUG only
    line = json.loads(logs.readouterr().err)
    assert line["event"] == "client 127.0.0.1 sent 090*****44"
    assert line["level"] == "warning"
    assert line["logger"] == "uvicorn.error"
    assert "timestamp" in line


def test_clean_masks_then_escapes() -> None:
    assert clean("0905333444\n") == "090*****44\\n"
    assert clean(str(uuid.UUID(int=0))) == "00000000-0000-0000-0000-000000000000"


@pytest.mark.parametrize("as_json", [True, False])
def test_a_traceback_shows_no_local_variable(
    logs: pytest.CaptureFixture[str], as_json: bool
) -> None:
    configure_logging("INFO", json=as_json)
    applicant = "Nguyễn Văn A, 0905 333 444"  # a local of the failing frame
    try:
        raise KeyError(len(applicant))
    except KeyError:
        get_logger("t").exception("handler_failed")
        logging.getLogger("uvicorn.error").exception("Exception in ASGI application")
    out = logs.readouterr().err
    assert out.count("KeyError") >= 2
    assert "Nguyễn" not in out and "333 444" not in out
