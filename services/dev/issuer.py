"""A development OpenID Connect issuer (`motcua dev`, tests): port `OIDC_ISSUER_PORT` (8009).

Its issuer identifier is `MOTCUA_OIDC_ISSUER` (the URL it is reached at) and its tokens name the
audience `MOTCUA_OIDC_AUDIENCE`, so the services' `TokenVerifier` accepts them. Signing keys are
generated at start (RS256) and live in memory only.

- `GET /.well-known/openid-configuration`: the discovery document.
- `GET /jwks.json`: the public keys, every key the issuer has signed with since it started.
- `GET /authorize`: the authorization code flow with PKCE (S256 only); a page where the operator
  picks a role, agencies and a name, whose `POST /authorize` redirects to the client's loopback
  `redirect_uri` with a one-use code (60 s).
- `POST /token`: grant `authorization_code`; the code verifier must hash to the challenge.
  Answers an access token (one hour) and an ID token.
- `POST /dev/token` (dev only): an access token straight away, for `motcua token` and tests;
  its lifetime, `nbf`, audience and issuer can be chosen, to make tokens that must be refused.
- `POST /dev/rotate` (dev only): a new signing key (new `kid`, RS256 or ES256) signs from then
  on; the previous keys stay in the JWKS.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from pydantic import BaseModel, Field

from services.common.operators import Role
from services.common.problems import problem
from services.common.service import add_operational_routes, always_ready, serve_http
from services.common.settings import Settings

Algorithm = Literal["RS256", "ES256"]
ACCESS_TOKEN_SECONDS = 3600
CODE_SECONDS = 60
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# RFC 7636 section 4.1: 43 to 128 characters of the unreserved set.
CODE_VERIFIER = re.compile(r"[A-Za-z0-9\-._~]{43,128}")


def s256_challenge(verifier: str) -> str:
    """The PKCE S256 challenge of a code verifier: BASE64URL(SHA-256(verifier)), unpadded."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def verifier_matches(verifier: str, challenge: str) -> bool:
    if not CODE_VERIFIER.fullmatch(verifier):
        return False
    return hmac.compare_digest(s256_challenge(verifier), challenge)


def loopback_redirect(uri: str) -> bool:
    """Whether a redirect URI is an http(s) URL on this machine (the only clients of dev)."""
    parts = urlsplit(uri)
    return parts.scheme in ("http", "https") and parts.hostname in LOOPBACK_HOSTS


def with_query(uri: str, params: dict[str, str]) -> str:
    parts = urlsplit(uri)
    query = "&".join(q for q in (parts.query, urlencode(params)) if q)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))


@dataclass(frozen=True)
class SigningKey:
    kid: str
    algorithm: Algorithm
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

    @classmethod
    def generate(cls, algorithm: Algorithm = "RS256") -> SigningKey:
        private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
        if algorithm == "RS256":
            private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        else:
            private_key = ec.generate_private_key(ec.SECP256R1())
        return cls(kid=uuid.uuid4().hex[:16], algorithm=algorithm, private_key=private_key)

    def public_jwk(self) -> dict[str, Any]:
        public_key = self.private_key.public_key()
        jwk: dict[str, Any]
        if isinstance(public_key, rsa.RSAPublicKey):
            jwk = RSAAlgorithm.to_jwk(public_key, as_dict=True)
        else:
            jwk = ECAlgorithm.to_jwk(public_key, as_dict=True)
        return {**jwk, "kid": self.kid, "use": "sig", "alg": self.algorithm}


@dataclass
class KeyRing:
    """Every key the issuer has had; the last one signs."""

    keys: list[SigningKey] = field(default_factory=lambda: [SigningKey.generate()])

    @property
    def current(self) -> SigningKey:
        return self.keys[-1]

    def rotate(self, algorithm: Algorithm = "RS256") -> SigningKey:
        self.keys.append(SigningKey.generate(algorithm))
        return self.current

    def jwks(self) -> dict[str, Any]:
        return {"keys": [key.public_jwk() for key in self.keys]}

    def sign(self, claims: dict[str, Any]) -> str:
        key = self.current
        return jwt.encode(
            claims, key.private_key, algorithm=key.algorithm, headers={"kid": key.kid}
        )


@dataclass(frozen=True)
class Grant:
    """What the operator chose on the authorize page, waiting for its code to be redeemed."""

    client_id: str
    redirect_uri: str
    code_challenge: str
    sub: str
    roles: tuple[str, ...]
    agencies: tuple[str, ...] | None
    nonce: str | None
    expires_at: float


