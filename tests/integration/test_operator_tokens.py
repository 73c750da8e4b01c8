"""Operators' tokens end to end (CONTRACT section 8), over real HTTP.

The dev issuer (`motcua run oidc-issuer`) runs as a process on a free port; a small FastAPI app
guarded by `OperatorAuth` runs in a thread with uvicorn, its `TokenVerifier` finding the issuer
through its discovery document. Tokens the issuer signs are accepted with the operator they name;
every other kind of token is a 401 with `WWW-Authenticate: Bearer`, a missing role a 403.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import jwt
import pytest
import uvicorn
from cryptography.hazmat.primitives.asymmetric import rsa
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse

from services.common.auth import (
    IssuerUnavailable,
    OperatorAuth,
    TokenRejected,
    TokenVerifier,
    install_refusals,
)
from services.common.operators import Operator, Role
from services.dev.embedded import free_port
from services.dev.issuer import s256_challenge
from tests.support.operators import Issuer
from tests.support.processes import ROOT, process, wait_http
from tests.support.refused_tokens import AUDIENCE, assert_unauthorized, refused_tokens

pytestmark = pytest.mark.integration

REDIRECT = "http://127.0.0.1:8000/auth/callback"


@dataclass(frozen=True)
class Stack:
    issuer: str  # the dev issuer's URL, also its issuer identifier
    api: str  # the guarded app
    verifier: TokenVerifier

    def token(self, **body: Any) -> str:
        response = httpx.post(f"{self.issuer}/dev/token", json=body, timeout=10)
        assert response.status_code == 200, response.text
        token: str = response.json()["access_token"]
        return token

    def get(self, path: str, token: str | None = None, **headers: str) -> httpx.Response:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.get(f"{self.api}{path}", headers=headers, timeout=10)


def guarded_app(verifier: TokenVerifier) -> FastAPI:
    auth = OperatorAuth(verifier)
    api = FastAPI()
    install_refusals(api)

    def described(operator: Operator) -> dict[str, Any]:
        return {
            "sub": operator.sub,
            "roles": sorted(operator.roles),
            "agencies": None if operator.agencies is None else sorted(operator.agencies),
        }

    @api.get("/viewer", response_model=None)
    async def viewer(request: Request) -> dict[str, Any] | JSONResponse:
        outcome = await auth.check(request, Role.VIEWER)
        return outcome if isinstance(outcome, JSONResponse) else described(outcome)

    @api.get("/finance")
    async def finance(operator: Operator = Depends(auth.requires(Role.FINANCE))) -> dict[str, Any]:
        return described(operator)

    @api.get("/admin")
    async def admin(operator: Operator = Depends(auth.requires(Role.ADMIN))) -> dict[str, Any]:
        return described(operator)

    return api


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    issuer_port = free_port()
    issuer = f"http://127.0.0.1:{issuer_port}"
    env = {"OIDC_ISSUER_PORT": str(issuer_port), "MOTCUA_OIDC_ISSUER": issuer}
    with process(["services.cli", "run", "oidc-issuer"], env, "oidc-issuer"):
        wait_http(f"{issuer}/healthz")
        verifier = TokenVerifier(issuer, AUDIENCE)
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(guarded_app(verifier), port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.01)
        try:
            yield Stack(issuer, f"http://127.0.0.1:{port}", verifier)
        finally:
            server.should_exit = True
            thread.join(5)


# -- the tests -----------------------------------------------------------------------------------


def test_the_discovery_document_names_the_issuer_keys_and_pkce(stack: Stack) -> None:
    document = httpx.get(f"{stack.issuer}/.well-known/openid-configuration").json()
    assert document["issuer"] == stack.issuer
    assert document["jwks_uri"] == f"{stack.issuer}/jwks.json"
    assert document["code_challenge_methods_supported"] == ["S256"]
    keys = httpx.get(document["jwks_uri"]).json()["keys"]
    assert [k["alg"] for k in keys][:1] == ["RS256"] and all(k["kid"] for k in keys)
    assert all("d" not in k for k in keys)  # public keys only


def test_a_valid_token_verifies_to_its_operator(stack: Stack) -> None:
    token = stack.token(roles=["finance"], agencies=["STP", "SXD"], sub="alice")
    assert stack.verifier.verify(token) == Operator(
        sub="alice", roles=frozenset({Role.FINANCE}), agencies=frozenset({"STP", "SXD"})
    )
    response = stack.get("/viewer", token)
    assert response.status_code == 200
    assert response.json() == {"sub": "alice", "roles": ["finance"], "agencies": ["STP", "SXD"]}
    assert stack.get("/finance", token).status_code == 200
    unscoped = stack.get("/viewer", stack.token(roles=["viewer"], sub="bob"))
    assert unscoped.json() == {"sub": "bob", "roles": ["viewer"], "agencies": None}


def test_a_token_expired_within_the_leeway_is_still_accepted(stack: Stack) -> None:
    assert stack.get("/viewer", stack.token(roles=["viewer"], expires_in=-20)).status_code == 200


def test_no_token_is_401_with_a_bearer_challenge(stack: Stack) -> None:
    assert_unauthorized(stack.get("/viewer"), invalid_token=False)
    assert_unauthorized(stack.get("/finance"), invalid_token=False)
    basic = stack.get("/admin", Authorization="Basic YWRtaW46YWRtaW4=")
    assert_unauthorized(basic, invalid_token=False)


def test_every_kind_of_wrong_token_is_401(stack: Stack) -> None:
    for reason, token in refused_tokens(Issuer(stack.issuer)).items():
        for path in ("/viewer", "/finance", "/admin"):
            response = stack.get(path, token)
            assert response.status_code == 401, (reason, path, response.text)
            assert_unauthorized(response)
        with pytest.raises(TokenRejected):
            stack.verifier.verify(token)


def test_a_valid_token_without_the_role_is_403(stack: Stack) -> None:
    viewer = stack.token(roles=["viewer"])
    finance = stack.token(roles=["finance"])
    admin = stack.token(roles=["admin"])
    nobody = stack.token(roles=[])
    for token, path in [
        (viewer, "/finance"),
        (viewer, "/admin"),
        (finance, "/admin"),
        (nobody, "/viewer"),
    ]:
        response = stack.get(path, token)
        assert response.status_code == 403, (path, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["status"] == 403 and response.json()["title"] == "Forbidden"
        assert "WWW-Authenticate" not in response.headers
    for token, path in [(finance, "/viewer"), (finance, "/finance"), (admin, "/admin")]:
        assert stack.get(path, token).status_code == 200, path


def test_the_issuer_rotating_its_key_needs_no_restart_of_the_verifier(stack: Stack) -> None:
    before = stack.token(roles=["viewer"], sub="before")
    assert stack.get("/viewer", before).status_code == 200  # the key set is cached now
    old_kid = jwt.get_unverified_header(before)["kid"]
    rotated = httpx.post(f"{stack.issuer}/dev/rotate").json()
    assert rotated["kid"] != old_kid and rotated["algorithm"] == "RS256"
    after = stack.token(roles=["viewer"], sub="after")
    assert jwt.get_unverified_header(after)["kid"] == rotated["kid"]
    time.sleep(stack.verifier.refetch_cooldown_seconds)  # the refetch limit of unknown kids
    assert stack.get("/viewer", after).json()["sub"] == "after"
    assert stack.get("/viewer", before).json()["sub"] == "before"  # the old key stays published


def test_an_es256_key_of_the_issuer_is_accepted(stack: Stack) -> None:
    rotated = httpx.post(f"{stack.issuer}/dev/rotate", json={"algorithm": "ES256"}).json()
    token = stack.token(roles=["admin"], sub="ec")
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": rotated["kid"], "typ": "JWT"}
    time.sleep(stack.verifier.refetch_cooldown_seconds)
    assert stack.get("/admin", token).json()["sub"] == "ec"


def test_an_unreachable_issuer_is_503_not_401() -> None:
    verifier = TokenVerifier(f"http://127.0.0.1:{free_port()}", AUDIENCE, timeout_seconds=1)
    token = jwt.encode(
        {"sub": "x"},
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        algorithm="RS256",
        headers={"kid": "k"},
    )
    with pytest.raises(IssuerUnavailable):
        verifier.verify(token)


# -- the authorization code flow with PKCE -------------------------------------------------------


def authorize(stack: Stack, client: httpx.Client, verifier: str, **form: str) -> str:
    """Open the sign-in page, pick what `form` says; the code the issuer redirects with."""
    params = {
        "response_type": "code",
        "client_id": "motcua-dashboard",
        "redirect_uri": REDIRECT,
        "scope": "openid",
        "state": "st-1",
        "nonce": "n-1",
        "code_challenge": s256_challenge(verifier),
        "code_challenge_method": "S256",
    }
    page = client.get(f"{stack.issuer}/authorize", params=params)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for role in Role:
        assert f'value="{role.value}"' in page.text
    signed_in = client.post(f"{stack.issuer}/authorize", data={**params, **form})
    assert signed_in.status_code == 303, signed_in.text
    location = urlsplit(signed_in.headers["location"])
    assert f"{location.scheme}://{location.netloc}{location.path}" == REDIRECT
    query = parse_qs(location.query)
    assert query["state"] == ["st-1"]
    code: str = query["code"][0]
    return code


def redeem(stack: Stack, client: httpx.Client, code: str, verifier: str) -> httpx.Response:
    return client.post(
        f"{stack.issuer}/token",
        data={
            "grant_type": "authorization_code",
            "code": code,
            "redirect_uri": REDIRECT,
            "client_id": "motcua-dashboard",
            "code_verifier": verifier,
        },
    )


def test_the_pkce_code_flow_signs_an_operator_in(stack: Stack) -> None:
    code_verifier = secrets.token_urlsafe(48)
    with httpx.Client(follow_redirects=False, timeout=10) as client:
        code = authorize(
            stack, client, code_verifier, role="finance", agencies="STP, SXD", sub="carol"
        )
        response = redeem(stack, client, code, code_verifier)
        assert response.status_code == 200, response.text
        assert response.headers["cache-control"] == "no-store"
        tokens = response.json()
        assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == 3600
        assert stack.verifier.verify(tokens["access_token"]) == Operator(
            sub="carol", roles=frozenset({Role.FINANCE}), agencies=frozenset({"STP", "SXD"})
        )
        assert stack.get("/finance", tokens["access_token"]).status_code == 200
        id_token = jwt.decode(tokens["id_token"], options={"verify_signature": False})
        assert id_token["aud"] == "motcua-dashboard" and id_token["nonce"] == "n-1"
        again = redeem(stack, client, code, code_verifier)  # a code is good once
        assert again.status_code == 400 and again.json()["error"] == "invalid_grant"


def test_the_pkce_code_flow_refuses_a_wrong_verifier(stack: Stack) -> None:
    code_verifier = secrets.token_urlsafe(48)
    with httpx.Client(follow_redirects=False, timeout=10) as client:
        code = authorize(stack, client, code_verifier, role="admin", agencies="")
        wrong = redeem(stack, client, code, secrets.token_urlsafe(48))
        assert wrong.status_code == 400 and wrong.json()["error"] == "invalid_grant"
        assert "access_token" not in wrong.json()
        # the code is spent by the failed attempt: the right verifier comes too late
        assert redeem(stack, client, code, code_verifier).status_code == 400
        code = authorize(stack, client, code_verifier, role="admin", agencies="")
        response = redeem(stack, client, code, code_verifier)
        assert response.status_code == 200
        admin = stack.verifier.verify(response.json()["access_token"])
        assert admin.roles == frozenset({Role.ADMIN}) and admin.agencies is None


def test_the_authorize_request_needs_pkce_and_a_loopback_redirect(stack: Stack) -> None:
    base = {
        "response_type": "code",
        "client_id": "motcua-dashboard",
        "redirect_uri": REDIRECT,
        "code_challenge": s256_challenge(secrets.token_urlsafe(48)),
        "code_challenge_method": "S256",
    }
    assert httpx.get(f"{stack.issuer}/authorize", params=base).status_code == 200
    for change in [
        {"code_challenge_method": "plain"},
        {"code_challenge": ""},
        {"redirect_uri": "https://evil.example/callback"},
        {"response_type": "token"},
    ]:
        response = httpx.get(f"{stack.issuer}/authorize", params={**base, **change})
        assert response.status_code == 400, change
        assert response.headers["content-type"] == "application/problem+json"


# -- motcua token ---------------------------------------------------------------------------------


def motcua_token(*args: str, issuer: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "token", *args],
        cwd=ROOT,
        env={**os.environ, "MOTCUA_OIDC_ISSUER": issuer},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_motcua_token_prints_a_token_the_services_accept(stack: Stack) -> None:
    result = motcua_token("--role", "finance", "--agency", "STP", issuer=stack.issuer)
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert stack.verifier.verify(token) == Operator(
        sub="dev-operator", roles=frozenset({Role.FINANCE}), agencies=frozenset({"STP"})
    )
    claims = jwt.decode(token, options={"verify_signature": False})
    assert claims["exp"] - claims["iat"] == 3600
    unscoped = motcua_token("--role", "admin", issuer=stack.issuer)
    assert stack.verifier.verify(unscoped.stdout.strip()).agencies is None


def test_motcua_token_says_when_no_issuer_runs() -> None:
    result = motcua_token("--role", "viewer", issuer=f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 1
    assert "start `motcua dev`" in result.stderr and "Traceback" not in result.stderr
    unknown = motcua_token("--role", "root", issuer="http://127.0.0.1:1")
    assert unknown.returncode == 2 and "unknown role" in unknown.stderr
