"""Tokens every operator endpoint must refuse with 401 (CONTRACT section 8), made the way an
attacker would: expired, not valid yet, signed by a key the issuer does not publish, `alg: none`,
HS256 with the issuer's public key (or any string) as the secret, another issuer or audience, a
portal key, malformed, tampered. Shared by tests/integration/test_operator_tokens.py (a stand-in
app) and tests/integration/test_operator_endpoints.py (every real operator route).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.support.operators import Issuer

AUDIENCE = "motcua"  # MOTCUA_OIDC_AUDIENCE's default, the dev issuer's and the services' alike
DEV_PORTAL_KEY = "dev-portal-key"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def compact(header: dict[str, Any], claims: dict[str, Any], sign: Callable[[bytes], bytes]) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64url(sign(signing_input.encode()))}"


def good_claims(issuer: Issuer, **extra: Any) -> dict[str, Any]:
    """Claims the services would accept, were they signed by the issuer's key."""
    now = int(time.time())
    return {
        "iss": issuer.url,
        "aud": [AUDIENCE],
        "sub": "mallory",
        "roles": ["admin"],
        "iat": now,
        "exp": now + 600,
        **extra,
    }


def current_kid(issuer: Issuer) -> str:
    kid: str = jwt.get_unverified_header(issuer.token("viewer"))["kid"]
    return kid


def public_key_pem(issuer: Issuer, kid: str) -> bytes:
    keys = httpx.get(f"{issuer.url}/jwks.json", timeout=10).json()["keys"]
    jwk = next(k for k in keys if k["kid"] == kid)
    public_key = jwt.PyJWK(jwk).key
    pem: bytes = public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return pem


def foreign_rsa_token(issuer: Issuer, kid: str) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return jwt.encode(good_claims(issuer), key, algorithm="RS256", headers={"kid": kid})


def tampered(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["roles"] = ["admin"]
    return f"{header}.{b64url(json.dumps(claims).encode())}.{signature}"


def refused_tokens(issuer: Issuer, portal_key: str = DEV_PORTAL_KEY) -> dict[str, str]:
    """Each kind of token to refuse with 401 and `error="invalid_token"`, by what is wrong."""
    kid = current_kid(issuer)
    pem = public_key_pem(issuer, kid)
    return {
        "expired beyond the 60 s leeway": issuer.token("admin", expires_in=-90),
        "not valid yet (nbf)": issuer.token("admin", not_before_in=300),
        "signed by a key not in the JWKS": foreign_rsa_token(issuer, f"not-{kid}"),
        "signed by another key under the issuer's kid": foreign_rsa_token(issuer, kid),
        "alg none": compact(
            {"alg": "none", "typ": "JWT", "kid": kid}, good_claims(issuer), lambda _: b""
        ),
        "alg none, no signature part": compact(
            {"alg": "none", "typ": "JWT"}, good_claims(issuer), lambda _: b""
        ).rsplit(".", 1)[0]
        + ".",
        "HS256 with the public key as secret": compact(
            {"alg": "HS256", "typ": "JWT", "kid": kid},
            good_claims(issuer),
            lambda data: hmac.new(pem, data, hashlib.sha256).digest(),
        ),
        "HS256 with any string": compact(
            {"alg": "HS256", "typ": "JWT", "kid": kid},
            good_claims(issuer),
            lambda data: hmac.new(b"secret", data, hashlib.sha256).digest(),
        ),
        "another issuer": issuer.token("admin", issuer="https://id.elsewhere.example"),
        "another audience": issuer.token("admin", audience="another-app"),
        "a portal key": portal_key,
        "malformed": "abc.def",
        "a tampered payload": tampered(issuer.token("viewer")),
    }


def assert_unauthorized(response: httpx.Response, *, invalid_token: bool = True) -> None:
    """401, `WWW-Authenticate: Bearer` (with `error="invalid_token"` when a token was sent) and
    an RFC 9457 problem body."""
    assert response.status_code == 401, response.text
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer ")
    assert ('error="invalid_token"' in challenge) is invalid_token
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 401 and body["title"] == "Unauthorized" and body["detail"]
