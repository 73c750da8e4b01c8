"""Prometheus' scrape token (issue 13, "nothing open that should not be"): `/metrics` of every
service behind `MOTCUA_METRICS_SCRAPE_TOKEN`.

In Kubernetes `/metrics` is served on the port of the APIs, which whoever reaches a pod reaches
(the ingress never routes it). With the token set, a scrape without `Authorization: Bearer
<token>` is **401** (`WWW-Authenticate: Bearer`, an RFC 9457 body), the token compared in
constant time; the route then declares the bearer scheme `scrapeToken` in `/openapi.json`.
Empty (the dev default, and compose's, whose Prometheus scrapes inside its network), `/metrics`
is open and declares no scheme: the bench and the tests scrape it as before.
"""

from __future__ import annotations

import hmac

from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer

from services.common.auth import bearer_token, unauthorized
from services.common.problems import PROBLEM
from services.common.webhooks import PROBLEM_SCHEMA

# Declares the scheme of `/metrics` in `/openapi.json` when the token is set; refuses nothing
# itself (`scrape_refusal` does).
SCRAPE_BEARER = HTTPBearer(
    auto_error=False,
    scheme_name="scrapeToken",
    description="Prometheus' scrape token (MOTCUA_METRICS_SCRAPE_TOKEN), not an operator's.",
)

UNAUTHORIZED_RESPONSE = {
    "description": "no or another scrape token (`WWW-Authenticate: Bearer`)",
    "content": {PROBLEM: {"schema": PROBLEM_SCHEMA}},
}


def scrape_refusal(authorization: str | None, token: str) -> JSONResponse | None:
    """The 401 to answer a scrape sending `authorization` when the scrape token is `token`, or
    None when it may read `/metrics` (always, when `token` is empty)."""
    if not token:
        return None
    sent = bearer_token(authorization)
    if sent is None:
        return unauthorized("/metrics needs the scrape token (bearer)", invalid_token=False)
    if not hmac.compare_digest(sent.encode(), token.encode()):
        return unauthorized("this is not the scrape token", invalid_token=True)
    return None
