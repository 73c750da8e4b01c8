"""The one webhook door (`services.common.webhooks`), with a fake partner, fake claims and a fake
publisher: every outcome, when a claim is released or confirmed, in flight versus duplicate.
The body cap (`read_body`) is driven through a real ASGI app over `httpx.ASGITransport`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, cast

import httpx
import orjson
import pytest
from prometheus_client import REGISTRY
from redis.exceptions import ConnectionError as RedisConnectionError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from services.common.claims import Claim, Claims
from services.common.kafka import BrokerUnavailable, DurablePublisher
from services.common.webhooks import (
    BodyTooLarge,
    Callback,
    Decision,
    InboundCall,
    Outcome,
    Rejected,
    WebhookIntake,
    json_reply,
    read_body,
)

TOPIC = "carrier.callbacks"


class FakeClaims:
    """`Claims` in a dict: "p" pending, "1" confirmed; `records` are what a claim may read."""

    def __init__(self) -> None:
        self.held: dict[str, str] = {}
        self.records: dict[str, bytes] = {}
        self.released: list[str] = []
        self.fail: Exception | None = None

    async def claim(self, key: str, *, read: str | None = None) -> Claim:
        if self.fail is not None:
            raise self.fail
        record = self.records.get(read) if read is not None else None
        held = self.held.get(key)
        if held is None:
            self.held[key] = "p"
            return Claim(claimed=True, record=record)
        return Claim(claimed=False, record=record, pending=held == "p")

    def confirm_soon(self, key: str) -> None:
        self.held[key] = "1"

    async def release(self, key: str) -> None:
        self.released.append(key)
        self.held.pop(key, None)


class FakePublisher:
    """Keeps what it was asked to write and the claims' state at that moment."""

    def __init__(self, claims: FakeClaims) -> None:
        self.claims = claims
        self.written: list[tuple[str, bytes | None, bytes | None]] = []
        self.claims_while_writing: list[dict[str, str]] = []
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None  # when set, a write waits for it

    async def publish(self, messages: Sequence[tuple[str, bytes | None, bytes | None]]) -> None:
        self.claims_while_writing.append(dict(self.claims.held))
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.written.extend(messages)


class FakeCarrier:
    """Signs with the header `X-Sig: ok`; its body is `{"event_id", "dossier_id", ...}`."""

    name = "post"

    def verify(self, call: InboundCall) -> None:
        if call.headers.get("x-sig") != "ok":
            raise Rejected("bad signature")

    def parse(self, call: InboundCall) -> Callback:
        try:
            body = orjson.loads(call.body)
            return Callback(
                event_id=str(body["event_id"]),
                key=str(body["dossier_id"]).encode(),
                value=call.body,
                read=body.get("read"),
                parsed=body,
            )
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise Rejected("malformed body", detail=str(exc)) from None


class DecidingCarrier(FakeCarrier):
    """Accepts a callback only when the record read with its claim says `open`."""

    name = "bank"

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes | None]] = []
        self.fail: Exception | None = None

    async def decide(self, callback: Callback, record: bytes | None) -> Decision:
        self.seen.append((callback.event_id, record))
        if self.fail is not None:
            raise self.fail
        if record != b"open":
            return Decision(accept=False, detail={"code": "01"})
        return Decision(accept=True, value=b"decided:" + callback.value, detail={"code": "00"})


def claim_key(partner: str, event_id: str) -> str:
    return f"test:cb:{partner}:{event_id}"


def intake_of(
    claims: FakeClaims, publisher: FakePublisher, *partners: Any, max_body_bytes: int = 1024
) -> WebhookIntake:
    return WebhookIntake(
        "unit",
        {p.name: p for p in partners or (FakeCarrier(),)},
        path_param="carrier",
        topic=TOPIC,
        claims=cast(Claims, claims),
        claim_key=claim_key,
        publisher=cast(DurablePublisher, publisher),
        reply=json_reply,
        max_body_bytes=max_body_bytes,
    )


def call(event_id: str = "e-1", *, sig: str = "ok", **extra: Any) -> InboundCall:
    body = orjson.dumps({"event_id": event_id, "dossier_id": "D-1", **extra})
    return InboundCall(query=b"", body=body, headers={"x-sig": sig})


