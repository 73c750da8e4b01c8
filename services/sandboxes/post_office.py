"""A fake VNPost carrier for dev, demo and tests: the API `partner.VNPostClient` speaks.

It books orders (idempotent by `client_order_id`: the same reference is the same order), walks
each order through VNPost's status codes on a timer, and calls back with signed JSON
(`X-Motcua-Signature`, CONTRACT section 6) to `POSTAL_PUBLIC_URL/v1/webhooks/postal/vnpost`,
retrying until the callback is answered 2xx. Per order it picks a scenario: delivered,
collection failed, delivery failed then delivered, returned to the agency, or stuck (no more
updates). COD money is reported with code 21.

Faults, settable per run by environment (`VNPOST_SANDBOX_*`) or `PUT /sandbox/config`:
duplicate, out-of-order and missing callbacks, errors (HTTP 500 on an API call, before or after
the work is done) and timeouts (the order is booked, the reply comes too late). At run time
only: an outage (`PUT /sandbox/config {"outage": true}`: every API call answers 503) and
`POST /sandbox/tokens/revoke` (every token issued so far answers 401).

For tests: `GET /sandbox/bookings` counts orders per dossier (and create and cancel requests,
tokens issued since the last revoke, 401 answers), with running totals since the start;
`GET /sandbox/orders` lists every order kept with its scenario and what it reported.
A street containing `[scenario:NAME]` forces an order's scenario.

Memory follows the orders in flight: a dossier's orders and counts are forgotten once every one
of its orders is settled (its script is over and no callback is left to send) and
`SANDBOX_RETAIN_SECONDS` passed since the dossier's last change (a status, a callback answered, a
create or cancel request), or earlier beyond `SANDBOX_RETAIN_FINISHED` settled dossiers, the
longest settled first, never before `SANDBOX_RETAIN_MIN_SECONDS` (`sandboxes.retention`). The
totals are running integers and stay. A request about a forgotten order is answered as for any
unknown one: 404 to a query or cancel, a new booking to a create.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.due import DueIndex
from services.common.kept_json import dumps_kept
from services.common.logging import get_logger
from services.common.partner import http_client
from services.common.service import add_operational_routes, always_ready, serve_http
from services.common.settings import Settings
from services.common.signing import SIGNATURE_HEADER, sign_body
from services.postal.carriers import Leg
from services.postal.plans import parse_order_ref
from services.sandboxes.retention import Retention

log = get_logger("motcua.vnpost_sandbox")


class SandboxConfig(BaseSettings):
    """What the fake carrier does; every field can also be changed at run time over HTTP."""

    model_config = SettingsConfigDict(env_prefix="VNPOST_SANDBOX_", env_file=None, extra="ignore")

    step_seconds: float = Field(default=2.0, gt=0)  # between two status codes of one order
    token_ttl_seconds: float = Field(default=3600.0, gt=0)
    client_id: str = "motcua-dev"
    client_secret: str = "dev-vnpost-client-secret"
    seed: int | None = None
    # scenario weights (the rest is delivered)
    collection_fail_rate: float = Field(default=0.1, ge=0, le=1)
    delivery_fail_rate: float = Field(default=0.1, ge=0, le=1)
    return_to_agency_rate: float = Field(default=0.05, ge=0, le=1)
    stuck_rate: float = Field(default=0.0, ge=0, le=1)
    cod_mismatch_rate: float = Field(default=0.0, ge=0, le=1)
    # faults
    duplicate_rate: float = Field(default=0.0, ge=0, le=1)
    out_of_order_rate: float = Field(default=0.0, ge=0, le=1)
    missing_rate: float = Field(default=0.0, ge=0, le=1)
    error_rate: float = Field(default=0.0, ge=0, le=1)
    timeout_rate: float = Field(default=0.0, ge=0, le=1)
    timeout_seconds: float = Field(default=10.0, gt=0)
    callback_attempts: int = Field(default=30, ge=1)
    # At most this many callbacks posted at once (connections to the webhook); read at start.
    callback_connections: int = Field(default=16, ge=1, le=256)


class ConfigPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    step_seconds: float | None = Field(default=None, gt=0)
    token_ttl_seconds: float | None = Field(default=None, gt=0)
    collection_fail_rate: float | None = Field(default=None, ge=0, le=1)
    delivery_fail_rate: float | None = Field(default=None, ge=0, le=1)
    return_to_agency_rate: float | None = Field(default=None, ge=0, le=1)
    stuck_rate: float | None = Field(default=None, ge=0, le=1)
    cod_mismatch_rate: float | None = Field(default=None, ge=0, le=1)
    duplicate_rate: float | None = Field(default=None, ge=0, le=1)
    out_of_order_rate: float | None = Field(default=None, ge=0, le=1)
    missing_rate: float | None = Field(default=None, ge=0, le=1)
    error_rate: float | None = Field(default=None, ge=0, le=1)
    timeout_rate: float | None = Field(default=None, ge=0, le=1)
    timeout_seconds: float | None = Field(default=None, gt=0)
    outage: bool | None = None  # run time only: every API call answers 503, nothing is done


# --- scenarios: which codes an order walks through -------------------------------------------

COD_PAID = 21
SCENARIOS: dict[Leg, dict[str, list[int]]] = {
    Leg.PICKUP: {
        # 21 (COD paid) goes right after 6 (collected) when the order carries COD
        "delivered": [2, 4, 6, 10, 11, 12, 14],
        "collection_failed": [2, 4, 5, 9],
        "delivery_failed": [2, 6, 10, 12, 15, 12, 14],
        # sent back to the applicant (the pickup's sender): the dossier never reaches the agency
        "returned_to_agency": [2, 6, 10, 15, 16, 18, 19],
        "stuck": [2],
    },
    Leg.RETURN: {
        "delivered": [3, 10, 11, 12, 14],  # 21 after 14 with COD
        "collection_failed": [3, 10, 12, 14],  # nothing to collect on a return
        "delivery_failed": [3, 10, 12, 15, 12, 14],
        "returned_to_agency": [3, 10, 12, 15, 16, 18, 19],
        "stuck": [3],
    },
}
_FORCED = re.compile(r"\[scenario:([a-z_]+)\]")


def script(leg: Leg, scenario: str, cod: int) -> list[int]:
    codes = list(SCENARIOS[leg][scenario])
    if cod > 0 and scenario not in ("stuck", "collection_failed"):
        if scenario == "returned_to_agency" and leg is Leg.RETURN:
            return codes  # the result went back unpaid
        after = 6 if leg is Leg.PICKUP else 14
        codes.insert(codes.index(after) + 1, COD_PAID)
    return codes


@dataclass
class Order:
    order_id: str
    client_order_id: str
    dossier_id: str
    leg: Leg
    cod_amount: int
    scenario: str
    codes: list[int]
    history: list[tuple[int, datetime]] = field(default_factory=list)
    cod_reported: int | None = None
    cod_time: datetime | None = None
    cancelled: bool = False
    callbacks_sent: int = 0
    callbacks_dropped: int = 0
    walking: bool = True  # its script still has statuses to report
    deliveries: int = 0  # callbacks started and not answered or given up yet

    @property
    def settled(self) -> bool:
        """Nothing more happens to it: its script is over and every callback is done."""
        return not self.walking and self.deliveries == 0

    def view(self) -> dict[str, Any]:
        return {
            "order_id": self.order_id,
            "client_order_id": self.client_order_id,
            "dossier_id": self.dossier_id,
            "leg": self.leg.value,
            "scenario": self.scenario,
            "codes": self.codes,
            "cod_amount": self.cod_amount,
            "cod_reported": self.cod_reported,
            "history": [[c, t.isoformat()] for c, t in self.history],
            "finished": self.cancelled or len(self.history) >= len(self.codes) + 1,
            "cancelled": self.cancelled,
            "callbacks_sent": self.callbacks_sent,
            "callbacks_dropped": self.callbacks_dropped,
        }


@dataclass
class Dossier:
    """What the carrier keeps about one dossier: its orders (one per leg) and the requests."""

    refs: list[str] = field(default_factory=list)  # client order ids of its orders
    bookings: int = 0  # orders created
    create_requests: int = 0
    cancel_requests: int = 0  # whether the order was found or not


# running totals since the start, kept when the orders they count are forgotten
TOTALS = (
    "orders",
    "create_requests",
    "cancel_requests",
    "callbacks_sent",
    "callbacks_dropped",
    "orders_forgotten",
    "dossiers_forgotten",
)


def utc_now() -> datetime:
    return datetime.now(UTC)


class Carrier:
    """The fake carrier's state and behaviour, behind the HTTP routes.

    `retention` and `clock` decide when a settled dossier is forgotten (`sweep`, run on
    every create, cancel or query request and every read of the sandbox's own routes).
    """

    def __init__(
        self,
        config: SandboxConfig,
        callback_url: str,
        secret: str,
        retention: Retention = Retention(),
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.config = config
        self.callback_url = callback_url
        self.secret = secret
        self.rand = random.Random(config.seed)
        self.retention = retention
        self.clock = clock
        self.orders: dict[str, Order] = {}
        self.by_ref: dict[str, Order] = {}
        self.dossiers: dict[str, Dossier] = {}
        self.retiring = DueIndex()  # settled dossiers by the moment they are forgotten
        self.totals: dict[str, int] = dict.fromkeys(TOTALS, 0)
        self.unauthorized = 0  # API calls answered 401 (no, revoked or expired token)
        self.outage = False
        self.tokens: dict[str, float] = {}  # unexpired tokens by expiry (time.monotonic)
        self.tokens_issued = 0  # since the last revoke
        self.tasks: set[asyncio.Task[None]] = set()
        self._seq = 0
        self._last_time = datetime.now(UTC)
        self.http: httpx.AsyncClient | None = None
        # Callbacks wait for a connection here (order, body, attempt), without a deadline: in
        # the pool they would wait under the request's timeout, and a burst of bookings would
        # turn into a retry storm. At most `callback_connections` senders post them; a waiting
        # callback is its body and a tuple, not a task.
        self.outbox: deque[tuple[Order, bytes, int]] = deque()
        self.senders = 0

    def now(self) -> datetime:
        """Strictly increasing carrier times, so no two statuses of an order share an instant."""
        current = datetime.now(UTC)
        if current <= self._last_time:
            current = self._last_time + timedelta(microseconds=1)
        self._last_time = current
        return current

    def chance(self, rate: float) -> bool:
        return rate > 0 and self.rand.random() < rate

    def spawn(self, coro: Any) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def issue_token(self) -> tuple[str, float]:
        now = time.monotonic()
        while self.tokens:  # expired ones leave, oldest first
            oldest = next(iter(self.tokens))
            if self.tokens[oldest] > now:
                break
            del self.tokens[oldest]
        token = secrets.token_urlsafe(24)
        self.tokens[token] = now + self.config.token_ttl_seconds
        self.tokens_issued += 1
        return token, self.config.token_ttl_seconds

    def revoke_tokens(self) -> int:
        revoked = self.tokens_issued
        self.tokens.clear()
        self.tokens_issued = 0
        return revoked

    def authorized(self, header: str | None) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        expires = self.tokens.get(header.removeprefix("Bearer ").strip())
        return expires is not None and time.monotonic() < expires

    def pick_scenario(self, street: str | None) -> str:
        forced = _FORCED.search(street or "")
        if forced and forced.group(1) in SCENARIOS[Leg.PICKUP]:
            return forced.group(1)
        c = self.config
        weights = [
            ("collection_failed", c.collection_fail_rate),
            ("delivery_failed", c.delivery_fail_rate),
            ("returned_to_agency", c.return_to_agency_rate),
            ("stuck", c.stuck_rate),
        ]
        roll = self.rand.random()
        for name, weight in weights:
            if roll < weight:
                return name
            roll -= weight
        return "delivered"

    # --- what is kept, and for how long ----------------------------------------------------

    def dossier(self, dossier_id: str) -> Dossier:
        found = self.dossiers.get(dossier_id)
        if found is None:
            found = self.dossiers[dossier_id] = Dossier()
        return found

    def settled(self, entry: Dossier) -> bool:
        return all(self.by_ref[ref].settled for ref in entry.refs)

    def changed(self, dossier_id: str) -> None:
        """Something happened to the dossier: once all its orders are settled, it is forgotten
        `retention` after this moment."""
        entry = self.dossiers.get(dossier_id)
        if entry is not None:
            due = self.retention.due(self.clock()) if self.settled(entry) else None
            self.retiring.set(dossier_id, due)

    def sweep(self) -> None:
        """Forget the dossiers due (only those: no scan of what is kept)."""
        for dossier_id in self.retention.forget(self.retiring, self.clock()):
            entry = self.dossiers.get(dossier_id)
            if entry is None or not self.settled(entry):
                continue  # busy again: its next change sets its moment again
            del self.dossiers[dossier_id]
            for ref in entry.refs:
                order = self.by_ref.pop(ref)
                del self.orders[order.order_id]
            self.totals["orders_forgotten"] += len(entry.refs)
            self.totals["dossiers_forgotten"] += 1

    # --- orders ----------------------------------------------------------------------------

    def create(self, ref: str, leg: Leg, dossier_id: str, cod: int, street: str | None) -> Order:
        self.sweep()
        entry = self.dossier(dossier_id)
        entry.create_requests += 1
        self.totals["create_requests"] += 1
        existing = self.by_ref.get(ref)
        if existing is not None:
            self.changed(dossier_id)
            return existing
        self._seq += 1
        scenario = self.pick_scenario(street)
        order = Order(
            order_id=f"VN{self._seq:09d}",
            client_order_id=ref,
            dossier_id=dossier_id,
            leg=leg,
            cod_amount=cod,
            scenario=scenario,
            codes=script(leg, scenario, cod),
        )
        order.history.append((1, self.now()))
        self.orders[order.order_id] = order
        self.by_ref[ref] = order
        entry.refs.append(ref)
        entry.bookings += 1
        self.totals["orders"] += 1
        self.changed(dossier_id)
        self.spawn(self.walk(order)).add_done_callback(lambda _: self.walked(order))
        return order

    async def walk(self, order: Order) -> None:
        await self.report(order, 1, order.history[0][1])
        for code in order.codes:
            await asyncio.sleep(self.config.step_seconds * (0.7 + 0.6 * self.rand.random()))
            if order.cancelled:
                return
            at = self.now()
            order.history.append((code, at))
            amount: int | None = None
            if code == COD_PAID:
                amount = order.cod_amount
                if self.chance(self.config.cod_mismatch_rate):
                    amount = max(0, order.cod_amount - 1000)
                order.cod_reported, order.cod_time = amount, at
            await self.report(order, code, at, amount)

    def walked(self, order: Order) -> None:
        order.walking = False
        self.changed(order.dossier_id)

    def cancel_request(self, ref: str) -> Order | None:
        """A cancel request for our reference `ref`: the order if the carrier has it."""
        self.sweep()
        self.totals["cancel_requests"] += 1
        parsed = parse_order_ref(ref)
        if parsed is not None:
            self.dossier(parsed[0]).cancel_requests += 1
        order = self.by_ref.get(ref)
        if order is not None:
            self.cancel(order)
        if parsed is not None:
            self.changed(parsed[0])
        return order

    def cancel(self, order: Order) -> None:
        if order.cancelled or len(order.history) > 1:
            return  # only an order nobody has touched can be cancelled
        order.cancelled = True
        code = 9 if order.leg is Leg.PICKUP else 22
        at = self.now()
        order.history.append((code, at))
        self.spawn(self.report(order, code, at))

    async def report(
        self, order: Order, code: int, at: datetime, amount: int | None = None
    ) -> None:
        """Send one status callback, with this run's faults."""
        body: dict[str, Any] = {
            "order_id": order.order_id,
            "client_order_id": order.client_order_id,
            "status_code": code,
            "status_time": at.isoformat(),
        }
        if amount is not None:
            body["cod_amount"] = amount
        raw = dumps_kept(body)  # held until the callback is answered
        c = self.config
        if self.chance(c.missing_rate):
            order.callbacks_dropped += 1
            self.totals["callbacks_dropped"] += 1
            return
        if self.chance(c.out_of_order_rate):
            # held back, so the next status overtakes it
            self.send(order, raw, delay=c.step_seconds * 1.6)
        else:
            self.send(order, raw)
        if self.chance(c.duplicate_rate):
            self.send(order, raw, delay=c.step_seconds * 0.3)

    def send(self, order: Order, raw: bytes, delay: float = 0.0) -> None:
        order.deliveries += 1  # counted now: the order is not settled while this is pending
        self.queue(order, raw, 1, delay)

    def queue(self, order: Order, raw: bytes, attempt: int, delay: float = 0.0) -> None:
        """Queue one attempt of a callback (after `delay`), and a sender if one is free."""
        if delay:
            self.spawn(self.queue_later(order, raw, attempt, delay))
            return
        self.outbox.append((order, raw, attempt))
        if self.senders < self.config.callback_connections:
            self.senders += 1
            self.spawn(self.post_queued())

    async def queue_later(self, order: Order, raw: bytes, attempt: int, delay: float) -> None:
        await asyncio.sleep(delay)
        self.queue(order, raw, attempt)

    async def post_queued(self) -> None:
        """One sender: post the queued callbacks, oldest first, until none is left."""
        try:
            while self.outbox:
                order, raw, attempt = self.outbox.popleft()
                try:
                    done = await self.post(order, raw, attempt)
                except Exception:
                    log.exception("callback_failed", order_id=order.order_id)
                    done = True
                if done:
                    self.delivered(order)
        finally:
            self.senders -= 1

    async def post(self, order: Order, raw: bytes, attempt: int) -> bool:
        """One attempt; False when the callback was queued again, after its backoff."""
        assert self.http is not None
        signature = sign_body(raw, self.secret)
        headers = {"content-type": "application/json", SIGNATURE_HEADER: signature}
        try:
            response = await self.http.post(self.callback_url, content=raw, headers=headers)
        except httpx.HTTPError:
            status = None
        else:
            status = response.status_code
        if status is not None and status < 300:
            order.callbacks_sent += 1
            self.totals["callbacks_sent"] += 1
        elif status in (401, 404, 422):
            log.warning("callback_refused", status=status)
        elif attempt < self.config.callback_attempts:
            self.queue(order, raw, attempt + 1, min(5.0, 0.2 * 2 ** min(attempt, 5)))
            return False
        else:
            log.warning("callback_given_up", order_id=order.order_id)
        return True

    def delivered(self, order: Order) -> None:
        order.deliveries -= 1
        self.changed(order.dossier_id)

    def status_of(self, order: Order) -> dict[str, Any]:
        # the shipment's status: COD remittance (21) is reported beside it, not as the status
        code, at = [(c, t) for c, t in order.history if c != COD_PAID][-1]
        found: dict[str, Any] = {
            "order_id": order.order_id,
            "client_order_id": order.client_order_id,
            "status_code": code,
            "status_time": at.isoformat(),
        }
        if order.cod_time is not None:
            found["cod_amount"] = order.cod_reported
            found["cod_time"] = order.cod_time.isoformat()
        return found


class _Address(BaseModel):
    province: str = Field(min_length=1)
    district: str = Field(min_length=1)
    commune: str = Field(min_length=1)
    street: str | None = None


class _CreateOrder(BaseModel):
    client_order_id: str = Field(min_length=3)
    service: Leg
    agency_code: str
    address: _Address
    contact_name: str
    contact_phone: str | None = None
    cod_amount: int = Field(default=0, ge=0)


def create_app(
    settings: Settings,
    config: SandboxConfig | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> FastAPI:
    config = config or SandboxConfig()
    url = settings.postal_public_url.rstrip("/") + "/v1/webhooks/postal/vnpost"
    carrier = Carrier(config, url, settings.vnpost_secrets[0], Retention.of(settings), clock)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        carrier.http = http_client(timeout=10.0, connections=config.callback_connections)
        yield
        for task in list(carrier.tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await carrier.http.aclose()

    api = FastAPI(title="VNPost sandbox (motcua)", lifespan=lifespan)
    api.state.carrier = carrier

    async def faults(after: bool) -> JSONResponse | None:
        """Errors before or after the work, and late replies: the client must cope with all."""
        c = carrier.config
        if carrier.chance(c.error_rate / 2):
            return JSONResponse({"error": "internal error"}, 500)
        if after and carrier.chance(c.timeout_rate):
            await asyncio.sleep(c.timeout_seconds)
        return None

    def unauthorized() -> JSONResponse:
        carrier.unauthorized += 1
        return JSONResponse({"error": "invalid or expired token"}, 401)

    def outage() -> JSONResponse | None:
        if carrier.outage:
            return JSONResponse({"error": "service unavailable"}, 503)
        return None

    add_operational_routes(api, always_ready)

    @api.post("/oauth/token")
    async def token(request: Request) -> JSONResponse:
        if (away := outage()) is not None:
            return away
        body = orjson.loads(await request.body() or b"{}")
        if (
            not isinstance(body, dict)
            or body.get("client_id") != carrier.config.client_id
            or body.get("client_secret") != carrier.config.client_secret
        ):
            return JSONResponse({"error": "invalid_client"}, 401)
        value, ttl = carrier.issue_token()
        return JSONResponse({"access_token": value, "token_type": "Bearer", "expires_in": ttl})

    @api.post("/v1/orders")
    async def create_order(request: Request) -> JSONResponse:
        if (away := outage()) is not None:
            return away
        if not carrier.authorized(request.headers.get("authorization")):
            return unauthorized()
        if (early := await faults(after=False)) is not None:
            return early
        try:
            body = _CreateOrder.model_validate_json(await request.body())
        except ValueError:
            return JSONResponse({"error": "invalid order"}, 422)
        ref = parse_order_ref(body.client_order_id)
        if ref is None or ref[1] is not body.service:
            return JSONResponse({"error": "invalid client_order_id"}, 422)
        order = carrier.create(
            body.client_order_id, body.service, ref[0], body.cod_amount, body.address.street
        )
        if carrier.chance(carrier.config.error_rate / 2):
            return JSONResponse({"error": "internal error"}, 500)  # booked, but we say otherwise
        if (late := await faults(after=True)) is not None:
            return late
        return JSONResponse(
            {
                "order_id": order.order_id,
                "client_order_id": order.client_order_id,
                "status_code": 1,
                "status_time": order.history[0][1].isoformat(),
            }
        )

    @api.post("/v1/orders/cancel")
    async def cancel_order(request: Request) -> JSONResponse:
        if (away := outage()) is not None:
            return away
        if not carrier.authorized(request.headers.get("authorization")):
            return unauthorized()
        body = orjson.loads(await request.body() or b"{}")
        ref = str(body.get("client_order_id")) if isinstance(body, dict) else ""
        order = carrier.cancel_request(ref)
        if order is None:
            return JSONResponse({"error": "order not found"}, 404)
        return JSONResponse({"order_id": order.order_id, "cancelled": order.cancelled})

    @api.get("/v1/orders/{order_id}")
    async def query_order(order_id: str, request: Request) -> JSONResponse:
        if (away := outage()) is not None:
            return away
        if not carrier.authorized(request.headers.get("authorization")):
            return unauthorized()
        if (early := await faults(after=False)) is not None:
            return early
        carrier.sweep()
        order = carrier.orders.get(order_id)
        if order is None:
            return JSONResponse({"error": "order not found"}, 404)
        return JSONResponse(carrier.status_of(order))

    # --- for tests and demos ---

    @api.get("/sandbox/bookings")
    async def bookings() -> dict[str, Any]:
        carrier.sweep()
        kept = carrier.dossiers.items()
        return {
            # per dossier kept (none counted: not listed)
            "orders": {d: e.bookings for d, e in kept if e.bookings},
            "create_requests": {d: e.create_requests for d, e in kept if e.create_requests},
            "cancel_requests": {d: e.cancel_requests for d, e in kept if e.cancel_requests},
            "tokens_issued": carrier.tokens_issued,
            "unauthorized": carrier.unauthorized,
            # since the start, forgotten orders included
            "totals": dict(carrier.totals),
            "kept": {"orders": len(carrier.orders), "dossiers": len(carrier.dossiers)},
        }

    @api.get("/sandbox/orders")
    async def orders() -> list[dict[str, Any]]:
        carrier.sweep()
        return [o.view() for o in carrier.orders.values()]

    def config_view() -> dict[str, Any]:
        return {**carrier.config.model_dump(exclude={"client_secret"}), "outage": carrier.outage}

    @api.get("/sandbox/config")
    async def get_config() -> dict[str, Any]:
        return config_view()

    @api.put("/sandbox/config")
    async def put_config(patch: ConfigPatch) -> dict[str, Any]:
        changes = patch.model_dump(exclude_none=True)
        if (away := changes.pop("outage", None)) is not None:
            carrier.outage = away
        carrier.config = carrier.config.model_copy(update=changes)
        return config_view()

    @api.post("/sandbox/tokens/revoke")
    async def revoke() -> dict[str, int]:
        return {"revoked": carrier.revoke_tokens()}

    return api


def run(settings: Settings) -> None:
    serve_http(create_app(settings), settings, settings.vnpost_sandbox_port)
