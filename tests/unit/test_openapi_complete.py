"""Every service's OpenAPI document describes every route it serves and every status a route can
answer: the partner webhooks (plain Starlette routes, documented by their door), `/healthz`,
`/readyz`, `/metrics`, a 503 with `Retry-After` everywhere (the shared dependency handler), 401
and 403 on the operators' routes, and a request body wherever a POST reads one.

Each registered service is built the way `motcua run` builds it (`bootstrap(Settings())`), by
the deployment inventory (`tests/support/deploy_inventory.py`), in a subprocess with topic
creation, the worker and the server stubbed.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from services.registry import SERVICES as REGISTERED
from tests.support.deploy_inventory import load
from tests.unit.test_deploy_consistency import partitions


def documented_path(path: str) -> str:
    """A route's path as the document names it: without its convertors (`{source}` for a
    route's `{source:path}`)."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", path)


def built() -> dict[str, Any]:
    """Each service's document and routes, from the deployment inventory (its apps are built
    once, in a subprocess, for this test and the deployment consistency test alike)."""
    found = load(partitions())
    return {
        name: {
            "openapi": found["openapi"][name],
            "routes": [
                [documented_path(r["path"]), r["methods"]]
                for r in found["routes"][name]
                if r["methods"]
            ],
        }
        for name in found["openapi"]
    }


# FastAPI's own pages about the document; HEAD is answered wherever GET is.
NOT_DOCUMENTED = {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}
WEBHOOK_PREFIX = "/v1/webhooks/"
OPERATOR_SCHEME = "operatorToken"


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (path, method, operation)
        for path, item in document.get("paths", {}).items()
        for method, operation in item.items()
    ]


SERVICES = sorted(REGISTERED)


@pytest.mark.parametrize("service", SERVICES)
def test_every_route_and_method_is_in_the_document(service: str) -> None:
    app = built()[service]
    paths = app["openapi"].get("paths", {})
    missing = [
        f"{method} {path}"
        for path, methods in app["routes"]
        if path not in NOT_DOCUMENTED
        for method in methods
        if method != "HEAD" and method.lower() not in paths.get(path, {})
    ]
    assert not missing, f"{service}: routes missing from its OpenAPI document: {missing}"
    for path in ("/healthz", "/readyz", "/metrics"):
        assert "get" in paths.get(path, {}), f"{service}: {path} undocumented"


@pytest.mark.parametrize("service", SERVICES)
def test_every_operation_declares_its_success_and_503_with_retry_after(service: str) -> None:
    for path, method, operation in operations(built()[service]["openapi"]):
        responses = operation.get("responses", {})
        assert any(code.startswith(("2", "3")) for code in responses), (
            f"{service}: {method.upper()} {path} declares no success code: {sorted(responses)}"
        )
        unavailable = responses.get("503")
        assert unavailable is not None, f"{service}: {method.upper()} {path} lacks 503"
        if path != "/readyz":  # not ready is a 503 of its own, without Retry-After
            assert "Retry-After" in unavailable.get("headers", {}), (
                f"{service}: {method.upper()} {path}: its 503 does not document Retry-After"
            )


@pytest.mark.parametrize("service", SERVICES)
def test_operator_routes_declare_401_and_403(service: str) -> None:
    for path, method, operation in operations(built()[service]["openapi"]):
        schemes = {name for req in operation.get("security", []) for name in req}
        if OPERATOR_SCHEME in schemes:
            assert {"401", "403"} <= set(operation["responses"]), (
                f"{service}: operator route {method.upper()} {path} lacks 401/403"
            )


def test_some_routes_are_operator_routes() -> None:
    """The check above is not vacuous: the operators' routes do carry the bearer scheme."""
    secured = [
        (service, path)
        for service, app in built().items()
        for path, _, operation in operations(app["openapi"])
        if any(OPERATOR_SCHEME in req for req in operation.get("security", []))
    ]
    assert {service for service, _ in secured} >= {"intake", "metrics", "payments"}


