"""What portals call (CONTRACT section 9), each with its intake key (`Authorization: Bearer`):

- `PUT /v1/subscription` → 200 `{url, types, secret}` (a new secret every time), `GET` → 200
  `{url, types}` (404 when there is none), `DELETE` → 204. The subscription is written to
  `portal.subscriptions` (acks=all) before the answer, and folded into this process's book; the
  other processes read it from the topic. A URL is checked by `urls.py`: its form, then every
  address its host resolves to (422 naming the problem). Each put or delete is one
  `audit.subscription_change` on `audit.events` whose actor is the portal's source (roles
  empty): a portal is no operator, but its subscription decides where its events go, so its own
  changes sit in the same trail as an admin's (`admin.py`); both go through `SubscriptionDesk`.
- `GET /v1/deliveries?status=pending|delivered|failed[&limit=N]` → 200 `{"deliveries": [...]}`,
  newest first; `POST /v1/deliveries/{id}/redeliver` → 202 (a `redeliver` message on
  `portals.callbacks`, applied by the consumer).
- `GET /v1/dossiers/{dossier_id}` → 200, the dossier's summary; 404 for a dossier whose
  `dossier.submitted` came from another source.

Every route declares the `portalKey` bearer scheme in the OpenAPI document (the key itself is
checked here, by `_portal`).

Deliveries and dossiers are answered from the whole changelog of the states, which every process
follows (`view.StatesView`): every process answers for every dossier.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
from fastapi import FastAPI, Query, Request, Security
from fastapi.responses import JSONResponse, Response

from services.common import topics
from services.common.audit import AuditRecorder
from services.common.auth import PORTAL_KEY_BEARER, request_id
from services.common.consumer import INFRASTRUCTURE_ERRORS
from services.common.events import AuditAction
from services.common.kafka import DurablePublisher
from services.common.operators import Operator
from services.common.problems import PROBLEM, problem
from services.common.settings import Portal, hash_key
from services.common.webhooks import BodyTooLarge, read_body
from services.portals import messages, urls
from services.portals.book import SubscriptionBook
from services.portals.domain import Status
from services.portals.subscriptions import (
    MAX_TYPES,
    TYPE_ENTRY_PATTERN,
    Subscription,
    parse_request,
)
from services.portals.view import StatesView

MAX_BODY_BYTES = 64 * 1024
Resolver = Callable[[str, int], Awaitable[list[str]]]


class PortalDirectory(Protocol):
    def find(self, key_sha256: str) -> Portal | None: ...


async def resolve(host: str, port: int) -> list[str]:
    """Every address `host` resolves to (empty when it does not resolve)."""
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _unauthorized() -> JSONResponse:
    response = problem(401, "Unauthorized", "a valid portal key is required (Bearer)")
    response.headers["WWW-Authenticate"] = "Bearer"
    return response


def _invalid(errors: list[tuple[str, str]]) -> JSONResponse:
    return problem(
        422,
        "Invalid subscription",
        "; ".join(f"{where or '/'}: {what}" for where, what in errors),
        errors=[{"pointer": where, "detail": what} for where, what in errors],
    )


def _portal(portals: PortalDirectory, authorization: str | None) -> Portal | None:
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        return None
    return portals.find(hash_key(key.strip()))


def portal_actor(portal: Portal) -> Operator:
    """Who a portal's own change of its subscription is recorded as in the audit trail: its
    source, with no operator role (it signs in with its intake key, not a token)."""
    return Operator(sub=portal.source, roles=frozenset())


class SubscriptionDesk:
    """The one way a subscription is put or deleted, by its portal (`PUT/DELETE
    /v1/subscription`) or by an admin for any portal (`admin.py`): the body and URL checked,
    the record written to `portal.subscriptions` (acks=all) and folded into this process's
    book, and one `audit.subscription_change` recorded (actor the operator's `sub`, or the
    portal's source; target the source; never the secret or the URL)."""

    def __init__(
        self,
        book: SubscriptionBook,
        publisher: DurablePublisher,
        audit: AuditRecorder,
        *,
        dev: bool,
        resolver: Resolver = resolve,
    ) -> None:
        self.book = book
        self.publisher = publisher
        self.audit = audit
        self.dev = dev
        self.resolver = resolver

    async def put(self, source: str, request: Request, actor: Operator) -> Response:
        """200 `{url, types, secret}` (a new secret), or the 413/422 naming the problem."""
        try:
            raw = await read_body(request, MAX_BODY_BYTES)
        except BodyTooLarge:
            return problem(413, "Content Too Large", f"the body is over {MAX_BODY_BYTES} bytes")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return _invalid([("", "the body is not JSON")])
        parsed = parse_request(body)
        if isinstance(parsed, list):
            return _invalid(parsed)
        target = urls.url_problem(parsed.url, dev=self.dev)
        if isinstance(target, str):
            return _invalid([("/url", target)])
        literal = urls.literal_address(target.host.strip("[]"))
        addresses = (
            [str(literal)] if literal is not None else await self.resolver(target.host, target.port)
        )
        why = urls.address_problem(target, addresses, dev=self.dev)
        if why is not None:
            return _invalid([("/url", why)])
        subscription = Subscription(
            source, parsed.url, parsed.types, secrets.token_urlsafe(32), datetime.now(UTC)
        )

        async def write() -> None:
            await self.publisher.publish(
                [(topics.PORTAL_SUBSCRIPTIONS, source.encode(), subscription.encode())]
            )
            self.book.put(subscription)

        await self._audited(actor, source, write, request)
        return JSONResponse(subscription.shown(with_secret=True))

    async def delete(self, source: str, request: Request, actor: Operator) -> Response:
        """204: the subscription's tombstone written (also when there was none: another
        process may have one this one has not read yet)."""

        async def write() -> None:
            await self.publisher.publish([(topics.PORTAL_SUBSCRIPTIONS, source.encode(), None)])
            self.book.delete(source)

        await self._audited(actor, source, write, request)
        return Response(status_code=204)

    async def _audited(
        self,
        actor: Operator,
        source: str,
        write: Callable[[], Awaitable[None]],
        request: Request,
    ) -> None:
        """`write`, then its audit event; a broker away is raised on (the shared handler
        answers 503) after a `failed` event is tried."""
        await self.audit.audited(
            actor,
            AuditAction.SUBSCRIPTION_CHANGE,
            source,
            write,
            request_id=request_id(request),
            errors=INFRASTRUCTURE_ERRORS,
        )


PORTAL_KEY = [Security(PORTAL_KEY_BEARER)]  # declares the scheme; `_portal` checks the key
SUBSCRIPTION_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["url", "types"],
    "properties": {
        "url": {"type": "string", "format": "uri"},
        "types": {
            "type": "array",
            "items": {"type": "string", "pattern": TYPE_ENTRY_PATTERN},
            "minItems": 1,
            "maxItems": MAX_TYPES,
        },
    },
}
# The body of a `PUT` of a subscription, the portal's own or an admin's (`admin.py`).
SUBSCRIPTION_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {"application/json": {"schema": SUBSCRIPTION_SCHEMA}},
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"description": "missing or wrong portal key", "content": {PROBLEM: {}}},
}


