"""Operators' bearer tokens (CONTRACT section 8): verified with PyJWT, answered as RFC 9457.

`TokenVerifier` finds the issuer's keys through `<issuer>/.well-known/openid-configuration`
(fetched once) and its `jwks_uri` (through `jwt.PyJWKClient`: the key set is cached for
`jwks_lifespan_seconds`; a token whose `kid` is not in it fetches the set again, at most once per
`refetch_cooldown_seconds`, so a key rotation at the issuer needs no restart). A token is accepted
when it is RS256 or ES256, signed by a key of that set, `iss` is the configured issuer, `aud`
contains the configured audience, `exp` is in the future (at most 60 s leeway) and `nbf`, when
present, is past. Its claims become an `Operator` (`services.common.operators`). With
`remember_seconds` > 0 the verifier remembers the operator of a token it accepted (at most
`remember_size` tokens, least recently used dropped) for that long and never past the token's
`exp`: a page that sends the same token on every call pays for one verification. PyJWT (with the
X.509 half of `cryptography` it loads, about 2 MiB and 40 modules) is imported by the first token
to verify, so a worker that no operator calls never holds it.

`OperatorAuth.check(request, role)` turns a request into that `Operator` or a problem response:
401 with `WWW-Authenticate: Bearer` (no, malformed, expired or wrongly signed token, another
issuer or audience, `alg: none`, a portal key), 403 (a valid token without the role), 503 (the
issuer cannot be reached to fetch its keys). `OperatorAuth.requires(role)` is the same check as a
FastAPI dependency; `install_refusals(api)` answers its refusals.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import FastAPI, Request, Security
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.responses import Response

from services.common.operators import InvalidClaims, Operator, Role, has_role, operator_from_claims
from services.common.problems import problem
from services.common.settings import Settings

if TYPE_CHECKING:
    import jwt

ALGORITHMS = ("RS256", "ES256")
MAX_LEEWAY_SECONDS = 60
DISCOVERY_PATH = "/.well-known/openid-configuration"
# Seconds a client waits before trying again while the issuer's keys cannot be fetched.
ISSUER_RETRY_AFTER_SECONDS = 5


class TokenRejected(Exception):
    """The token is not one this service accepts (answered 401)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class IssuerUnavailable(Exception):
    """The issuer's discovery document or keys cannot be fetched (answered 503)."""


