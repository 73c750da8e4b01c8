"""Every real operator endpoint refuses what CONTRACT section 8 says it refuses, over real HTTP.

The operator routes are the deployment inventory's (tests/support/deploy_inventory.py: each
service's routes that declare the operators' bearer scheme, with the role their
`OperatorAuth.requires(role)` dependency asks for), never a list kept here: a route added later is
in the matrix without a change to this file. Each service that has such routes runs once, as
`motcua run SERVICE`, on the real broker and Redis, its tokens verified against the dev issuer (a
real OIDC server). For every operator route (method and path, its path parameters filled with a
plausible value):

- no token, another scheme, and every token of `refused_tokens` (expired, not valid yet, a key
  not in the JWKS, `alg: none`, HS256 with the public key as secret, another issuer or audience,
  a portal key, ...) are 401 with `WWW-Authenticate: Bearer` and an RFC 9457 problem body;
- a valid token without the route's role is 403 with a problem body (a viewer on a finance or
  admin route, finance on an admin route, a token with no role anywhere);
- a token with exactly the route's role is neither 401 nor 403, so the refusals above come from
  the operator check itself, not from a route that refuses everything (or does not exist).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from services.common.kafka import ensure_topics
from services.common.operators import Role
from services.common.settings import Settings
from services.common.topics import DOSSIER_EVENTS, declared_topics
from services.dev.embedded import Broker, free_port
from services.registry import SERVICES
from tests.conftest import PORTAL_KEY, service_env
from tests.support.deploy_inventory import load
from tests.support.operators import Issuer
from tests.support.processes import process, wait_http
from tests.support.redis_keys import delete_namespace
from tests.support.refused_tokens import assert_unauthorized, refused_tokens
from tests.unit.test_deploy_consistency import partitions

pytestmark = pytest.mark.integration

TOPIC_PARTITIONS = 2
# The services CONTRACT section 8 (and issue 13) names as having operator endpoints: each must
# have some in the inventory, whatever else has.
NAMED = {"metrics", "payments", "intake"}
# A plausible value for each path parameter, by name; any other parameter gets "1".
PATH_VALUES = {
    "dossier_id": "000.00.12.H34-190304-0001",
    "topic": DOSSIER_EVENTS,
    "key_id": "k-0123456789abcdef",
    "source": "portal/test",
}
PARAMETER = re.compile(r"\{(\w+)(?::\w+)?\}")


@dataclass(frozen=True)
class Route:
    service: str
    method: str
    path: str  # as declared, with its parameters: `/v1/payments/{dossier_id}`
    role: Role | None  # what its `OperatorAuth.requires` dependency asks for

    @property
    def url_path(self) -> str:
        return PARAMETER.sub(lambda m: PATH_VALUES.get(m.group(1), "1"), self.path)

    def __str__(self) -> str:
        return f"{self.service} {self.method} {self.path}"


def operator_routes(inventory: dict[str, Any]) -> dict[str, list[Route]]:
    """Each service's operator routes, one per method: a route declaring the operators' scheme
    or asking for a role (both, when right; `test_the_matrix_covers_every_operator_route` says
    when not)."""
    found: dict[str, list[Route]] = {}
    for service, routes in inventory["routes"].items():
        guarded = [
            Route(service, method, r["path"], Role(r["role"]) if r["role"] else None)
            for r in routes
            if r["operator"] or r["role"]
            for method in r["methods"]
            if method != "HEAD"
        ]
        if guarded:
            found[service] = guarded
    return found


@pytest.fixture(scope="module")
def routes() -> dict[str, list[Route]]:
    return operator_routes(load(partitions()))


def port_variable(service: str) -> str:
    """The environment variable `motcua run SERVICE` reads its port from."""
    alias = Settings.model_fields[SERVICES[service].port_setting].validation_alias
    assert isinstance(alias, str), alias
    return alias


def distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


@pytest.fixture(scope="module")
def urls(
    routes: dict[str, list[Route]],
    broker: Broker,
    redis_url: str,
    issuer: Issuer,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, str]]:
    """Each service with operator routes, started once for the module (all at the same time),
    by its base URL."""
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(TOPIC_PARTITIONS)))
    namespace = f"motcua-test-{uuid.uuid4().hex[:10]}"
    data: Path = tmp_path_factory.mktemp("operator-endpoints")
    started: dict[str, tuple[subprocess.Popen[bytes], str]] = {}
    try:
        with ExitStack() as running:
            for service, port in zip(routes, distinct_ports(len(routes)), strict=True):
                (data / service).mkdir()
                env = service_env(
                    broker,
                    redis_url,
                    namespace,
                    MOTCUA_TOPIC_PARTITIONS=str(TOPIC_PARTITIONS),
                    MOTCUA_OIDC_ISSUER=issuer.url,
                    MOTCUA_DATA_DIR=str(data / service),
                    **{port_variable(service): str(port)},
                )
                proc = running.enter_context(
                    process(["services.cli", "run", service], env, f"operator-endpoints-{service}")
                )
                started[service] = (proc, f"http://127.0.0.1:{port}")
            for proc, url in started.values():
                wait_http(f"{url}/readyz", timeout=120, proc=proc)
            yield {service: url for service, (_, url) in started.items()}
            for proc, _ in started.values():  # all stop at once, not one after the other
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
    finally:
        delete_namespace(redis_url, namespace)


@dataclass(frozen=True)
class Call:
    route: Route
    what: str  # the token, in words
    headers: dict[str, str]
    check: Callable[[httpx.Response], None]


def run(calls: list[Call], urls: dict[str, str]) -> list[str]:
    """Send every call (a few at a time); what went wrong, one line per call."""
    with httpx.Client(timeout=60) as client:

        def send(call: Call) -> str | None:
            route = call.route
            url = f"{urls[route.service]}{route.url_path}"
            response = client.request(route.method, url, headers=call.headers)
            try:
                call.check(response)
            except (AssertionError, KeyError, ValueError) as exc:
                return (
                    f"{route} ({route.url_path}) with {call.what}: {response.status_code} "
                    f"{response.headers.get('www-authenticate')!r} {response.text[:200]!r}: "
                    f"{type(exc).__name__} {exc}"
                )
            return None

        with ThreadPoolExecutor(max_workers=6) as pool:
            return [failure for failure in pool.map(send, calls) if failure is not None]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def unauthorized(*, invalid_token: bool) -> Callable[[httpx.Response], None]:
    def check(response: httpx.Response) -> None:
        assert_unauthorized(response, invalid_token=invalid_token)

    return check


def forbidden(response: httpx.Response) -> None:
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["status"] == 403 and body["title"] == "Forbidden" and body["detail"]
    assert "www-authenticate" not in response.headers


def not_refused(response: httpx.Response) -> None:
    assert response.status_code not in (401, 403)
    assert response.status_code < 500 or response.status_code == 503
    if response.headers.get("content-type") == "application/problem+json":
        assert response.json().get("title") != "Issuer Unavailable"


def all_routes(routes: dict[str, list[Route]]) -> list[Route]:
    return [route for service in sorted(routes) for route in routes[service]]


# -- the tests -----------------------------------------------------------------------------------


def test_the_matrix_covers_every_operator_route(routes: dict[str, list[Route]]) -> None:
    """The inventory finds operator routes where CONTRACT section 8 puts them, each with the role
    it asks for and declaring the operators' scheme, so the matrix below cannot pass empty."""
    inventory = load(partitions())
    assert set(routes) >= NAMED, f"no operator routes found for {NAMED - set(routes)}"
    for service, guarded in routes.items():
        declared = [
            (method, r["path"])
            for r in inventory["routes"][service]
            if r["operator"]
            for method in r["methods"]
            if method != "HEAD"
        ]
        assert 0 < len(declared) == len(guarded), (service, declared, guarded)
        for route in guarded:
            assert route.role is not None, (
                f"{route} declares the operators' scheme but asks for no role through "
                "OperatorAuth.requires"
            )
    roles = {route.role for route in all_routes(routes)}
    assert {Role.VIEWER, Role.FINANCE, Role.ADMIN} <= roles, roles


