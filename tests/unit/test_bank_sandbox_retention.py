"""The bank sandbox forgets an order once it is settled (paid, failed or refunded, every
notification answered; or never opened and expired) and `SANDBOX_RETAIN_SECONDS` passed since
its last change, and not before the retention after the end of its payment's day (the
statement's day), on a clock the test moves; its totals stay; a forgotten order is an unknown
one. Over `httpx.ASGITransport`, the notifications answered by an `httpx.MockTransport`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

from services.common.settings import Settings
from services.common.signing import vnpay_sign
from services.common.tz import VIETNAM_TZ
from services.payments.partner import JSONPAY_SIGNATURE, jsonpay_sign
from services.payments.settings import PaymentsSettings
from services.sandboxes.bank import Sandbox, SandboxConfig, create_app, end_of_local_day

RETAIN = 600.0


class Clock:
    def __init__(self) -> None:
        self.at = datetime.now(UTC)  # paid_at is the sandbox's real time: the clock starts there

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


@dataclass
class Bankside:
    client: httpx.AsyncClient
    sandbox: Sandbox
    clock: Clock
    notified: list[dict[str, Any]]
    held: set[str]  # order refs whose notifications wait for `release`
    release: asyncio.Event
    secret: str
    vnpay_secret: str

    def signed(self, value: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        body = orjson.dumps(value)
        return body, {
            "content-type": "application/json",
            JSONPAY_SIGNATURE: jsonpay_sign(body, self.secret),
        }

    async def order(self, ref: str, expires_in: float = 900.0, open_page: bool = True) -> None:
        expires = datetime.now(VIETNAM_TZ) + timedelta(seconds=expires_in)
        body, headers = self.signed(
            {
                "merchant": "MOTCUA",
                "order_ref": ref,
                "amount": 50_000,
                "currency": "VND",
                "description": f"Le phi ho so D-{ref}",
                "expires_at": expires.isoformat(),
                "notify_url": "http://payments/v1/webhooks/payments/jsonpay",
            }
        )
        answer = await self.client.post("/jsonpay/orders", content=body, headers=headers)
        assert answer.status_code == 200, answer.text
        if open_page:
            assert (await self.client.get(f"/jsonpay/pay/{ref}")).status_code == 200

    async def settle(self) -> None:
        while self.sandbox.tasks:
            await asyncio.gather(*list(self.sandbox.tasks))

    async def outcomes(self, outcomes: dict[str, float]) -> None:
        config = {"outcomes": outcomes, "pay_delay_seconds": 0.0, "ipn_retry_seconds": 0.01}
        assert (await self.client.post("/sandbox/config", json=config)).status_code == 200

    async def kept(self) -> set[str]:
        return set((await self.client.get("/sandbox/orders")).json())

    async def totals(self) -> dict[str, int]:
        found: dict[str, int] = (await self.client.get("/sandbox/totals")).json()
        return found

    async def query(self, ref: str) -> str:
        answer = await self.client.get(f"/jsonpay/orders/{ref}")
        status: str = answer.json()["status"]
        return status

    async def refund(self, ref: str) -> str:
        body, headers = self.signed({"order_ref": ref, "amount": 50_000})
        answer = await self.client.post(
            f"/jsonpay/orders/{ref}/refund", content=body, headers=headers
        )
        status: str = answer.json()["status"]
        return status


@pytest.fixture
async def side() -> AsyncIterator[Bankside]:
    settings = Settings.model_validate({"SANDBOX_RETAIN_SECONDS": RETAIN})
    clock = Clock()
    config = SandboxConfig(outcomes={"00": 1.0}, pay_delay_seconds=0.0, ipn_retry_seconds=0.01)
    api = create_app(settings, config, clock)
    sandbox: Sandbox = api.state.sandbox
    notified: list[dict[str, Any]] = []
    held: set[str] = set()
    release = asyncio.Event()

    async def payments(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        if body["order_ref"] in held:
            await release.wait()
        notified.append(body)
        return httpx.Response(200, json={"RspCode": "00", "Message": "Confirm Success"})

    await sandbox.client.aclose()
    sandbox.client = httpx.AsyncClient(transport=httpx.MockTransport(payments))
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://bank") as client:
        yield Bankside(
            client,
            sandbox,
            clock,
            notified,
            held,
            release,
            PaymentsSettings().jsonpay_secrets[0],
            settings.vnpay_secrets[0],
        )
    release.set()
    for task in list(sandbox.tasks):
        task.cancel()
    await sandbox.client.aclose()


async def test_a_failed_order_leaves_after_the_retention_a_paid_one_after_its_day_too(
    side: Bankside,
) -> None:
    await side.order("PAID1")
    await side.outcomes({"51": 1.0})
    await side.order("FAIL1")
    await side.settle()
    assert [n["status"] for n in side.notified] == ["paid", "failed"]
    paid_at = side.sandbox.orders["PAID1"].paid_at
    assert paid_at is not None

    side.clock.advance(RETAIN + 1)
    assert await side.kept() == {"PAID1"}  # its day's statement may still be read
    side.clock.at = end_of_local_day(paid_at) + timedelta(seconds=RETAIN - 1)
    assert await side.kept() == {"PAID1"}
    side.clock.advance(2)
    assert await side.kept() == set()
    assert not side.sandbox.orders and len(side.sandbox.retiring) == 0
    assert await side.totals() == {
        "orders": 2,
        "charges": 1,
        "refunds": 0,
        "forgotten": 2,
        "kept": 0,
    }


async def test_a_refund_is_a_change_and_the_refund_total_stays(side: Bankside) -> None:
    await side.order("PAID2")
    await side.settle()
    paid_at = side.sandbox.orders["PAID2"].paid_at
    assert paid_at is not None
    due = end_of_local_day(paid_at) + timedelta(seconds=RETAIN)
    side.clock.at = due - timedelta(seconds=10)
    assert await side.refund("PAID2") == "refunded"
    side.clock.at = due + timedelta(seconds=1)
    assert await side.kept() == {"PAID2"}  # retention counts from the refund
    side.clock.advance(RETAIN)
    assert await side.kept() == set()
    assert (await side.totals())["refunds"] == 1


async def test_a_forgotten_order_is_an_unknown_one(side: Bankside) -> None:
    await side.outcomes({"24": 1.0})
    await side.order("GONE1")
    await side.settle()
    assert await side.query("GONE1") == "failed"
    side.clock.advance(RETAIN + 1)
    assert await side.query("GONE1") == "unknown"
    assert await side.refund("GONE1") == "refused"
    assert (await side.client.get("/jsonpay/pay/GONE1")).status_code == 404
    params = {"vnp_Command": "querydr", "vnp_TxnRef": "GONE1", "vnp_TmnCode": "MOTCUA"}
    params["vnp_SecureHash"] = vnpay_sign(params, side.vnpay_secret)
    answer = await side.client.post("/merchant_webapi/api/transaction", json=params)
    assert answer.json()["vnp_QueryCode"] == "91"


async def test_an_order_never_opened_leaves_the_retention_after_it_expired(
    side: Bankside,
) -> None:
    await side.order("OPEN1", expires_in=3 * RETAIN, open_page=False)
    side.clock.advance(2 * RETAIN)
    assert await side.kept() == {"OPEN1"}
    assert await side.query("OPEN1") == "pending"
    side.clock.advance(2 * RETAIN + 1)  # past its expiry plus the retention
    assert await side.kept() == set()


async def test_an_order_whose_notification_is_unanswered_is_kept(side: Bankside) -> None:
    await side.outcomes({"51": 1.0})
    side.held.add("HELD1")
    await side.order("HELD1")
    while side.sandbox.orders["HELD1"].status != "failed":
        await asyncio.sleep(0.01)
    side.clock.advance(10 * RETAIN)
    assert await side.kept() == {"HELD1"}
    side.release.set()
    await side.settle()
    side.clock.advance(RETAIN - 1)
    assert await side.kept() == {"HELD1"}  # counted from the answer
    side.clock.advance(2)
    assert await side.kept() == set()
