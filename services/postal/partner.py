"""The `vnpost` carrier adapter (httpx): book, cancel and query orders.

The VNPost-style API this speaks (the sandbox implements the same):

- `POST /oauth/token` `{"client_id", "client_secret"}` → `{"access_token", "expires_in"}`; a
  token is cached until shortly before it expires, and refreshed once when an order call
  answers 401 (revoked or expired early); the call is then retried once with the new token, and
  a second 401 fails it as retryable (the scan sends a booking again later).
- `POST /v1/orders` with `Idempotency-Key: <order ref>` and `client_order_id = <order ref>`
  → `{"order_id", "client_order_id", "status_code", "status_time"}`. The carrier returns the
  same order for the same reference, so a retry or a re-sent booking never books twice.
- `POST /v1/orders/cancel` `{"client_order_id", "order_id"?}`.
- `GET /v1/orders/{order_id}` → the order's latest status, plus `cod_amount`/`cod_time` once
  COD money was collected.

An order's status comes back as the same shape as a status callback (`callback_bodies.py`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import httpx
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, ValidationError

from services.common.partner import PartnerClient, PartnerError, RetryPolicy
from services.postal.callback_bodies import VNPostCallbackBody, callback_from_body
from services.postal.commands import BookOrder, CancelOrder, QueryOrder
from services.postal.inputs import CarrierCallback
from services.postal.plans import Address


@dataclass(frozen=True)
class CreatedOrder:
    order_id: str
    at: datetime


class CarrierRejected(Exception):
    """The carrier refused a request for good (4xx other than 401/408/429)."""

    def __init__(self, reason: str, status: int | None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Carrier(Protocol):
    """What the shell needs from any carrier; a second carrier implements this and a mapping."""

    name: str

    async def create(self, order: BookOrder) -> CreatedOrder: ...

    async def cancel(self, order: CancelOrder) -> None: ...

    async def query(self, order: QueryOrder) -> list[CarrierCallback]: ...

    async def aclose(self) -> None: ...


class _CreateResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    order_id: str = Field(min_length=1)
    status_time: AwareDatetime


class _QueryResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    order_id: str = Field(min_length=1)
    client_order_id: str
    status_code: StrictInt | str
    status_time: AwareDatetime
    cod_amount: StrictInt | None = None
    cod_time: AwareDatetime | None = None


class VNPostClient:
    """Create, cancel and query VNPost orders with a cached, refreshed bearer token."""

    name = "vnpost"

    def __init__(
        self,
        base_url: str,
        client_id: str,
        client_secret: str,
        *,
        timeout: float = 5.0,
        retry: RetryPolicy | None = None,
        token_margin_seconds: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = PartnerClient(base_url, timeout=timeout, retry=retry, transport=transport)
        self._client_id = client_id
        self._client_secret = client_secret
        self._margin = token_margin_seconds
        self._clock = clock
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = asyncio.Lock()
        self.token_fetches = 0  # how often a token was requested (for tests and metrics)

    async def _bearer(self, *, refused: str | None = None) -> str:
        """The cached token, or a new one when there is none, it expired, or it is `refused`
        (the carrier answered 401 to it): calls refused at once share one new token."""
        async with self._token_lock:
            if (
                self._token is None
                or self._token == refused
                or self._clock() >= self._token_expires
            ):
                response = await self._http.request(
                    "POST",
                    "/oauth/token",
                    json={"client_id": self._client_id, "client_secret": self._client_secret},
                )
                body = response.json()
                token = body.get("access_token") if isinstance(body, dict) else None
                if not isinstance(token, str) or not token:
                    raise PartnerError("token response without access_token", retryable=True)
                ttl = float(body.get("expires_in", 300))
                self._token = token
                self._token_expires = self._clock() + max(1.0, ttl - min(self._margin, ttl / 2))
                self.token_fetches += 1
            assert self._token is not None
            return self._token

    async def _call(
        self, method: str, path: str, *, idempotency_key: str | None = None, json: Any = None
    ) -> httpx.Response:
        """One authenticated call; a 401 refreshes the token once. Maps 4xx to CarrierRejected."""
        token: str | None = None
        for attempt in (1, 2):
            token = await self._bearer(refused=token)
            try:
                return await self._http.request(
                    method,
                    path,
                    idempotency_key=idempotency_key,
                    json=json,
                    headers={"Authorization": f"Bearer {token}"},
                )
            except PartnerError as exc:
                if exc.status == 401 and attempt == 1:
                    continue
                if exc.status == 401:
                    # a fresh token refused too: the carrier's auth, not the order, is at fault;
                    # fail this call (no loop) as one to try again later, never as a refusal
                    raise PartnerError(
                        "token refused right after a refresh", retryable=True, status=401
                    ) from exc
                if not exc.retryable and exc.status is not None:
                    raise CarrierRejected(f"http_{exc.status}", exc.status) from exc
                raise
        raise AssertionError("unreachable")

    async def create(self, order: BookOrder) -> CreatedOrder:
        """Book `order`, its personal fields in clear (`personal.PersonalData.clear_order`)."""
        address = order.address
        if not isinstance(address, Address):
            raise TypeError("a sealed address is opened before the carrier call")
        payload = {
            "client_order_id": order.order_ref,
            "service": order.leg.value,
            "agency_code": order.agency_code,
            "address": {
                "province": address.province,
                "district": address.district,
                "commune": address.commune,
                "street": address.street,
            },
            "contact_name": order.contact_name,
            "contact_phone": order.contact_phone,
            "cod_amount": order.cod_amount_vnd,
        }
        response = await self._call(
            "POST", "/v1/orders", idempotency_key=order.order_ref, json=payload
        )
        try:
            created = _CreateResponse.model_validate_json(response.content)
        except ValidationError:
            raise PartnerError("unreadable create response", retryable=True) from None
        return CreatedOrder(order_id=created.order_id, at=created.status_time)

    async def cancel(self, order: CancelOrder) -> None:
        payload: dict[str, Any] = {"client_order_id": order.order_ref}
        if order.order_id:
            payload["order_id"] = order.order_id
        await self._call(
            "POST", "/v1/orders/cancel", idempotency_key=f"cancel:{order.order_ref}", json=payload
        )

    async def query(self, order: QueryOrder) -> list[CarrierCallback]:
        """The order's latest status as callbacks (a second one when COD money was collected)."""
        response = await self._call("GET", f"/v1/orders/{order.order_id}")
        try:
            found = _QueryResponse.model_validate_json(response.content)
        except ValidationError:
            raise PartnerError("unreadable query response", retryable=True) from None
        callbacks: list[CarrierCallback] = []
        if str(found.status_code).strip() != "21":  # COD paid without an amount says nothing
            status = VNPostCallbackBody(
                order_id=found.order_id,
                client_order_id=found.client_order_id,
                status_code=found.status_code,
                status_time=found.status_time,
            )
            callbacks.append(callback_from_body(self.name, status))
        if found.cod_amount is not None and found.cod_time is not None:
            cod = VNPostCallbackBody(
                order_id=found.order_id,
                client_order_id=found.client_order_id,
                status_code=21,
                status_time=found.cod_time,
                cod_amount=found.cod_amount,
            )
            callbacks.append(callback_from_body(self.name, cod))
        return callbacks

    async def aclose(self) -> None:
        await self._http.aclose()
