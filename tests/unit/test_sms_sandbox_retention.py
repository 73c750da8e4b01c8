"""The SMS gateway sandbox forgets an idempotency key once its delivery reports are sent and
`SANDBOX_RETAIN_SECONDS` passed since its last change, on a clock the test moves; its counts are
running integers; `GET /v1/messages` lists at most the latest N. Over `httpx.ASGITransport`, the
delivery reports answered by an `httpx.MockTransport`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.sandboxes.retention import Retention
from services.sandboxes.sms_gateway import Faults, Gateway, Message, create_app

RETAIN = 600.0
T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.at = T0

    def __call__(self) -> datetime:
        return self.at

    def advance(self, seconds: float) -> None:
        self.at += timedelta(seconds=seconds)


def message(n: int, key: str) -> dict[str, Any]:
    return {
        "to": "84912345678",
        "text": f"Hồ sơ {n} đã được tiếp nhận",
        "sender": "MOTCUA",
        "reference": key,
        "metadata": {"dossier_id": f"D-{n}", "template": "dossier_received"},
        "idempotency_key": key,
    }


@dataclass
class Gatewayside:
    client: httpx.AsyncClient
    gateway: Gateway
    clock: Clock
    reports: list[dict[str, Any]]
    held: set[str]  # references whose reports wait for `release`
    release: asyncio.Event

    async def send(self, *keys: str) -> list[dict[str, Any]]:
        batch = {"messages": [message(n, key) for n, key in enumerate(keys)]}
        answer = await self.client.post("/v1/messages/batch", json=batch)
        assert answer.status_code == 200, answer.text
        results: list[dict[str, Any]] = answer.json()["results"]
        return results

    async def reported(self) -> None:
        """Every report drawn so far has been sent (or given up)."""
        while self.gateway.reporting:
            await asyncio.sleep(0.01)

    async def stats(self) -> dict[str, Any]:
        found: dict[str, Any] = (await self.client.get("/v1/stats")).json()
        return found


@pytest.fixture
async def side() -> AsyncIterator[Gatewayside]:
    clock = Clock()
    faults = Faults(report_delay_ms=0)
    url = "http://sms/v1/webhooks/sms/primary"
    gateway = Gateway("primary", url, "s", faults, Retention(RETAIN), clock)
    reports: list[dict[str, Any]] = []
    held: set[str] = set()
    release = asyncio.Event()

    async def service(request: httpx.Request) -> httpx.Response:
        body = orjson.loads(request.content)
        if body["reference"] in held:
            await release.wait()
        reports.append(body)
        return httpx.Response(202, json={"status": "accepted"})

    gateway.start()
    await gateway._client.aclose()  # type: ignore[union-attr]
    gateway._client = httpx.AsyncClient(transport=httpx.MockTransport(service))
    transport = httpx.ASGITransport(app=create_app(gateway))
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        yield Gatewayside(client, gateway, clock, reports, held, release)
    release.set()
    await gateway.stop()


async def test_reported_messages_leave_after_the_retention_and_the_counts_stay(
    side: Gatewayside,
) -> None:
    keys = [f"k{n}" for n in range(5)]
    first = await side.send(*keys)
    await side.reported()
    assert len(side.reports) == 5
    side.clock.advance(RETAIN - 1)
    again = await side.send("k0")  # a replay within the retention: the same message
    assert again[0]["replayed"] is True and again[0]["message_id"] == first[0]["message_id"]
    side.clock.advance(2)
    stats = await side.stats()
    assert stats["kept"] == 1 and list(side.gateway.by_key) == ["k0"]
    side.clock.advance(RETAIN)
    stats = await side.stats()
    assert stats["kept"] == 0 and not side.gateway.by_key and len(side.gateway.retiring) == 0
    assert stats["accepted"] == 5 and stats["replays"] == 1 and stats["reports"] == 5
    assert stats["forgotten"] == 5
    # the latest accepted stay listed for inspection
    listed = (await side.client.get("/v1/messages")).json()["accepted"]
    assert [m["idempotency_key"] for m in listed] == keys


async def test_a_forgotten_key_is_a_new_message(side: Gatewayside) -> None:
    [first] = await side.send("k1")
    await side.reported()
    side.clock.advance(RETAIN + 1)
    [second] = await side.send("k1")
    assert second["replayed"] is False and second["message_id"] != first["message_id"]
    assert (await side.stats())["accepted"] == 2


async def test_a_message_with_a_report_to_send_is_kept(side: Gatewayside) -> None:
    side.held.add("k-held")
    await side.send("k-held", "k-done")
    while len(side.reports) < 1:
        await asyncio.sleep(0.01)
    side.clock.advance(10 * RETAIN)
    await side.send("k-other")  # a request sweeps
    assert set(side.gateway.by_key) == {"k-held", "k-other"}
    replay = await side.send("k-held")
    assert replay[0]["replayed"] is True
    side.release.set()
    await side.reported()
    side.clock.advance(RETAIN - 1)  # counted from its last report (k-other's too)
    assert (await side.stats())["kept"] == 2
    assert set(side.gateway.by_key) == {"k-held", "k-other"}
    side.clock.advance(2)
    assert (await side.stats())["kept"] == 0


async def test_duplicate_and_out_of_order_reports_all_go_before_the_key_leaves(
    side: Gatewayside,
) -> None:
    side.gateway.faults = Faults(
        report_delay_ms=0, duplicate_report_rate=1.0, out_of_order_rate=1.0
    )
    await side.send("k1")
    await side.reported()
    assert [r["status"] for r in side.reports] == ["DELIVRD", "DELIVRD", "ENROUTE"]
    side.clock.advance(RETAIN + 1)
    assert (await side.stats())["kept"] == 0


async def test_the_inspection_list_is_bounded_and_reset_clears_everything() -> None:
    gateway = Gateway("p", "http://sms", "s", Faults(reports=False), Retention(RETAIN), Clock(), 3)
    for n in range(5):
        gateway.accept(f"k{n}", Message.model_validate(message(n, f"k{n}")))
    assert [m.key for m in gateway.accepted] == ["k2", "k3", "k4"]
    assert gateway.counts["accepted"] == 5 and len(gateway.by_key) == 5
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=create_app(gateway)), base_url="http://gateway"
    ) as client:
        await client.delete("/v1/messages")
        stats = (await client.get("/v1/stats")).json()
    assert stats["accepted"] == 0 and stats["kept"] == 0 and len(gateway.retiring) == 0


def test_beyond_the_count_the_longest_finished_leave_once_past_the_minimum() -> None:
    clock = Clock()
    retention = Retention(RETAIN, most=2, min_seconds=60)
    gateway = Gateway("p", "http://sms", "s", Faults(reports=False), retention, clock)

    def send(key: str) -> bool:
        return gateway.accept(key, Message.model_validate(message(0, key)))[1]

    for n in range(5):
        clock.advance(1)
        assert not send(f"k{n}")
    clock.advance(1)
    assert send("k0")  # a retry within the minimum is a replay, and a change
    assert len(gateway.by_key) == 5
    clock.advance(60)  # every key changed more than 60 s ago
    assert not send("k5")
    assert set(gateway.by_key) == {"k4", "k0", "k5"}  # k1-k3 finished longest ago
    assert not send("k1")  # forgotten: a new message; k4 is now the one beyond the count
    assert set(gateway.by_key) == {"k0", "k5", "k1"}
    assert gateway.counts["accepted"] == 7 and gateway.counts["replays"] == 1
    assert gateway.counts["forgotten"] == 4


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 2 * int(RETAIN))),
        max_size=60,
    )
)
def test_without_reports_a_key_is_kept_exactly_until_the_retention_after_its_last_request(
    requests: list[tuple[str, int]],
) -> None:
    clock = Clock()
    gateway = Gateway("p", "http://sms", "s", Faults(reports=False), Retention(RETAIN), clock)
    last: dict[str, datetime] = {}
    new = 0
    for key, wait in requests:
        clock.advance(wait)
        known = {k for k, at in last.items() if clock() - at <= timedelta(seconds=RETAIN)}
        _, replayed = gateway.accept(key, Message.model_validate(message(0, key)))
        assert replayed == (key in known)
        new += not replayed
        last[key] = clock()
        assert set(gateway.by_key) == known | {key}
    assert gateway.counts["accepted"] == new
    assert gateway.counts["replays"] == len(requests) - new