def test_no_token_or_another_scheme_is_401_on_every_operator_route(
    routes: dict[str, list[Route]], urls: dict[str, str]
) -> None:
    calls = [
        Call(route, what, headers, unauthorized(invalid_token=False))
        for route in all_routes(routes)
        for what, headers in [
            ("no Authorization header", {}),
            ("Basic credentials", {"Authorization": "Basic YWRtaW46YWRtaW4="}),
            ("Bearer and no token", {"Authorization": "Bearer"}),
        ]
    ]
    assert set(urls) == set(routes)
    assert run(calls, urls) == []


def test_every_refused_token_is_401_on_every_operator_route(
    routes: dict[str, list[Route]], urls: dict[str, str], issuer: Issuer
) -> None:
    tokens = refused_tokens(issuer)
    tokens["the portal key the services accept"] = PORTAL_KEY
    calls = [
        Call(route, what, bearer(token), unauthorized(invalid_token=True))
        for route in all_routes(routes)
        for what, token in tokens.items()
    ]
    assert len(calls) == len(tokens) * sum(map(len, routes.values())) > 0
    assert run(calls, urls) == []


def test_a_token_without_the_routes_role_is_403(
    routes: dict[str, list[Route]], urls: dict[str, str], issuer: Issuer
) -> None:
    """A viewer on every finance or admin route, finance on every admin route, a token with no
    role on every route: 403."""
    lower = {Role.FINANCE: [Role.VIEWER], Role.ADMIN: [Role.VIEWER, Role.FINANCE]}
    tokens = {role: issuer.token(role.value, sub=f"{role.value}-endpoints") for role in Role}
    nobody = issuer.token("viewer", roles=[], sub="nobody-endpoints")
    calls = [
        Call(route, f"a {held.value} token", bearer(tokens[held]), forbidden)
        for route in all_routes(routes)
        if route.role is not None
        for held in lower.get(route.role, [])
    ] + [
        Call(route, "a token with no role", bearer(nobody), forbidden)
        for route in all_routes(routes)
    ]
    above_viewer = [r for r in all_routes(routes) if r.role in (Role.FINANCE, Role.ADMIN)]
    assert above_viewer, "no finance or admin route found"
    assert run(calls, urls) == []


def test_a_token_with_the_routes_role_is_let_through(
    routes: dict[str, list[Route]], urls: dict[str, str], issuer: Issuer
) -> None:
    """Exactly the route's role gets past the check (whatever the route answers then: 404 for a
    dossier that does not exist, 422 for a missing body), so each 401 and 403 above is the
    operator check's own."""
    tokens = {role: issuer.token(role.value, sub=f"{role.value}-endpoints") for role in Role}
    calls = [
        Call(route, f"a {route.role.value} token", bearer(tokens[route.role]), not_refused)
        for route in all_routes(routes)
        if route.role is not None
    ]
    assert run(calls, urls) == []