def register(
    api: FastAPI,
    *,
    portals: PortalDirectory,
    book: SubscriptionBook,
    states: StatesView,
    publisher: DurablePublisher,
    audit: AuditRecorder,
    dev: bool,
    resolver: Resolver = resolve,
) -> SubscriptionDesk:
    """The portal-facing routes on `api`; returns the desk they write subscriptions through
    (the operators' admin routes, `admin.py`, use the same one)."""
    desk = SubscriptionDesk(book, publisher, audit, dev=dev, resolver=resolver)

    @api.put(
        "/v1/subscription",
        tags=["portals"],
        dependencies=PORTAL_KEY,
        summary="Subscribe to callbacks (a new signing secret every time)",
        openapi_extra=SUBSCRIPTION_BODY,
        responses={
            **ERRORS,
            200: {"description": "subscribed: url, types and the new secret"},
            413: {"description": "body over 64 KiB", "content": {PROBLEM: {}}},
            422: {
                "description": "invalid body or URL, naming the problem",
                "content": {PROBLEM: {}},
            },
        },
    )
    async def put_subscription(request: Request) -> Response:
        """Subscribe (one `audit.subscription_change`, actor the portal's source: see
        `SubscriptionDesk`)."""
        portal = _portal(portals, request.headers.get("authorization"))
        if portal is None:
            return _unauthorized()
        return await desk.put(portal.source, request, portal_actor(portal))

    @api.get(
        "/v1/subscription",
        tags=["portals"],
        dependencies=PORTAL_KEY,
        summary="The portal's subscription (without its secret)",
        responses={
            **ERRORS,
            200: {"description": "url and types"},
            404: {"description": "no subscription", "content": {PROBLEM: {}}},
        },
    )
    async def get_subscription(request: Request) -> Response:
        portal = _portal(portals, request.headers.get("authorization"))
        if portal is None:
            return _unauthorized()
        subscription = book.get(portal.source)
        if subscription is None:
            return problem(404, "Not Found", f"{portal.source} has no subscription")
        return JSONResponse(subscription.shown(with_secret=False))

    @api.delete(
        "/v1/subscription",
        tags=["portals"],
        dependencies=PORTAL_KEY,
        summary="Unsubscribe (no new deliveries; pending ones fail until given up)",
        status_code=204,
        responses={**ERRORS, 204: {"description": "deleted (or there was none)"}},
    )
    async def delete_subscription(request: Request) -> Response:
        """Unsubscribe (one `audit.subscription_change`, actor the portal's source)."""
        portal = _portal(portals, request.headers.get("authorization"))
        if portal is None:
            return _unauthorized()
        return await desk.delete(portal.source, request, portal_actor(portal))

    @api.get(
        "/v1/deliveries",
        tags=["portals"],
        dependencies=PORTAL_KEY,
        summary="The portal's recent deliveries, newest first",
        responses={
            **ERRORS,
            200: {"description": '{"deliveries": [...]}'},
            422: {"description": "an unknown status or limit", "content": {PROBLEM: {}}},
        },
    )
    async def list_deliveries(
        request: Request,
        status: str | None = Query(default=None, description="pending, delivered or failed"),
        limit: str | None = Query(default=None, description="at most this many (1-1000; 100)"),
    ) -> Response:
        portal = _portal(portals, request.headers.get("authorization"))
        if portal is None:
            return _unauthorized()
        wanted: Status | None = None
        if status is not None:
            try:
                wanted = Status(status)
            except ValueError:
                return problem(
                    422,
                    "Invalid query",
                    "status must be pending, delivered or failed",
                    errors=[{"pointer": "/status", "detail": "pending, delivered or failed"}],
                )
        count = 100
        if limit is not None:
            if not limit.isdigit() or not 1 <= int(limit) <= 1000:
                return problem(
                    422,
                    "Invalid query",
                    "limit must be a whole number from 1 to 1000",
                    errors=[{"pointer": "/limit", "detail": "a whole number from 1 to 1000"}],
                )
            count = int(limit)
        return JSONResponse({"deliveries": states.log(portal.source, wanted, count)})

    @api.post(
        "/v1/deliveries/{delivery_id}/redeliver",
        tags=["portals"],
        dependencies=PORTAL_KEY,
        summary="Deliver again (a new series of attempts, the first at once)",
        status_code=202,
        openapi_extra={
            "requestBody": {
                "required": False,
                "description": "none needed: the delivery is named by the path",
                "content": {"application/json": {"schema": {"type": "object"}}},
            }
        },
        responses={
            **ERRORS,
            202: {"description": "accepted: the delivery is pending again"},
            404: {"description": "no such delivery of this portal", "content": {PROBLEM: {}}},
        },
    )
    async def redeliver(delivery_id: str, request: Request) -> Response:
        portal = _portal(portals, request.headers.get("authorization"))
        if portal is None:
            return _unauthorized()
        found = states.delivery(portal.source, delivery_id)
        if found is None:
            return problem(404, "Not Found", f"{portal.source} has no delivery {delivery_id}")
        dossier_id, _ = found
        message = messages.Redeliver(dossier_id, delivery_id, datetime.now(UTC))
        await publisher.publish(
            [(topics.PORTALS_CALLBACKS, dossier_id.encode(), messages.encode(message))]
        )
        return JSONResponse({"id": delivery_id, "status": "pending"}, status_code=202)

    @api.get(
        "/v1/dossiers/{dossier_id}",
        tags=["portals"],
        dependencies=PORTAL_KEY,
        summary="A dossier of this portal: status, payment, postal legs, SMS, overdue",
        responses={
            **ERRORS,
            200: {"description": "the dossier's summary (CONTRACT section 9)"},
            404: {"description": "not a dossier of this portal", "content": {PROBLEM: {}}},
        },
    )
    async def dossier(dossier_id: str, request: Request) -> Response:
        portal = _portal(portals, request.headers.get("authorization"))
        if portal is None:
            return _unauthorized()
        state = states.get(dossier_id)
        if state is None or state.owner != portal.source:
            return problem(404, "Not Found", f"{portal.source} has no dossier {dossier_id}")
        return JSONResponse(state.summary())

    return desk
