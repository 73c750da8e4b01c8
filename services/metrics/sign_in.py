"""The dashboard's sign-in (CONTRACT section 8): the authorization code flow with PKCE (S256)
against the issuer `MOTCUA_OIDC_ISSUER`, for the public client `METRICS_DASHBOARD_CLIENT_ID`.

- `GET /auth/config` (open): the issuer, the client id, and the issuer's authorization endpoint
  (and end-session endpoint, when it has one) from its discovery document
  (`<issuer>/.well-known/openid-configuration`, read once). The page builds the authorize
  request from it; the PKCE verifier and the `state` stay in the browser's sessionStorage.
- `POST /auth/token` (open) `{"code", "code_verifier", "redirect_uri"}`: the issuer's token
  response for that code, exchanged at its token endpoint. The service makes the exchange so the
  identity provider needs no cross-origin rule for the dashboard; a code is worth nothing without
  the verifier that only the browser which asked for it holds.

The page keeps the access token in sessionStorage and sends it as `Authorization: Bearer` on every
API call; the API checks it (`services.common.auth`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from services.common.auth import (
    ISSUER_RETRY_AFTER_SECONDS,
    IssuerUnavailable,
    checked_discovery,
    discovery_url,
)
from services.common.problems import problem

SCOPE = "openid profile"


class CodeExchange(BaseModel):
    code: str
    code_verifier: str
    redirect_uri: str


class IssuerEndpoints:
    """The issuer's endpoints, from its discovery document (fetched once it answers)."""

    def __init__(self, issuer: str, timeout_seconds: float = 5.0) -> None:
        self.issuer = issuer
        self.timeout_seconds = timeout_seconds
        self._document: dict[str, Any] | None = None
        self._lock = asyncio.Lock()

    async def document(self) -> dict[str, Any]:
        async with self._lock:
            if self._document is None:
                self._document = await self._fetch()
            return self._document

    async def _fetch(self) -> dict[str, Any]:
        url = discovery_url(self.issuer)
        try:
            async with httpx.AsyncClient(timeout=self.timeout_seconds) as client:
                response = await client.get(url)
                response.raise_for_status()
                document = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise IssuerUnavailable(f"no discovery document at {url}: {exc}") from exc
        return checked_discovery(
            document, self.issuer, ("authorization_endpoint", "token_endpoint")
        )


def unreachable(exc: IssuerUnavailable) -> JSONResponse:
    return problem(503, "Issuer Unavailable", str(exc), retry_after=ISSUER_RETRY_AFTER_SECONDS)


def register(api: FastAPI, issuer: str, client_id: str) -> None:
    """`GET /auth/config` and `POST /auth/token`, both open (they hand out no figure)."""
    endpoints = IssuerEndpoints(issuer)

    @api.get(
        "/auth/config",
        tags=["dashboard"],
        response_class=JSONResponse,
        responses={
            200: {"description": "the issuer, client id, scope and the issuer's endpoints"},
            503: {"description": "the issuer did not answer; see Retry-After"},
        },
    )
    async def config() -> JSONResponse:
        try:
            document = await endpoints.document()
        except IssuerUnavailable as exc:
            return unreachable(exc)
        return JSONResponse(
            {
                "issuer": issuer,
                "client_id": client_id,
                "scope": SCOPE,
                "authorization_endpoint": document["authorization_endpoint"],
                "end_session_endpoint": document.get("end_session_endpoint"),
            },
            headers={"Cache-Control": "no-store"},
        )

    @api.post(
        "/auth/token",
        tags=["dashboard"],
        response_class=JSONResponse,
        responses={
            200: {"description": "the issuer's tokens for the code (PKCE)"},
            400: {"description": "the issuer's own refusal (its status and body, passed on)"},
            401: {"description": "the issuer's own refusal (its status and body, passed on)"},
            503: {"description": "the issuer did not answer; see Retry-After"},
        },
    )
    async def token(exchange: CodeExchange) -> JSONResponse:
        try:
            document = await endpoints.document()
        except IssuerUnavailable as exc:
            return unreachable(exc)
        form = {
            "grant_type": "authorization_code",
            "client_id": client_id,
            "code": exchange.code,
            "code_verifier": exchange.code_verifier,
            "redirect_uri": exchange.redirect_uri,
        }
        try:
            async with httpx.AsyncClient(timeout=endpoints.timeout_seconds) as client:
                response = await client.post(document["token_endpoint"], data=form)
            body = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            return unreachable(IssuerUnavailable(f"the token endpoint did not answer: {exc}"))
        return JSONResponse(
            body, status_code=response.status_code, headers={"Cache-Control": "no-store"}
        )
