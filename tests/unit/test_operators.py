"""The operators' role and agency rules (CONTRACT section 8), the bearer header and PKCE S256."""

from __future__ import annotations

import pytest

from services.common.auth import bearer_token
from services.common.operators import (
    InvalidClaims,
    Operator,
    Role,
    has_role,
    may_see_agency,
    operator_from_claims,
    visible_agencies,
)
from services.dev.issuer import loopback_redirect, s256_challenge, verifier_matches


def operator(*roles: Role, agencies: set[str] | None = None) -> Operator:
    return Operator(
        sub="op", roles=frozenset(roles), agencies=None if agencies is None else frozenset(agencies)
    )


@pytest.mark.parametrize(
    ("held", "required", "allowed"),
    [
        (Role.VIEWER, Role.VIEWER, True),
        (Role.VIEWER, Role.FINANCE, False),
        (Role.VIEWER, Role.ADMIN, False),
        (Role.FINANCE, Role.VIEWER, True),
        (Role.FINANCE, Role.FINANCE, True),
        (Role.FINANCE, Role.ADMIN, False),
        (Role.ADMIN, Role.VIEWER, True),
        (Role.ADMIN, Role.FINANCE, True),
        (Role.ADMIN, Role.ADMIN, True),
    ],
)
def test_roles_are_ordered_viewer_finance_admin(held: Role, required: Role, allowed: bool) -> None:
    assert has_role(operator(held), required) is allowed


def test_no_role_allows_nothing_and_the_highest_of_several_roles_counts() -> None:
    assert not any(has_role(operator(), role) for role in Role)
    assert operator().highest_role is None
    both = operator(Role.VIEWER, Role.ADMIN)
    assert both.highest_role is Role.ADMIN
    assert has_role(both, Role.ADMIN)


def test_an_agency_scope_limits_viewer_and_finance_to_their_agencies() -> None:
    for role in (Role.VIEWER, Role.FINANCE):
        scoped = operator(role, agencies={"STP", "SXD"})
        assert scoped.scope == frozenset({"STP", "SXD"})
        assert may_see_agency(scoped, "STP") and may_see_agency(scoped, "SXD")
        assert not may_see_agency(scoped, "SYT")
        assert visible_agencies(scoped, ["SYT", "SXD", "STP", "UBND"]) == ["SXD", "STP"]


def test_no_agency_claim_means_every_agency_and_an_empty_one_means_none() -> None:
    unscoped = operator(Role.VIEWER)
    assert unscoped.scope is None
    assert may_see_agency(unscoped, "SYT")
    assert visible_agencies(unscoped, ["SYT", "STP"]) == ["SYT", "STP"]
    nothing = operator(Role.VIEWER, agencies=set())
    assert not may_see_agency(nothing, "SYT")
    assert visible_agencies(nothing, ["SYT", "STP"]) == []


def test_an_admin_sees_every_agency_even_with_an_agency_claim() -> None:
    admin = operator(Role.ADMIN, agencies={"STP"})
    assert admin.scope is None
    assert may_see_agency(admin, "SYT")


def test_claims_become_an_operator() -> None:
    claims = {"sub": "alice", "roles": ["finance", "auditor"], "agencies": ["STP", "SXD"]}
    assert operator_from_claims(claims) == Operator(
        sub="alice", roles=frozenset({Role.FINANCE}), agencies=frozenset({"STP", "SXD"})
    )
    assert operator_from_claims({"sub": "bob", "roles": ["viewer"]}) == Operator(
        sub="bob", roles=frozenset({Role.VIEWER}), agencies=None
    )
    assert operator_from_claims({"sub": "carol"}).roles == frozenset()


@pytest.mark.parametrize(
    "claims",
    [
        {"roles": ["admin"]},
        {"sub": "", "roles": ["admin"]},
        {"sub": 7, "roles": ["admin"]},
        {"sub": "alice", "roles": "admin"},
        {"sub": "alice", "roles": ["admin", 3]},
        {"sub": "alice", "roles": ["viewer"], "agencies": "STP"},
        {"sub": "alice", "roles": ["viewer"], "agencies": [1]},
    ],
)
def test_malformed_claims_are_refused(claims: dict[str, object]) -> None:
    with pytest.raises(InvalidClaims):
        operator_from_claims(claims)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        ("Bearer abc.def.ghi", "abc.def.ghi"),
        ("bearer  abc", "abc"),
        ("Bearer", None),
        ("Bearer   ", None),
        ("Basic dXNlcjpwYXNz", None),
        ("", None),
        (None, None),
    ],
)
def test_the_bearer_token_of_an_authorization_header(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_pkce_s256_is_the_rfc_7636_example() -> None:
    verifier = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"
    challenge = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
    assert s256_challenge(verifier) == challenge
    assert verifier_matches(verifier, challenge)
    assert not verifier_matches(verifier[:-1] + "l", challenge)
    assert not verifier_matches("short", s256_challenge("short"))  # under 43 characters


def test_the_dev_issuer_redirects_to_this_machine_only() -> None:
    assert loopback_redirect("http://127.0.0.1:8000/callback")
    assert loopback_redirect("http://localhost:8000/")
    assert not loopback_redirect("https://evil.example/callback")
    assert not loopback_redirect("javascript:alert(1)")
    assert not loopback_redirect("")


def test_an_endpoint_that_requires_an_operator_declares_its_security_scheme() -> None:
    from fastapi import Depends, FastAPI

    from services.common.auth import OperatorAuth, TokenVerifier

    auth = OperatorAuth(TokenVerifier("http://127.0.0.1:1", audience="motcua"))
    api = FastAPI()

    @api.get("/guarded")
    async def guarded(operator: Operator = Depends(auth.requires(Role.VIEWER))) -> str:
        return operator.sub

    @api.get("/open")
    async def open_route() -> str:
        return "ok"

    spec = api.openapi()
    assert spec["paths"]["/guarded"]["get"]["security"] == [{"operatorToken": []}]
    assert "security" not in spec["paths"]["/open"]["get"]
    assert spec["components"]["securitySchemes"]["operatorToken"]["scheme"] == "bearer"
