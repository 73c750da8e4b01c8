"""Who an operator is and what they may do (CONTRACT section 8): pure rules, no I/O.

A verified access token becomes an `Operator`: its `sub`, its roles (claim `roles`) and its
agency scope (claim `agencies`, absent = every agency). Roles are ordered: `viewer` reads metrics
and the dashboard, `finance` also reads payments, reports and refunds, `admin` may do everything.
An agency scope limits a `viewer` or `finance` token; an `admin` token always sees every agency.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any


class Role(StrEnum):
    """The operator roles, from least to most allowed."""

    VIEWER = "viewer"
    FINANCE = "finance"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]


_RANK = {Role.VIEWER: 1, Role.FINANCE: 2, Role.ADMIN: 3}


class InvalidClaims(ValueError):
    """The token's claims do not describe an operator (no `sub`, a malformed `roles`...)."""


@dataclass(frozen=True)
class Operator:
    """A signed-in operator: `agencies` None means every agency."""

    sub: str
    roles: frozenset[Role]
    agencies: frozenset[str] | None = None

    @property
    def highest_role(self) -> Role | None:
        return max(self.roles, key=lambda role: role.rank, default=None)

    @property
    def scope(self) -> frozenset[str] | None:
        """The agencies this operator's figures are limited to; None for every agency."""
        return None if Role.ADMIN in self.roles else self.agencies


def has_role(operator: Operator, required: Role) -> bool:
    """Whether one of the operator's roles is `required` or above it."""
    return any(role.rank >= required.rank for role in operator.roles)


def may_see_agency(operator: Operator, agency: str) -> bool:
    """Whether the operator's scope includes `agency` (a lookup outside it is a 404)."""
    scope = operator.scope
    return scope is None or agency in scope


def visible_agencies(operator: Operator, agencies: Iterable[str]) -> list[str]:
    """`agencies` restricted to the operator's scope, in their order."""
    scope = operator.scope
    return [agency for agency in agencies if scope is None or agency in scope]


def operator_from_claims(claims: Mapping[str, Any]) -> Operator:
    """The operator a verified token's claims describe. Unknown role names are ignored."""
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        raise InvalidClaims("the token has no subject (sub)")
    raw_roles = claims.get("roles", [])
    if not _is_string_list(raw_roles):
        raise InvalidClaims("the claim roles is not a list of strings")
    known = {role.value: role for role in Role}
    roles = frozenset(known[name] for name in raw_roles if name in known)
    raw_agencies = claims.get("agencies")
    if raw_agencies is None:
        return Operator(sub=sub, roles=roles)
    if not _is_string_list(raw_agencies):
        raise InvalidClaims("the claim agencies is not a list of strings")
    return Operator(sub=sub, roles=roles, agencies=frozenset(raw_agencies))


def _is_string_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)