def status_of(response: Response) -> tuple[int, Any]:
    return response.status_code, orjson.loads(bytes(response.body))


def calls_counted(partner: str, outcome: Outcome) -> float:
    value = REGISTRY.get_sample_value(
        "motcua_webhook_calls_total",
        {"service": "unit", "partner": partner, "outcome": outcome.value},
    )
    return value or 0.0


@pytest.fixture
def claims() -> FakeClaims:
    return FakeClaims()


@pytest.fixture
def publisher(claims: FakeClaims) -> FakePublisher:
    return FakePublisher(claims)


async def test_accepted_is_written_then_answered_and_confirmed(
    claims: FakeClaims, publisher: FakePublisher
) -> None:
    intake = intake_of(claims, publisher)
    before = calls_counted("post", Outcome.ACCEPTED)
    one = call()
    assert status_of(await intake.handle(FakeCarrier(), one)) == (200, {"status": "accepted"})
    assert publisher.written == [(TOPIC, b"D-1", one.body)]
    # pending while the write was in flight, confirmed once it was acknowledged
    assert publisher.claims_while_writing == [{claim_key("post", "e-1"): "p"}]
    assert claims.held == {claim_key("post", "e-1"): "1"}
    assert calls_counted("post", Outcome.ACCEPTED) == before + 1


async def test_a_copy_after_the_write_is_a_duplicate_and_not_written_again(
    claims: FakeClaims, publisher: FakePublisher
) -> None:
    intake = intake_of(claims, publisher)
    await intake.handle(FakeCarrier(), call())
    assert status_of(await intake.handle(FakeCarrier(), call())) == (200, {"status": "duplicate"})
    assert len(publisher.written) == 1
    assert claims.released == []


async def test_a_copy_while_the_first_is_being_written_is_asked_to_retry(
    claims: FakeClaims, publisher: FakePublisher
) -> None:
    intake = intake_of(claims, publisher)
    publisher.gate = asyncio.Event()
    first = asyncio.create_task(intake.handle(FakeCarrier(), call()))
    while not publisher.claims_while_writing:
        await asyncio.sleep(0)
    copy = await intake.handle(FakeCarrier(), call())
    assert copy.status_code == 503 and copy.headers["retry-after"] == "1"
    assert orjson.loads(bytes(copy.body))["status"] == 503  # a problem document
    publisher.gate.set()
    assert status_of(await first) == (200, {"status": "accepted"})
    assert status_of(await intake.handle(FakeCarrier(), call())) == (200, {"status": "duplicate"})
    assert len(publisher.written) == 1


async def test_of_many_concurrent_copies_exactly_one_is_accepted(
    claims: FakeClaims, publisher: FakePublisher
) -> None:
    intake = intake_of(claims, publisher)
    replies = await asyncio.gather(*(intake.handle(FakeCarrier(), call()) for _ in range(300)))
    statuses = [r.status_code for r in replies]
    accepted = [r for r in replies if r.status_code == 200 and b"accepted" in bytes(r.body)]
    assert len(accepted) == 1 and len(publisher.written) == 1
    assert set(statuses) <= {200, 503}


async def test_a_bad_signature_is_unauthorized_and_claims_nothing(
    claims: FakeClaims, publisher: FakePublisher
) -> None:
    intake = intake_of(claims, publisher)
    code, body = status_of(await intake.handle(FakeCarrier(), call(sig="forged")))
    assert code == 401 and body == {"status": "rejected", "reason": "bad signature"}
    assert claims.held == {} and publisher.written == []


async def test_a_malformed_body_is_422_with_the_reason_and_claims_nothing(
    claims: FakeClaims, publisher: FakePublisher
) -> None:
    intake = intake_of(claims, publisher)
    broken = InboundCall(query=b"", body=b'{"event_id": "e-1"}', headers={"x-sig": "ok"})
    code, body = status_of(await intake.handle(FakeCarrier(), broken))
    assert code == 422 and body["reason"] == "malformed body" and "dossier_id" in body["detail"]
    assert claims.held == {} and publisher.written == []