@dataclass
class DevIssuer:
    issuer: str
    audience: str
    keys: KeyRing = field(default_factory=KeyRing)
    grants: dict[str, Grant] = field(default_factory=dict)

    def access_token(
        self,
        sub: str,
        roles: list[str],
        agencies: list[str] | None,
        *,
        client_id: str = "motcua-cli",
        expires_in: int = ACCESS_TOKEN_SECONDS,
        not_before_in: int | None = None,
        audience: str | None = None,
        issuer: str | None = None,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": issuer or self.issuer,
            "aud": [audience or self.audience],
            "sub": sub,
            "azp": client_id,
            "roles": roles,
            "iat": now,
            "exp": now + expires_in,
            "jti": uuid.uuid4().hex,
        }
        if not_before_in is not None:
            claims["nbf"] = now + not_before_in
        if agencies is not None:
            claims["agencies"] = agencies
        return self.keys.sign(claims)

    def id_token(self, grant: Grant) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer,
            "aud": grant.client_id,
            "sub": grant.sub,
            "name": grant.sub,
            "roles": list(grant.roles),
            "iat": now,
            "exp": now + ACCESS_TOKEN_SECONDS,
        }
        if grant.agencies is not None:
            claims["agencies"] = list(grant.agencies)
        if grant.nonce is not None:
            claims["nonce"] = grant.nonce
        return self.keys.sign(claims)

    def discovery(self) -> dict[str, Any]:
        base = self.issuer.rstrip("/")
        return {
            "issuer": self.issuer,
            "authorization_endpoint": f"{base}/authorize",
            "token_endpoint": f"{base}/token",
            "jwks_uri": f"{base}/jwks.json",
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code"],
            "code_challenge_methods_supported": ["S256"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["RS256", "ES256"],
            "token_endpoint_auth_methods_supported": ["none"],
            "scopes_supported": ["openid", "profile"],
            "claims_supported": ["sub", "name", "roles", "agencies"],
        }

    def issue_code(self, grant: Grant) -> str:
        now = time.time()
        for code in [c for c, g in self.grants.items() if g.expires_at < now]:
            del self.grants[code]
        code = secrets.token_urlsafe(32)
        self.grants[code] = grant
        return code

    def redeem(self, form: dict[str, str]) -> dict[str, Any] | JSONResponse:
        """The token response for an authorization code, or the RFC 6749 error to answer."""
        if form.get("grant_type") != "authorization_code":
            return oauth_error("unsupported_grant_type", "only authorization_code")
        grant = self.grants.pop(form.get("code", ""), None)  # one use, right or wrong
        if grant is None or grant.expires_at < time.time():
            return oauth_error("invalid_grant", "unknown, used or expired code")
        if form.get("client_id", grant.client_id) != grant.client_id:
            return oauth_error("invalid_grant", "the code was issued to another client")
        if form.get("redirect_uri") != grant.redirect_uri:
            return oauth_error("invalid_grant", "redirect_uri differs from the authorize request")
        if not verifier_matches(form.get("code_verifier", ""), grant.code_challenge):
            return oauth_error("invalid_grant", "the code verifier does not match the challenge")
        access = self.access_token(
            grant.sub,
            list(grant.roles),
            None if grant.agencies is None else list(grant.agencies),
            client_id=grant.client_id,
        )
        return {
            "access_token": access,
            "token_type": "Bearer",
            "expires_in": ACCESS_TOKEN_SECONDS,
            "id_token": self.id_token(grant),
            "scope": "openid profile",
        }


def oauth_error(error: str, description: str) -> JSONResponse:
    return JSONResponse(
        {"error": error, "error_description": description},
        status_code=400,
        headers={"Cache-Control": "no-store"},
    )


class DevTokenRequest(BaseModel):
    roles: list[str] = Field(default_factory=lambda: [Role.VIEWER.value])
    agencies: list[str] | None = None
    sub: str = "dev-operator"
    expires_in: int = Field(default=ACCESS_TOKEN_SECONDS, ge=-86400, le=86400)
    not_before_in: int | None = Field(default=None, ge=-86400, le=86400)
    audience: str | None = None
    issuer: str | None = None


class RotateRequest(BaseModel):
    algorithm: Algorithm = "RS256"


AUTHORIZE_PARAMS = (
    "response_type",
    "client_id",
    "redirect_uri",
    "scope",
    "state",
    "nonce",
    "code_challenge",
    "code_challenge_method",
)


def authorize_page(params: dict[str, str]) -> str:
    hidden = "\n".join(
        f'<input type="hidden" name="{name}" value="{html.escape(params.get(name, ""))}">'
        for name in AUTHORIZE_PARAMS
    )
    roles = "\n".join(
        f'<label><input type="radio" name="role" value="{role.value}"'
        f"{' checked' if role is Role.VIEWER else ''}> {role.value}</label><br>"
        for role in Role
    )
    client = html.escape(params.get("client_id", ""))
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>motcua dev sign-in</title></head>
<body>
<h1>motcua development sign-in</h1>
<p>Signing in to <b>{client}</b>. This issuer is for development only: pick who you are.</p>
<form method="post" action="authorize">
{hidden}
<p><label>Name (sub) <input name="sub" value="dev-operator"></label></p>
<fieldset><legend>Role</legend>
{roles}
</fieldset>
<p><label>Agencies (codes separated by commas; empty = every agency)
<input name="agencies" value=""></label></p>
<button type="submit">Sign in</button>
</form>
</body></html>
"""


def authorize_problem(params: dict[str, str]) -> JSONResponse | None:
    """Why an authorize request cannot be served, or None when it can."""
    if params.get("response_type") != "code":
        return problem(400, "Bad Request", "response_type must be code")
    if not params.get("client_id"):
        return problem(400, "Bad Request", "client_id is missing")
    if not loopback_redirect(params.get("redirect_uri", "")):
        return problem(400, "Bad Request", "redirect_uri must be an http(s) URL on this machine")
    if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
        return problem(400, "Bad Request", "PKCE is required: code_challenge with method S256")
    return None


async def read_form(request: Request) -> dict[str, str]:
    body = (await request.body()).decode("utf-8", errors="replace")
    return {name: values[-1] for name, values in parse_qs(body, keep_blank_values=True).items()}


def create_app(settings: Settings) -> FastAPI:
    issuer = DevIssuer(issuer=settings.oidc_issuer, audience=settings.oidc_audience)
    api = FastAPI(title="motcua dev OpenID Connect issuer", version="1")
    api.state.issuer = issuer
    add_operational_routes(api, always_ready)

    @api.get("/.well-known/openid-configuration")
    async def discovery() -> dict[str, Any]:
        return issuer.discovery()

    @api.get("/jwks.json")
    async def jwks() -> dict[str, Any]:
        return issuer.keys.jwks()

    @api.get("/authorize", response_model=None)
    async def authorize(request: Request) -> HTMLResponse | JSONResponse:
        params = dict(request.query_params)
        refused = authorize_problem(params)
        if refused is not None:
            return refused
        return HTMLResponse(authorize_page(params))

    @api.post("/authorize", response_model=None)
    async def sign_in(request: Request) -> RedirectResponse | JSONResponse:
        form = await read_form(request)
        refused = authorize_problem(form)
        if refused is not None:
            return refused
        role = form.get("role", "")
        if role not in {r.value for r in Role}:
            return problem(400, "Bad Request", f"unknown role {role!r}")
        agencies = [a for a in re.split(r"[\s,]+", form.get("agencies", "")) if a]
        grant = Grant(
            client_id=form["client_id"],
            redirect_uri=form["redirect_uri"],
            code_challenge=form["code_challenge"],
            sub=form.get("sub") or "dev-operator",
            roles=(role,),
            agencies=tuple(agencies) or None,
            nonce=form.get("nonce") or None,
            expires_at=time.time() + CODE_SECONDS,
        )
        reply = {"code": issuer.issue_code(grant)}
        if form.get("state"):
            reply["state"] = form["state"]
        return RedirectResponse(with_query(grant.redirect_uri, reply), status_code=303)

    @api.post("/token", response_model=None)
    async def token(request: Request) -> JSONResponse:
        outcome = issuer.redeem(await read_form(request))
        if isinstance(outcome, JSONResponse):
            return outcome
        return JSONResponse(outcome, headers={"Cache-Control": "no-store"})

    @api.post("/dev/token")
    async def dev_token(body: DevTokenRequest) -> dict[str, Any]:
        access = issuer.access_token(
            body.sub,
            body.roles,
            body.agencies,
            expires_in=body.expires_in,
            not_before_in=body.not_before_in,
            audience=body.audience,
            issuer=body.issuer,
        )
        return {"access_token": access, "token_type": "Bearer", "expires_in": body.expires_in}

    @api.post("/dev/rotate")
    async def rotate(body: RotateRequest | None = None) -> dict[str, str]:
        key = issuer.keys.rotate(body.algorithm if body is not None else "RS256")
        return {"kid": key.kid, "algorithm": key.algorithm}

    return api


def run(settings: Settings) -> None:
    serve_http(create_app(settings), settings, settings.oidc_issuer_port)
