"""The survey's signed links: what is signed opens, an altered or foreign token never does, a
link closes after its last day, and a secret being rotated in or out keeps links working."""

from __future__ import annotations

import base64
from datetime import UTC, date, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.survey_links import (
    MAC_BYTES,
    ExpiredLink,
    InvalidLink,
    SurveyLink,
    link_for,
    sign,
    url_for,
    verify,
)

SECRETS = ["new-secret", "old-secret"]
RETURNED = datetime(2026, 3, 2, 9, 30, tzinfo=UTC)
codes = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=40
).filter(lambda text: text.strip() != "")


@given(dossier_id=codes, agency=codes, days=st.integers(1, 365))
def test_a_signed_link_opens_to_what_it_names_until_its_last_day(
    dossier_id: str, agency: str, days: int
) -> None:
    link = link_for(dossier_id, agency, RETURNED, days)
    token = sign(link, SECRETS)
    assert verify(token, SECRETS, RETURNED) == link
    last_moment = datetime.combine(link.last_day, datetime.max.time(), UTC)
    assert verify(token, SECRETS, last_moment) == link
    with pytest.raises(ExpiredLink):
        verify(token, SECRETS, link.expires_at())


def test_thirty_days_after_the_return_the_link_is_closed() -> None:
    link = link_for("000.00.12.H34-260302-0001", "000.00.12.H34", RETURNED, 30)
    token = sign(link, SECRETS)
    assert verify(token, SECRETS, RETURNED + timedelta(days=30)) == link
    with pytest.raises(ExpiredLink):
        verify(token, SECRETS, RETURNED + timedelta(days=31))


def test_the_link_is_short_and_holds_nothing_but_the_dossier_and_agency() -> None:
    link = link_for("000.00.12.H34-260302-0001", "000.00.12.H34", RETURNED, 30)
    url = url_for("https://motcua.example.gov.vn/", sign(link, SECRETS))
    assert url.startswith("https://motcua.example.gov.vn/s/")
    assert len(url) < 110
    token = url.rsplit("/", 1)[1]
    payload = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))[:-MAC_BYTES]
    assert payload.decode().split("\n")[:2] == [link.dossier_id, link.agency_code]


@given(position=st.integers(0, 10_000), flip=st.integers(1, 255))
def test_any_altered_byte_is_refused(position: int, flip: int) -> None:
    link = link_for("000.00.12.H34-260302-0001", "000.00.12.H34", RETURNED, 30)
    raw = bytearray(base64.urlsafe_b64decode(sign(link, SECRETS) + "=="))
    raw[position % len(raw)] ^= flip
    tampered = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    with pytest.raises(InvalidLink):
        verify(tampered, SECRETS, RETURNED)


def test_an_expired_link_moved_forward_is_refused_as_forged_not_as_expired() -> None:
    link = link_for("D-1", "A-1", RETURNED, 30)
    later = SurveyLink(link.dossier_id, link.agency_code, date(2099, 1, 1))
    token = sign(link, SECRETS)
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    forged_payload = f"D-1\nA-1\n{later.expiry_day}".encode()
    forged = base64.urlsafe_b64encode(forged_payload + raw[-MAC_BYTES:]).decode().rstrip("=")
    with pytest.raises(InvalidLink):
        verify(forged, SECRETS, RETURNED)


@given(token=st.text(max_size=500))
def test_garbage_is_refused_as_invalid(token: str) -> None:
    with pytest.raises(InvalidLink):
        verify(token, SECRETS, RETURNED)


def test_rotation_old_links_open_while_their_secret_is_listed() -> None:
    link = link_for("D-7", "A-1", RETURNED, 30)
    before = sign(link, ["old-secret"])
    after = sign(link, SECRETS)  # the new secret listed first signs from now on
    assert after != before
    assert verify(before, SECRETS, RETURNED) == link
    assert verify(after, ["new-secret"], RETURNED) == link
    with pytest.raises(InvalidLink):
        verify(before, ["new-secret"], RETURNED)  # the old secret retired


def test_a_link_cannot_hold_a_line_break_or_nothing() -> None:
    with pytest.raises(ValueError):
        link_for("D\n1", "A", RETURNED, 30)
    with pytest.raises(ValueError):
        link_for("", "A", RETURNED, 30)
    with pytest.raises(ValueError):
        sign(link_for("D", "A", RETURNED, 30), [])
