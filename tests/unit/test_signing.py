"""Webhook signatures of CONTRACT section 6, both schemes."""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.signing import (
    SignatureRejected,
    sign_body,
    verify_body,
    vnpay_canonical,
    vnpay_sign,
    vnpay_verify,
)

PARAMS = {
    "vnp_TxnRef": "D1 abc",
    "vnp_Amount": "15000000",
    "vnp_ResponseCode": "00",
    "vnp_OrderInfo": "Lệ phí hồ sơ/1",
    "vnp_SecureHashType": "HmacSHA512",
    "other": "ignored",
}


def test_vnpay_canonical_is_sorted_url_encoded_and_skips_the_hash_fields() -> None:
    assert vnpay_canonical(PARAMS) == (
        b"vnp_Amount=15000000&vnp_OrderInfo=L%E1%BB%87+ph%C3%AD+h%E1%BB%93+s%C6%A1%2F1"
        b"&vnp_ResponseCode=00&vnp_TxnRef=D1+abc"
    )


def test_vnpay_hash_is_hmac_sha512_of_the_canonical_text() -> None:
    expected = hmac.new(b"k", vnpay_canonical(PARAMS), hashlib.sha512).hexdigest()
    assert vnpay_sign(PARAMS, "k") == expected


def test_vnpay_verify_with_rotation_and_tampering() -> None:
    signed = {**PARAMS, "vnp_SecureHash": vnpay_sign(PARAMS, "old")}
    assert vnpay_verify(signed, ["new", "old"])
    assert vnpay_verify({**signed, "vnp_SecureHash": signed["vnp_SecureHash"].upper()}, ["old"])
    assert not vnpay_verify(signed, ["new"])
    assert not vnpay_verify({**signed, "vnp_Amount": "15000100"}, ["old"])
    assert not vnpay_verify(PARAMS, ["old"])  # no hash at all


def test_body_signature_round_trip_and_rotation() -> None:
    body = b'{"id":"x"}'
    header = sign_body(body, "s2", timestamp=1_000_000)
    assert header.startswith("t=1000000,v1=")
    assert verify_body(body, header, ["s1", "s2"], now=1_000_100) == 1_000_000


@pytest.mark.parametrize(
    ("header", "now", "reason"),
    [
        (None, 1_000_000, "missing signature"),
        ("", 1_000_000, "missing signature"),
        ("v1=abc", 1_000_000, "malformed signature header"),
        ("t=soon,v1=abc", 1_000_000, "malformed signature header"),
        ("t=1000000,v1=deadbeef", 1_000_000, "signature mismatch"),
    ],
)
def test_body_signature_refusals(header: str | None, now: int, reason: str) -> None:
    with pytest.raises(SignatureRejected) as caught:
        verify_body(b"{}", header, ["s"], now=now)
    assert caught.value.reason == reason


def test_timestamps_beyond_300_seconds_are_refused_either_way() -> None:
    header = sign_body(b"{}", "s", timestamp=1_000_000)
    assert verify_body(b"{}", header, ["s"], now=1_000_300) == 1_000_000
    assert verify_body(b"{}", header, ["s"], now=999_700) == 1_000_000
    for now in (1_000_301, 999_699):
        with pytest.raises(SignatureRejected, match="tolerance"):
            verify_body(b"{}", header, ["s"], now=now)


def test_a_header_with_several_v1_values_passes_if_any_matches() -> None:
    good = sign_body(b"{}", "s", timestamp=5).split("v1=")[1]
    assert verify_body(b"{}", f"t=5,v1=00ff,v1={good}", ["s"], now=5) == 5


@given(body=st.binary(max_size=200), flip=st.integers(min_value=0, max_value=199))
def test_any_change_to_the_body_breaks_the_signature(body: bytes, flip: int) -> None:
    header = sign_body(body, "secret", timestamp=100)
    assert verify_body(body, header, ["secret"], now=100) == 100
    if body:
        i = flip % len(body)
        tampered = body[:i] + bytes([body[i] ^ 1]) + body[i + 1 :]
        with pytest.raises(SignatureRejected):
            verify_body(tampered, header, ["secret"], now=100)