async def test_a_refusal_releases_the_claim_and_hands_its_detail_to_the_reply(
    claims: FakeClaims, publisher: FakePublisher
) -> None:
    bank = DecidingCarrier()
    intake = intake_of(claims, publisher, bank)
    code, body = status_of(await intake.handle(bank, call(read="test:order:1")))
    assert code == 422
    assert body == {"status": "rejected", "reason": "refused", "detail": {"code": "01"}}
    assert bank.seen == [("e-1", None)]
    assert claims.released == [claim_key("bank", "e-1")] and claims.held == {}
    assert publisher.written == []

    # the order exists now: the partner's retry of the same event gets through
    claims.records["test:order:1"] = b"open"
    assert status_of(await intake.handle(bank, call(read="test:order:1")))[0] == 200
    assert bank.seen[-1] == ("e-1", b"open")  # the record read in the claim's round trip
    assert publisher.written == [(TOPIC, b"D-1", b"decided:" + call(read="test:order:1").body)]


async def test_a_duplicate_is_decided_too_so_the_reply_can_carry_its_detail(
    claims: FakeClaims, publisher: FakePublisher
) -> None:
    bank = DecidingCarrier()
    claims.records["test:order:1"] = b"open"
    intake = intake_of(claims, publisher, bank)
    await intake.handle(bank, call(read="test:order:1"))
    code, _ = status_of(await intake.handle(bank, call(read="test:order:1")))
    assert code == 200 and len(bank.seen) == 2 and len(publisher.written) == 1


async def test_a_failed_write_releases_the_claim_so_a_retry_gets_through(
    claims: FakeClaims, publisher: FakePublisher
) -> None:
    intake = intake_of(claims, publisher)
    publisher.fail = BrokerUnavailable("no ack")
    reply = await intake.handle(FakeCarrier(), call())
    assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
    assert claims.released == [claim_key("post", "e-1")] and claims.held == {}
    assert publisher.written == []
    publisher.fail = None
    assert status_of(await intake.handle(FakeCarrier(), call())) == (200, {"status": "accepted"})
    assert claims.held == {claim_key("post", "e-1"): "1"}


async def test_a_broker_away_during_the_decision_releases_the_claim(
    claims: FakeClaims, publisher: FakePublisher
) -> None:
    bank = DecidingCarrier()
    bank.fail = BrokerUnavailable("no ack")
    intake = intake_of(claims, publisher, bank)
    reply = await intake.handle(bank, call())
    assert reply.status_code == 503
    assert claims.released == [claim_key("bank", "e-1")] and claims.held == {}


async def test_redis_away_is_unavailable_and_nothing_is_written(
    claims: FakeClaims, publisher: FakePublisher
) -> None:
    intake = intake_of(claims, publisher)
    claims.fail = RedisConnectionError("refused")
    reply = await intake.handle(FakeCarrier(), call())
    assert reply.status_code == 503 and publisher.written == []


# --- the endpoint: the path parameter and the body cap, over a real ASGI app ---------------------


def app_of(intake: WebhookIntake) -> Starlette:
    async def body_length(request: Request) -> Response:
        try:
            body = await read_body(request, 8)
        except BodyTooLarge:
            return JSONResponse({"too_large": True}, status_code=413)
        return JSONResponse({"length": len(body)})

    return Starlette(
        routes=[
            Route("/v1/webhooks/x/{carrier}", intake.endpoint, methods=["POST"]),
            Route("/read", body_length, methods=["POST"]),
        ]
    )