class TokenVerifier:
    """Verifies access tokens of one issuer for one audience; safe to share between threads."""

    def __init__(
        self,
        issuer: str,
        audience: str,
        *,
        leeway_seconds: float = MAX_LEEWAY_SECONDS,
        jwks_lifespan_seconds: float = 300.0,
        refetch_cooldown_seconds: float = 1.0,
        timeout_seconds: float = 5.0,
        remember_seconds: float = 0.0,
        remember_size: int = 1024,
    ) -> None:
        if not 0 <= leeway_seconds <= MAX_LEEWAY_SECONDS:
            raise ValueError(f"leeway must be between 0 and {MAX_LEEWAY_SECONDS} s")
        self.issuer = issuer
        self.audience = audience
        self.leeway_seconds = leeway_seconds
        self.jwks_lifespan_seconds = jwks_lifespan_seconds
        self.refetch_cooldown_seconds = refetch_cooldown_seconds
        self.timeout_seconds = timeout_seconds
        self._jwks: jwt.PyJWKClient | None = None
        self._lock = threading.Lock()
        self.remember_seconds = remember_seconds
        self.remember_size = remember_size
        # token -> (operator, until: epoch seconds), least recently used first
        self._remembered: OrderedDict[str, tuple[Operator, float]] = OrderedDict()
        self._remembered_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenVerifier:
        return cls(settings.oidc_issuer, settings.oidc_audience)

    def verify(self, token: str) -> Operator:
        """The operator the token describes; `TokenRejected` or `IssuerUnavailable` otherwise.

        May fetch the issuer's discovery document and keys (blocking): from async code use
        `verify_async`.
        """
        import jwt  # on the first token only (see the module's docstring)

        remembered = self._remembered_operator(token)
        if remembered is not None:
            return remembered
        kid = self._kid_of(token)
        try:
            key = self._jwks_client().get_signing_key(kid)
        except jwt.PyJWKClientConnectionError as exc:
            raise IssuerUnavailable(f"the issuer's keys cannot be fetched: {exc}") from exc
        except (jwt.PyJWKClientError, jwt.PyJWKSetError) as exc:
            raise TokenRejected("the token is signed by a key the issuer does not publish") from exc
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=list(ALGORITHMS),
                audience=self.audience,
                issuer=self.issuer,
                leeway=self.leeway_seconds,
                options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError as exc:
            raise TokenRejected("the token has expired") from exc
        except jwt.ImmatureSignatureError as exc:
            raise TokenRejected("the token is not valid yet (nbf)") from exc
        except jwt.InvalidIssuerError as exc:
            raise TokenRejected("the token is from another issuer") from exc
        except jwt.InvalidAudienceError as exc:
            raise TokenRejected("the token is for another audience") from exc
        except jwt.InvalidTokenError as exc:
            raise TokenRejected(f"the token is not valid: {exc}") from exc
        try:
            operator = operator_from_claims(claims)
        except InvalidClaims as exc:
            raise TokenRejected(str(exc)) from exc
        self._remember(token, operator, claims["exp"])
        return operator

    async def verify_async(self, token: str) -> Operator:
        """`verify`, in a worker thread only when the keys have to be fetched first."""
        remembered = self._remembered_operator(token)
        if remembered is not None:
            return remembered
        if self._needs_fetch(token):
            return await asyncio.to_thread(self.verify, token)
        return self.verify(token)

    def _remembered_operator(self, token: str) -> Operator | None:
        if self.remember_seconds <= 0:
            return None
        with self._remembered_lock:
            entry = self._remembered.get(token)
            if entry is None:
                return None
            operator, until = entry
            if time.time() >= until:
                del self._remembered[token]
                return None
            self._remembered.move_to_end(token)
            return operator

    def _remember(self, token: str, operator: Operator, expires: object) -> None:
        if self.remember_seconds <= 0 or not isinstance(expires, int | float):
            return
        until = min(time.time() + self.remember_seconds, float(expires))
        with self._remembered_lock:
            self._remembered[token] = (operator, until)
            self._remembered.move_to_end(token)
            while len(self._remembered) > self.remember_size:
                self._remembered.popitem(last=False)

    def _kid_of(self, token: str) -> str:
        import jwt

        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError as exc:
            raise TokenRejected("the token is not a JWT") from exc
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise TokenRejected(f"the algorithm {alg!r} is not accepted (RS256 or ES256 only)")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenRejected("the token names no key (kid)")
        return kid

    def _needs_fetch(self, token: str) -> bool:
        """Whether verifying would fetch: no key set cached, or none with the token's `kid`."""
        import jwt

        client = self._jwks
        cache = client.jwk_set_cache if client is not None else None
        jwk_set = cache.get() if cache is not None else None
        if jwk_set is None:
            return True
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError:
            return False  # rejected without a fetch
        return all(key.key_id != kid for key in jwk_set.keys)

    def _jwks_client(self) -> jwt.PyJWKClient:
        import jwt

        with self._lock:
            if self._jwks is None:
                self._jwks = jwt.PyJWKClient(
                    self._discover_jwks_uri(),
                    cache_jwk_set=True,
                    lifespan=self.jwks_lifespan_seconds,
                    timeout=self.timeout_seconds,
                    cooldown_duration=self.refetch_cooldown_seconds,
                )
            return self._jwks

    def _discover_jwks_uri(self) -> str:
        url = discovery_url(self.issuer)
        try:
            response = httpx.get(url, timeout=self.timeout_seconds)
            response.raise_for_status()
            document = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise IssuerUnavailable(f"no discovery document at {url}: {exc}") from exc
        return str(checked_discovery(document, self.issuer, ("jwks_uri",))["jwks_uri"])


