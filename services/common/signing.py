"""Webhook signatures of CONTRACT section 6: the VNPAY-style query hash and `X-Motcua-Signature`.

Both verify against several secrets at once (rotation) and compare in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import quote_plus

VNPAY_HASH_FIELDS = frozenset({"vnp_SecureHash", "vnp_SecureHashType"})
SIGNATURE_HEADER = "X-Motcua-Signature"


def vnpay_canonical(params: Mapping[str, str]) -> bytes:
    """The signed text: `vnp_*` parameters but the hash itself, sorted, URL-encoded, `k=v&k=v`."""
    pairs = sorted(
        (k, v) for k, v in params.items() if k.startswith("vnp_") and k not in VNPAY_HASH_FIELDS
    )
    return "&".join(f"{quote_plus(k)}={quote_plus(str(v))}" for k, v in pairs).encode()


def vnpay_sign(params: Mapping[str, str], secret: str) -> str:
    return hmac.new(secret.encode(), vnpay_canonical(params), hashlib.sha512).hexdigest()


def vnpay_verify(params: Mapping[str, str], secrets: Sequence[str]) -> bool:
    """True when `vnp_SecureHash` matches the parameters under any active secret."""
    given = params.get("vnp_SecureHash", "")
    if not given:
        return False
    canonical = vnpay_canonical(params)
    return _matches_any(
        given.lower(),
        (hmac.new(s.encode(), canonical, hashlib.sha512).hexdigest() for s in secrets),
    )


def sign_body(body: bytes, secret: str, timestamp: int | None = None) -> str:
    """The `X-Motcua-Signature` header value for a body: `t=<unix>,v1=<hex HMAC-SHA256>`."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_body_mac(secret, t, body)}"


@dataclass(frozen=True)
class SignatureRejected(Exception):
    """Why a signed body was refused; the reason is safe to log and to return."""

    reason: str


def verify_body(
    body: bytes,
    header: str | None,
    secrets: Sequence[str],
    *,
    tolerance_seconds: int = 300,
    now: float | None = None,
) -> int:
    """Check a body against its `X-Motcua-Signature`; returns the signed timestamp or raises."""
    if not header:
        raise SignatureRejected("missing signature")
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(name, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        raise SignatureRejected("malformed signature header") from None
    current = time.time() if now is None else now
    if abs(current - timestamp) > tolerance_seconds:
        raise SignatureRejected("timestamp outside tolerance")
    candidates = fields.get("v1", [])
    expected = [_body_mac(secret, timestamp, body) for secret in secrets]
    if not any(_matches_any(c.lower(), expected) for c in candidates):
        raise SignatureRejected("signature mismatch")
    return timestamp


def _body_mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def _matches_any(given: str, expected: Iterable[str]) -> bool:
    # Check every secret, not stopping at the first match, so timing says nothing about which.
    found = False
    for candidate in expected:
        found |= hmac.compare_digest(given.encode(), candidate.encode())
    return found