def client_of(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_the_endpoint_routes_by_partner_and_refuses_an_unknown_one(
    claims: FakeClaims, publisher: FakePublisher
) -> None:
    async with client_of(app_of(intake_of(claims, publisher))) as client:
        one = call()
        ok = await client.post("/v1/webhooks/x/post", content=one.body, headers=dict(one.headers))
        assert ok.status_code == 200 and ok.json() == {"status": "accepted"}
        unknown = await client.post("/v1/webhooks/x/nobody", content=one.body)
        assert unknown.status_code == 404 and unknown.json()["reason"] == "unknown carrier"
    assert publisher.written == [(TOPIC, b"D-1", one.body)]


async def test_a_declared_length_over_the_cap_is_413_before_anything_is_read(
    claims: FakeClaims, publisher: FakePublisher
) -> None:
    pulled: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        for i in range(4):
            pulled.append(i)
            yield b"x" * 512

    async with client_of(app_of(intake_of(claims, publisher, max_body_bytes=1024))) as client:
        reply = await client.post(
            "/v1/webhooks/x/post",
            content=body(),
            headers={"x-sig": "ok", "content-length": "2048"},
        )
    assert reply.status_code == 413 and reply.json()["status"] == "rejected"
    assert pulled == []  # not one chunk was read
    assert claims.held == {} and publisher.written == []


async def test_a_streamed_body_is_refused_as_soon_as_it_crosses_the_cap(
    claims: FakeClaims, publisher: FakePublisher
) -> None:
    pulled: list[int] = []

    async def body() -> AsyncIterator[bytes]:
        for i in range(100):
            pulled.append(i)
            yield b"x" * 512

    async with client_of(app_of(intake_of(claims, publisher, max_body_bytes=1024))) as client:
        reply = await client.post("/v1/webhooks/x/post", content=body(), headers={"x-sig": "ok"})
    assert reply.status_code == 413
    assert 3 <= len(pulled) <= 4  # the third chunk crosses 1,024 bytes; the rest is never read
    assert claims.held == {} and publisher.written == []


@pytest.mark.parametrize(
    ("chunks", "headers", "expected"),
    [
        ([b"12345678"], {}, (200, {"length": 8})),  # exactly the limit
        ([b"123456789"], {}, (413, {"too_large": True})),
        ([b"1234", b"5678"], {}, (200, {"length": 8})),
        ([b"1234", b"56789"], {}, (413, {"too_large": True})),
        ([b""], {}, (200, {"length": 0})),
    ],
)
async def test_read_body_reads_up_to_the_limit(
    chunks: list[bytes], headers: Mapping[str, str], expected: tuple[int, Any]
) -> None:
    async def body() -> AsyncIterator[bytes]:
        for chunk in chunks:
            yield chunk

    async with client_of(app_of(intake_of(FakeClaims(), FakePublisher(FakeClaims())))) as client:
        streamed = await client.post("/read", content=body(), headers=dict(headers))
        declared = await client.post("/read", content=b"".join(chunks))
    assert (streamed.status_code, streamed.json()) == expected
    assert (declared.status_code, declared.json()) == expected


async def test_an_unexpected_failure_after_the_claim_releases_it_and_asks_to_retry(
    claims: FakeClaims, publisher: FakePublisher
) -> None:
    bank = DecidingCarrier()
    bank.fail = ValueError("a snapshot that does not decode")
    intake = intake_of(claims, publisher, bank)
    reply = await intake.handle(bank, call(read="order"))
    assert reply.status_code == 503 and reply.headers["retry-after"] == "1"
    assert claims.released == [claim_key("bank", "e-1")] and claims.held == {}
    assert publisher.written == []
    publisher.fail = RuntimeError("producer closed")
    bank.fail = None
    claims.records["order"] = b"open"
    assert (await intake.handle(bank, call(read="order"))).status_code == 503
    assert claims.held == {} and publisher.written == []


class BrokenCarrier(FakeCarrier):
    """A verifier or parser with a bug of its own (not a `Rejected`)."""

    def __init__(self, where: str) -> None:
        self.where = where

    def verify(self, call: InboundCall) -> None:
        if self.where == "verify":
            raise KeyError("x-sig")

    def parse(self, call: InboundCall) -> Callback:
        if self.where == "parse":
            raise TypeError("not a mapping")
        return super().parse(call)


async def test_a_partner_bug_in_verify_or_parse_is_refused_without_a_500(
    claims: FakeClaims, publisher: FakePublisher
) -> None:
    for where, status in (("verify", 401), ("parse", 422)):
        broken = BrokenCarrier(where)
        reply = await intake_of(claims, publisher, broken).handle(broken, call())
        assert reply.status_code == status
    assert claims.held == {} and publisher.written == []