def discovery_url(issuer: str) -> str:
    return issuer.rstrip("/") + DISCOVERY_PATH


def checked_discovery(document: object, issuer: str, needs: Sequence[str]) -> dict[str, Any]:
    """The issuer's discovery document, if it is `issuer`'s own and names every endpoint in
    `needs`; `IssuerUnavailable` otherwise."""
    url = discovery_url(issuer)
    if not isinstance(document, dict) or document.get("issuer") != issuer:
        raise IssuerUnavailable(f"{url} describes another issuer than {issuer}")
    for name in needs:
        if not isinstance(document.get(name), str) or not document[name]:
            raise IssuerUnavailable(f"{url} names no {name}")
    return document


def request_id(request: Request) -> str:
    """The operator request's `X-Request-Id` (a retried request records the same audit event),
    or a new one."""
    return request.headers.get("x-request-id") or uuid.uuid4().hex


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, None for any other header."""
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def unauthorized(detail: str, *, invalid_token: bool) -> JSONResponse:
    """401 with `WWW-Authenticate: Bearer` (RFC 6750: `invalid_token` when one was sent)."""
    response = problem(401, "Unauthorized", detail)
    challenge = 'Bearer realm="motcua"'
    if invalid_token:
        challenge += ', error="invalid_token"'
    response.headers["WWW-Authenticate"] = challenge
    return response


def forbidden(operator: Operator, role: Role) -> JSONResponse:
    held = ", ".join(sorted(r.value for r in operator.roles)) or "no role"
    return problem(403, "Forbidden", f"this needs the role {role.value}; the token has {held}")


class Refused(Exception):
    """A request `OperatorAuth.requires` refuses, with the problem response to answer."""

    def __init__(self, response: JSONResponse) -> None:
        super().__init__(response.status_code)
        self.response = response


class OperatorAuth:
    """The operator check of a service's endpoints, around one shared `TokenVerifier`."""

    def __init__(self, verifier: TokenVerifier) -> None:
        self.verifier = verifier

    async def check(self, request: Request, role: Role) -> Operator | JSONResponse:
        """The signed-in operator holding `role` (or above), or the 401/403/503 to answer."""
        token = bearer_token(request.headers.get("authorization"))
        if token is None:
            return unauthorized("this needs an operator's bearer token", invalid_token=False)
        try:
            operator = await self.verifier.verify_async(token)
        except TokenRejected as exc:
            return unauthorized(exc.reason, invalid_token=True)
        except IssuerUnavailable as exc:
            return problem(
                503, "Issuer Unavailable", str(exc), retry_after=ISSUER_RETRY_AFTER_SECONDS
            )
        if not has_role(operator, role):
            return forbidden(operator, role)
        return operator

    def requires(self, role: Role) -> Callable[[Request], Awaitable[Operator]]:
        """A FastAPI dependency: the operator, or `Refused` raised (see `install_refusals`)."""

        async def operator(
            request: Request,
            _declared: HTTPAuthorizationCredentials | None = Security(OPERATOR_BEARER),
        ) -> Operator:
            outcome = await self.check(request, role)
            if isinstance(outcome, Operator):
                return outcome
            raise Refused(outcome)

        return operator


# Declares the endpoint's security scheme in `/openapi.json` and `/docs`; it refuses nothing
# itself (`check` does, with the problem bodies of CONTRACT section 8).
OPERATOR_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="operatorToken",
    description="An OpenID Connect access token of the province's issuer (CONTRACT section 8).",
)


# The same, for the routes portals call with their intake key (CONTRACT sections 4 and 9): it
# only declares the scheme; each route checks the key itself (a portal key is no operator's token).
PORTAL_KEY_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="portalKey",
    description="A portal's intake key (CONTRACT sections 4 and 9), not an operator's token.",
)


async def _answer_refusal(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, Refused)
    return exc.response


def install_refusals(api: FastAPI) -> None:
    """Answer the `Refused` raised by `OperatorAuth.requires` dependencies with their problem."""
    api.add_exception_handler(Refused, _answer_refusal)
