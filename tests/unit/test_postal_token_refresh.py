"""The VNPost client's bearer token: cached, refreshed once when an order call answers 401, and
the call retried once with the new token; a second 401 right after the refresh ends the call
(a failure to try again later, never a loop and never a refusal of the order). The carrier is
played by `httpx.MockTransport` through `PartnerClient`'s transport seam."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import orjson
import pytest

from services.common.partner import IDEMPOTENCY_HEADER, PartnerError, RetryPolicy
from services.postal.carriers import Leg
from services.postal.commands import BookOrder, CancelOrder, QueryOrder
from services.postal.partner import CarrierRejected, VNPostClient
from services.postal.plans import Address

DID = "000.00.12.H34-190704-0001"
REF = f"{DID}:pickup"
AT = datetime(2019, 7, 4, 1, 0, tzinfo=UTC)


class FakeVNPost:
    """Issues tokens `t1`, `t2`, ...; `accepts(token)` decides which the order calls honour."""

    def __init__(self, accepts: Callable[[str], bool]) -> None:
        self.accepts = accepts
        self.token_requests = 0
        self.calls: list[tuple[str, str, str, str | None]] = []  # method, path, token, key

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(0)  # a network round trip: concurrent calls interleave here
        if request.url.path == "/oauth/token":
            body = orjson.loads(request.content)
            assert body == {"client_id": "motcua", "client_secret": "s3cret"}
            self.token_requests += 1
            token = f"t{self.token_requests}"
            return httpx.Response(200, json={"access_token": token, "expires_in": 3600})
        token = request.headers.get("authorization", "").removeprefix("Bearer ")
        key = request.headers.get(IDEMPOTENCY_HEADER)
        self.calls.append((request.method, request.url.path, token, key))
        if not self.accepts(token):
            return httpx.Response(401, json={"error": "invalid or expired token"})
        if request.url.path == "/v1/orders":
            created = {"order_id": "VN1", "client_order_id": REF, "status_code": 1}
            return httpx.Response(200, json={**created, "status_time": AT.isoformat()})
        if request.url.path == "/v1/orders/VN1":
            found = {"order_id": "VN1", "client_order_id": REF, "status_code": 6}
            return httpx.Response(200, json={**found, "status_time": AT.isoformat()})
        return httpx.Response(200, json={"order_id": "VN1", "cancelled": True})

    @property
    def tokens_used(self) -> list[str]:
        return [token for _, _, token, _ in self.calls]


def client(carrier: FakeVNPost) -> VNPostClient:
    # several attempts per request: a 401 must still not be retried with the same token
    return VNPostClient(
        "http://vnpost.test",
        "motcua",
        "s3cret",
        retry=RetryPolicy(attempts=3, base_delay=0.0),
        transport=httpx.MockTransport(carrier),
    )


BOOKING = BookOrder(
    dossier_id=DID,
    leg=Leg.PICKUP,
    carrier="vnpost",
    order_ref=REF,
    agency_code="000.00.12.H34",
    address=Address("Khánh Hòa", "Nha Trang", "Lộc Thọ", "1 Trần Phú"),
    contact_name="Nguyễn Thị B",
    contact_phone="0905123456",
    cod_amount_vnd=0,
)


async def test_a_cached_token_serves_every_call_until_the_carrier_revokes_it() -> None:
    revoked: set[str] = set()
    carrier = FakeVNPost(lambda token: token not in revoked)
    vnpost = client(carrier)
    try:
        await vnpost.create(BOOKING)
        await vnpost.query(QueryOrder(DID, Leg.PICKUP, "vnpost", REF, "VN1"))
        assert carrier.token_requests == 1 and carrier.tokens_used == ["t1", "t1"]

        revoked.add("t1")  # the carrier revokes (or expires early) the token we hold
        created = await vnpost.create(BOOKING)
    finally:
        await vnpost.aclose()

    assert created.order_id == "VN1" and created.at == AT
    assert carrier.token_requests == 2  # exactly one token request after the 401
    assert vnpost.token_fetches == 2
    # the same booking retried once, with the new token and the same idempotency key
    assert carrier.calls[2:] == [
        ("POST", "/v1/orders", "t1", REF),
        ("POST", "/v1/orders", "t2", REF),
    ]


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda vnpost: vnpost.create(BOOKING), id="create"),
        pytest.param(
            lambda vnpost: vnpost.cancel(CancelOrder(DID, Leg.PICKUP, "vnpost", REF, "VN1")),
            id="cancel",
        ),
        pytest.param(
            lambda vnpost: vnpost.query(QueryOrder(DID, Leg.PICKUP, "vnpost", REF, "VN1")),
            id="query",
        ),
    ],
)
async def test_every_order_call_refreshes_once_after_a_401(call: Callable[..., object]) -> None:
    carrier = FakeVNPost(lambda token: token != "t1")  # the first token is already dead
    vnpost = client(carrier)
    try:
        await call(vnpost)  # type: ignore[misc]
    finally:
        await vnpost.aclose()
    assert carrier.token_requests == 2
    assert carrier.tokens_used == ["t1", "t2"]
    assert len({(method, path, key) for method, path, _, key in carrier.calls}) == 1


async def test_a_401_right_after_the_refresh_ends_the_call_as_retry_later() -> None:
    carrier = FakeVNPost(lambda token: False)  # every token refused (e.g. the carrier's auth)
    vnpost = client(carrier)
    try:
        with pytest.raises(PartnerError) as failed:
            await vnpost.create(BOOKING)
        after_one_call = (carrier.token_requests, list(carrier.tokens_used))
        with pytest.raises(PartnerError):
            await vnpost.cancel(CancelOrder(DID, Leg.PICKUP, "vnpost", REF, None))
    finally:
        await vnpost.aclose()

    # one refresh and one retry, then it stops: no loop
    assert after_one_call == (2, ["t1", "t2"])
    assert carrier.token_requests == 3 and carrier.tokens_used == ["t1", "t2", "t2", "t3"]
    # a 401 says nothing against the order: not a refusal for good (which would fail the
    # applicant's booking), a failure the shell leaves for the scan to send again
    assert not isinstance(failed.value, CarrierRejected)
    assert failed.value.retryable and failed.value.status == 401


async def test_calls_refused_at_once_share_one_new_token() -> None:
    revoked: set[str] = set()
    carrier = FakeVNPost(lambda token: token not in revoked)
    vnpost = client(carrier)
    try:
        await vnpost.create(BOOKING)
        revoked.add("t1")  # the cached token, revoked while the dossiers' calls are under way
        queries = [QueryOrder(DID, Leg.PICKUP, "vnpost", REF, "VN1") for _ in range(10)]
        found = await asyncio.gather(*(vnpost.query(q) for q in queries))
    finally:
        await vnpost.aclose()
    assert all(len(callbacks) == 1 for callbacks in found)
    # the dossiers' calls are concurrent: ten 401s, still one token request after them
    assert carrier.token_requests == 2
    assert carrier.tokens_used.count("t1") == 11 and carrier.tokens_used.count("t2") == 10


async def test_a_refusal_of_the_order_itself_is_not_mistaken_for_a_token_problem() -> None:
    def refuse_orders(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth/token":
            return httpx.Response(200, json={"access_token": "t", "expires_in": 3600})
        return httpx.Response(422, json={"error": "invalid order"})

    vnpost = VNPostClient(
        "http://vnpost.test",
        "motcua",
        "s3cret",
        retry=RetryPolicy(attempts=3, base_delay=0.0),
        transport=httpx.MockTransport(refuse_orders),
    )
    try:
        with pytest.raises(CarrierRejected) as refused:
            await vnpost.create(BOOKING)
    finally:
        await vnpost.aclose()
    assert refused.value.status == 422 and vnpost.token_fetches == 1
