"""Subscriptions of any portal (CONTRACT section 8, role `admin`): list, read, put, delete.

`GET /v1/admin/subscriptions` lists every portal's subscription (`source`, `url`, `types`, `at`;
never a secret), `GET /v1/admin/subscriptions/{source}` one of them (404 when it has none).
`PUT /v1/admin/subscriptions/{source}` takes the body of a portal's own `PUT /v1/subscription`,
with the same URL rules, and answers the same 200 `{url, types, secret}`: a new signing secret,
shown this once (the admin hands it to the portal). `DELETE /v1/admin/subscriptions/{source}` is
204. `{source}` is a portal's source, slashes included (`portal/dvc-hanam`); one motcua does not
accept as a portal's is 422. A source need not have a key yet: a subscription can be set up
before its portal's key is issued.

Puts and deletes go through the portal's own code path (`routes.SubscriptionDesk`) and record one
`audit.subscription_change` on `audit.events`: actor the token's `sub`, target the source,
never the secret or the URL.
"""

from __future__ import annotations

from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response

from services.common.auth import OperatorAuth
from services.common.operators import Operator, Role
from services.common.portal_keys import source_problem
from services.common.problems import PROBLEM, problem
from services.portals.book import SubscriptionBook
from services.portals.routes import SUBSCRIPTION_BODY, SubscriptionDesk
from services.portals.subscriptions import Subscription

PATH = "/v1/admin/subscriptions"
ONE = PATH + "/{source:path}"  # a source holds slashes: portal/dvc-hanam


def listed(subscription: Subscription) -> dict[str, Any]:
    return {
        "source": subscription.source,
        **subscription.shown(with_secret=False),
        "at": subscription.at.isoformat(),
    }


def invalid_source(source: str) -> JSONResponse | None:
    why = source_problem(source)
    if why is None:
        return None
    return problem(422, "Invalid source", why, errors=[{"pointer": "/source", "detail": why}])


SOURCE_422: dict[int | str, dict[str, Any]] = {
    422: {"description": "not a portal's source", "content": {PROBLEM: {}}},
}


def register(
    api: FastAPI, auth: OperatorAuth, book: SubscriptionBook, desk: SubscriptionDesk
) -> None:
    """The four subscription endpoints for admins on `api` (refusals answered by
    `install_refusals`)."""
    admin = Depends(auth.requires(Role.ADMIN))

    @api.get(PATH, tags=["admin"])
    async def list_subscriptions(operator: Operator = admin) -> JSONResponse:
        """Every portal's subscription, by source: `{"subscriptions": [{source, url, types,
        at}]}`; no secret."""
        found = sorted(book.by_source.values(), key=lambda s: s.source)
        return JSONResponse({"subscriptions": [listed(s) for s in found]})

    @api.get(
        ONE,
        tags=["admin"],
        responses={
            **SOURCE_422,
            404: {"description": "the portal has no subscription", "content": {PROBLEM: {}}},
        },
    )
    async def get_subscription(source: str, operator: Operator = admin) -> Response:
        """One portal's subscription `{source, url, types, at}`; no secret."""
        if (refused := invalid_source(source)) is not None:
            return refused
        subscription = book.get(source)
        if subscription is None:
            return problem(404, "Not Found", f"{source} has no subscription")
        return JSONResponse(listed(subscription))

    @api.put(
        ONE,
        tags=["admin"],
        openapi_extra=SUBSCRIPTION_BODY,
        responses={
            200: {"description": "subscribed: url, types and the new secret (shown once)"},
            413: {"description": "body over 64 KiB", "content": {PROBLEM: {}}},
            422: {
                "description": "not a portal's source, or an invalid body or URL",
                "content": {PROBLEM: {}},
            },
        },
    )
    async def put_subscription(
        source: str, request: Request, operator: Operator = admin
    ) -> Response:
        """Put a portal's subscription, as the portal's own `PUT /v1/subscription` does: a new
        signing secret, answered this once."""
        if (refused := invalid_source(source)) is not None:
            return refused
        return await desk.put(source, request, operator)

    @api.delete(
        ONE,
        tags=["admin"],
        status_code=204,
        responses={**SOURCE_422, 204: {"description": "deleted (or there was none)"}},
    )
    async def delete_subscription(
        source: str, request: Request, operator: Operator = admin
    ) -> Response:
        """Delete a portal's subscription: no new deliveries; pending ones fail until given
        up."""
        if (refused := invalid_source(source)) is not None:
            return refused
        return await desk.delete(source, request, operator)
