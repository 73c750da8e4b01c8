"""The VNPost sandbox forgets a dossier's orders once they are settled (script over, every
callback answered) and `SANDBOX_RETAIN_SECONDS` passed since the dossier's last change, on a
clock the test moves; its totals stay; a forgotten order is an unknown one. Over
`httpx.ASGITransport`, the callbacks answered by an `httpx.MockTransport`."""

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
from services.sandboxes.post_office import (
    Carrier,
    SandboxConfig,
    create_app,
)
from services.sandboxes.retention import Retention

RETAIN = 600.0
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.at = T0

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


@dataclass
class Carrierside:
    client: httpx.AsyncClient
    carrier: Carrier
    clock: Clock
    callbacks: list[dict[str, Any]]
    held: set[str]  # client order ids whose callbacks wait for `release`
    release: asyncio.Event
    flaky: set[str]  # client order ids whose next callback is answered 503

    async def settle(self) -> None:
        """Every walk and callback the sandbox started has ended."""
        while self.carrier.tasks:
            await asyncio.gather(*list(self.carrier.tasks))

    async def book(self, ref: str, street: str = "1 Lê Lợi") -> httpx.Response:
        body = {
            "client_order_id": ref,
            "service": ref.rpartition(":")[2],
            "agency_code": "G01",
            "address": {"province": "79", "district": "760", "commune": "26734", "street": street},
            "contact_name": "Nguyễn Văn A",
        }
        return await self.client.post("/v1/orders", json=body)

    async def bookings(self) -> dict[str, Any]:
        found: dict[str, Any] = (await self.client.get("/sandbox/bookings")).json()
        return found