PORTAL_SCHEME = "portalKey"
PORTAL_KEY_ROUTES = [
    ("intake", "post", "/v1/events"),
    *(("portals", method, "/v1/subscription") for method in ("put", "get", "delete")),
    ("portals", "get", "/v1/deliveries"),
    ("portals", "post", "/v1/deliveries/{delivery_id}/redeliver"),
    ("portals", "get", "/v1/dossiers/{dossier_id}"),
]


def test_portal_key_routes_declare_the_portal_key_scheme() -> None:
    """What portals call with their intake key declares the `portalKey` bearer scheme (and not
    the operators'); every other `/v1/` route of portals is an operator's."""
    documents = {service: app["openapi"] for service, app in built().items()}
    for service, method, path in PORTAL_KEY_ROUTES:
        operation = documents[service]["paths"][path][method]
        schemes = {name for req in operation.get("security", []) for name in req}
        assert schemes == {PORTAL_SCHEME}, f"{service}: {method.upper()} {path}: {schemes}"
        assert "401" in operation["responses"]
        scheme = documents[service]["components"]["securitySchemes"][PORTAL_SCHEME]
        assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, method, operation in operations(documents["portals"]):
        if path.startswith("/v1/"):
            schemes = {name for req in operation.get("security", []) for name in req}
            expected = OPERATOR_SCHEME if path.startswith("/v1/admin/") else PORTAL_SCHEME
            assert schemes == {expected}, f"portals: {method.upper()} {path}: {schemes}"


# POST operations that read no body (their input is the path and the query).
NO_BODY = {("metrics", "/v1/admin/dead-letters/{topic}/replay")}


@pytest.mark.parametrize("service", SERVICES)
def test_post_routes_declare_their_request_body(service: str) -> None:
    for path, method, operation in operations(built()[service]["openapi"]):
        if method == "post" and (service, path) not in NO_BODY:
            body = operation.get("requestBody", {})
            assert body.get("content"), f"{service}: POST {path} declares no request body"


@pytest.mark.parametrize(
    ("service", "path"),
    [
        ("postal", "/v1/webhooks/postal/{carrier}"),
        ("sms", "/v1/webhooks/sms/{provider}"),
    ],
)
def test_json_webhooks_document_the_doors_answers_and_the_partners_body(
    service: str, path: str
) -> None:
    operation = built()[service]["openapi"]["paths"][path]["post"]
    assert {"200", "401", "404", "413", "422", "503"} <= set(operation["responses"])
    schema = operation["requestBody"]["content"]["application/json"]["schema"]
    assert schema.get("required"), f"{path}: the partner's body schema names no field"
    (parameter,) = [p for p in operation["parameters"] if p["in"] == "path"]
    assert parameter["schema"]["enum"], "the partner names are listed"


def test_the_bank_ipn_documents_http_200_with_an_rsp_code() -> None:
    item = built()["payments"]["openapi"]["paths"]["/v1/webhooks/payments/{gateway}"]
    assert set(item) == {"get", "post"}
    for operation in item.values():
        ok = operation["responses"]["200"]
        rsp = ok["content"]["application/json"]["schema"]["properties"]["RspCode"]
        assert {"00", "02", "97", "99"} <= set(rsp["enum"])
        assert not {"401", "413", "422"} & set(operation["responses"])
    post = item["post"]["requestBody"]["content"]
    assert {"application/json", "application/x-www-form-urlencoded"} <= set(post)
    query = {p["name"] for p in item["get"]["parameters"] if p["in"] == "query"}
    assert {"vnp_TxnRef", "vnp_SecureHash"} <= query


def test_operation_ids_are_unique() -> None:
    for service, app in built().items():
        ids = [op.get("operationId") for _, _, op in operations(app["openapi"])]
        assert len(ids) == len(set(ids)), f"{service}: duplicate operationIds"