@pytest.fixture
async def side() -> AsyncIterator[Carrierside]:
    settings = Settings.model_validate({"SANDBOX_RETAIN_SECONDS": RETAIN})
    no_faults = dict.fromkeys(
        ("duplicate_rate", "out_of_order_rate", "missing_rate", "error_rate", "timeout_rate"), 0.0
    )
    config = SandboxConfig(step_seconds=0.001, seed=7, **no_faults)
    clock = Clock()
    api = create_app(settings, config, clock)
    carrier: Carrier = api.state.carrier
    callbacks: list[dict[str, Any]] = []
    held: set[str] = set()
    release = asyncio.Event()
    flaky: set[str] = set()

    async def partner(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        if body["client_order_id"] in held:
            await release.wait()
        if body["client_order_id"] in flaky:
            flaky.discard(body["client_order_id"])
            return httpx.Response(503)
        callbacks.append(body)
        return httpx.Response(200, json={"status": "accepted"})

    carrier.http = httpx.AsyncClient(transport=httpx.MockTransport(partner))
    transport = httpx.ASGITransport(app=api)
    async with httpx.AsyncClient(transport=transport, base_url="http://vnpost") as client:
        token = await client.post(
            "/oauth/token", json={"client_id": "motcua-dev", "client_secret": config.client_secret}
        )
        client.headers["authorization"] = f"Bearer {token.json()['access_token']}"
        yield Carrierside(client, carrier, clock, callbacks, held, release, flaky)
    release.set()
    for task in list(carrier.tasks):
        task.cancel()
    await carrier.http.aclose()


async def test_settled_dossiers_leave_after_the_retention_and_the_totals_stay(
    side: Carrierside,
) -> None:
    refs = [f"D-{n}:pickup" for n in range(3)]
    ids = [(await side.book(ref)).json()["order_id"] for ref in refs]
    await side.settle()
    carrier = side.carrier
    assert len(carrier.orders) == len(carrier.by_ref) == len(carrier.dossiers) == 3
    sent = len(side.callbacks)
    assert sent == sum(len(carrier.by_ref[ref].codes) + 1 for ref in refs)

    side.clock.advance(RETAIN - 1)
    again = await side.book(refs[0])  # the same reference: the same order, and a change
    assert again.json()["order_id"] == ids[0]
    side.clock.advance(2)
    found = await side.bookings()
    assert set(found["orders"]) == {"D-0"}  # the others were settled longer than the retention
    assert found["create_requests"] == {"D-0": 2}
    assert sorted(carrier.by_ref) == [refs[0]] and list(carrier.orders) == [ids[0]]

    side.clock.advance(RETAIN)
    found = await side.bookings()
    assert found["orders"] == {} and found["create_requests"] == {}
    assert not carrier.orders and not carrier.by_ref and not carrier.dossiers
    assert len(carrier.retiring) == 0
    assert found["kept"] == {"orders": 0, "dossiers": 0}
    assert found["totals"] == {
        "orders": 3,
        "create_requests": 4,
        "cancel_requests": 0,
        "callbacks_sent": sent,
        "callbacks_dropped": 0,
        "orders_forgotten": 3,
        "dossiers_forgotten": 3,
    }
    assert (await side.client.get("/sandbox/orders")).json() == []


async def test_beyond_the_count_the_longest_settled_leave_once_past_the_minimum(
    side: Carrierside,
) -> None:
    side.carrier.retention = Retention(RETAIN, most=2, min_seconds=60)
    refs = [f"D-{n}:pickup" for n in range(4)]
    ids = [(await side.book(ref)).json()["order_id"] for ref in refs]
    await side.settle()
    for ref, order_id in zip(refs, ids, strict=True):  # retried within the minimum: the same
        side.clock.advance(1)
        assert (await side.book(ref)).json()["order_id"] == order_id
    found = await side.bookings()
    assert found["kept"] == {"orders": 4, "dossiers": 4}

    side.clock.advance(59)  # D-0 changed 62 s ago, D-3 59 s ago
    found = await side.bookings()
    assert set(found["orders"]) == {"D-2", "D-3"}  # the two settled longest are gone
    assert found["totals"]["orders"] == 4 and found["totals"]["create_requests"] == 8
    assert found["totals"]["orders_forgotten"] == found["totals"]["dossiers_forgotten"] == 2
    assert sorted(side.carrier.by_ref) == refs[2:] and sorted(side.carrier.orders) == ids[2:]
    assert (await side.book(refs[3])).json()["order_id"] == ids[3]
    assert (await side.book(refs[0])).json()["order_id"] not in ids  # forgotten: a new order
    assert (await side.bookings())["totals"]["orders"] == 5


async def test_a_forgotten_order_is_an_unknown_one(side: Carrierside) -> None:
    ref = "D-9:pickup"
    first = (await side.book(ref)).json()["order_id"]
    await side.settle()
    side.clock.advance(RETAIN + 1)
    assert (await side.client.get(f"/v1/orders/{first}")).status_code == 404
    cancel = await side.client.post("/v1/orders/cancel", json={"client_order_id": ref})
    assert cancel.status_code == 404
    # booking the reference again is a new order, as at a carrier that never saw it
    second = (await side.book(ref)).json()["order_id"]
    assert second != first
    found = await side.bookings()
    assert found["orders"] == {"D-9": 1}
    assert found["totals"]["orders"] == 2 and found["totals"]["orders_forgotten"] == 1


async def test_an_order_with_a_callback_to_send_or_statuses_to_come_is_kept(
    side: Carrierside,
) -> None:
    waiting, done = "D-1:pickup", "D-2:pickup"
    side.held.add(waiting)
    await side.book(waiting)
    await side.book(done)
    while not side.carrier.by_ref[done].settled:
        await asyncio.sleep(0.01)
    assert not side.carrier.by_ref[waiting].settled
    side.clock.advance(10 * RETAIN)
    found = await side.bookings()
    assert found["orders"] == {"D-1": 1}  # its callbacks are still being sent
    side.release.set()
    await side.settle()
    side.clock.advance(RETAIN - 1)
    assert (await side.bookings())["orders"] == {"D-1": 1}  # retention counts from the last one
    side.clock.advance(2)
    assert (await side.bookings())["orders"] == {}


async def test_a_dossier_with_an_order_in_flight_keeps_its_settled_order(
    side: Carrierside,
) -> None:
    await side.book("D-3:pickup")
    await side.settle()
    side.held.add("D-3:return")
    await side.book("D-3:return")
    side.clock.advance(10 * RETAIN)
    assert (await side.bookings())["orders"] == {"D-3": 2}
    side.release.set()
    await side.settle()
    side.clock.advance(RETAIN + 1)
    assert (await side.bookings())["orders"] == {}
    assert side.carrier.totals["orders_forgotten"] == 2


async def test_a_cancel_for_an_unknown_order_is_counted_then_forgotten(side: Carrierside) -> None:
    cancel = await side.client.post("/v1/orders/cancel", json={"client_order_id": "D-5:pickup"})
    assert cancel.status_code == 404
    found = await side.bookings()
    assert found["cancel_requests"] == {"D-5": 1} and found["orders"] == {}
    side.clock.advance(RETAIN + 1)
    found = await side.bookings()
    assert found["cancel_requests"] == {} and not side.carrier.dossiers
    assert found["totals"]["cancel_requests"] == 1


async def test_a_cancelled_order_leaves_once_its_walk_is_over_and_its_callbacks_answered(
    side: Carrierside,
) -> None:
    side.carrier.config = side.carrier.config.model_copy(update={"step_seconds": 3600.0})
    ref = "D-6:pickup"
    await side.book(ref)
    answer = await side.client.post("/v1/orders/cancel", json={"client_order_id": ref})
    assert answer.json()["cancelled"] is True
    while [c["status_code"] for c in side.callbacks] != [1, 9]:
        await asyncio.sleep(0.01)
    side.clock.advance(10 * RETAIN)
    assert (await side.bookings())["orders"] == {"D-6": 1}  # its walk sleeps until its next step
    [walk] = side.carrier.tasks
    walk.cancel()  # the next step: a cancelled order's walk ends there
    await asyncio.gather(walk, return_exceptions=True)
    side.clock.advance(RETAIN + 1)
    assert (await side.bookings())["orders"] == {}


async def test_tokens_issued_count_since_the_last_revoke(side: Carrierside) -> None:
    secret = side.carrier.config.client_secret
    for _ in range(2):
        await side.client.post(
            "/oauth/token", json={"client_id": "motcua-dev", "client_secret": secret}
        )
    assert (await side.bookings())["tokens_issued"] == 3
    assert (await side.client.post("/sandbox/tokens/revoke")).json() == {"revoked": 3}
    assert (await side.bookings())["tokens_issued"] == 0


async def test_callbacks_wait_in_the_outbox_for_a_sender_and_all_arrive(side: Carrierside) -> None:
    refs = [f"D-{n}:pickup" for n in range(20)]
    side.held.update(refs)
    for ref in refs:
        await side.book(ref)
    carrier = side.carrier
    while any(order.walking for order in carrier.by_ref.values()):
        await asyncio.sleep(0.01)
    expected = sum(len(carrier.by_ref[ref].codes) + 1 for ref in refs)
    connections = carrier.config.callback_connections
    assert carrier.senders == connections  # each posting one, held by the partner
    assert len(carrier.outbox) == expected - connections
    side.release.set()
    await side.settle()
    assert len(side.callbacks) == expected == carrier.totals["callbacks_sent"]
    assert carrier.senders == 0 and not carrier.outbox
    assert all(carrier.by_ref[ref].settled for ref in refs)


async def test_a_refused_callback_is_sent_again_after_its_backoff(side: Carrierside) -> None:
    ref = "D-8:pickup"
    side.flaky.add(ref)  # its first callback (status 1) is answered 503
    await side.book(ref)
    await side.settle()
    order = side.carrier.by_ref[ref]
    assert sorted(c["status_code"] for c in side.callbacks) == sorted([1, *order.codes])
    assert order.callbacks_sent == len(order.codes) + 1 and order.settled
