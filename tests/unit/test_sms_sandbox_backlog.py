"""The SMS gateway sandbox's memory follows the messages in flight when the service answering its
delivery reports falls behind: a message waiting for its reports is its compact entry, undrawn,
and the report bodies held are those of at most `SENDERS` queued and `SENDERS` being sent. The
reports go to an `httpx.MockTransport` that holds them until the test releases it. The list of
`GET /v1/messages` is written in pieces."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc
from collections.abc import AsyncIterator
from dataclasses import dataclass

import httpx
import orjson
import pytest

from services.sandboxes.retention import Retention
from services.sandboxes.sms_gateway import (
    LISTED_CHUNK,
    SENDERS,
    Faults,
    Gateway,
    GatewaySettings,
    Kept,
    Message,
    listed_json,
)

# What the gateway holds per message whose reports wait (measured: 430-460 bytes; with each
# report's body queued, 1,240).
MOST_BYTES_PER_MESSAGE = 700


@dataclass
class Held:
    gateway: Gateway
    release: asyncio.Event
    answered: list[bytes]


@pytest.fixture
async def held() -> AsyncIterator[Held]:
    """A gateway whose delivery reports hang until `release` is set."""
    url = "http://sms/v1/webhooks/sms/primary"
    gateway = Gateway("primary", url, "s", Faults(report_delay_ms=0), Retention(600.0))
    release = asyncio.Event()
    answered: list[bytes] = []

    async def service(request: httpx.Request) -> httpx.Response:
        await release.wait()
        answered.append(request.content)
        return httpx.Response(202, json={"status": "accepted"})

    gateway.start()
    await gateway._client.aclose()  # type: ignore[union-attr]
    gateway._client = httpx.AsyncClient(transport=httpx.MockTransport(service))
    yield Held(gateway, release, answered)
    release.set()
    await gateway.stop()


def message(n: int) -> Message:
    return Message(
        to=f"+849123{n % 100000:05d}",
        text=f"Hồ sơ 000.00.12.H34-{n:07d} đã được tiếp nhận",
        sender="MOTCUA",
        reference=f"sms:{n:064x}",
        metadata={"dossier_id": f"000.00.12.H34-{n:07d}", "template": "dossier_received"},
    )


async def accept(gateway: Gateway, first: int, count: int) -> None:
    """Accept messages as a server does, in batches of 500 with the loop running between."""
    for n in range(first, first + count):
        gateway.accept(f"sms:{n:064x}", message(n))
        if n % 500 == 499:
            await asyncio.sleep(0)


async def test_messages_waiting_for_their_reports_hold_a_few_hundred_bytes_each(
    held: Held,
) -> None:
    gateway, count = held.gateway, 20_000
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        await accept(gateway, 0, count)
        while not gateway._outbox.full():  # the senders hang, the drawing stops
            await asyncio.sleep(0.01)
        gc.collect()
        per_message = (tracemalloc.get_traced_memory()[0] - before) / count
    finally:
        tracemalloc.stop()
    assert gateway.reporting == count and len(gateway.by_key) == count
    # drawn: one report being sent per sender, one queued per sender, one in the drawer's hand
    assert len(gateway.waiting) >= count - 2 * SENDERS - 1
    assert gateway._outbox.qsize() == SENDERS
    assert len(gateway.accepted) == min(count, gateway.accepted.maxlen or 0)
    assert per_message < MOST_BYTES_PER_MESSAGE, per_message


async def test_reports_held_back_all_go_once_answered_and_then_the_keys_may_leave(
    held: Held,
) -> None:
    gateway = held.gateway
    gateway.faults = Faults(report_delay_ms=0, duplicate_report_rate=0.5, out_of_order_rate=0.5)
    await accept(gateway, 0, 300)
    while not gateway._outbox.full():
        await asyncio.sleep(0.01)
    assert len(gateway.waiting) >= 300 - 2 * SENDERS - 1
    held.release.set()
    while gateway.reporting:
        await asyncio.sleep(0.01)
    assert not gateway.waiting and gateway._outbox.empty()
    assert len(held.answered) == gateway.counts["reports"] >= 300
    assert len(gateway.retiring) == 300  # every key finished, due to leave


def test_the_inspection_list_length_is_a_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMS_SANDBOX_LATEST_KEPT", "7")
    assert GatewaySettings().latest_kept == 7
    monkeypatch.delenv("SMS_SANDBOX_LATEST_KEPT")
    assert GatewaySettings().latest_kept == 25_000


@pytest.mark.parametrize("count", [0, 1, LISTED_CHUNK, 2 * LISTED_CHUNK + 1])
async def test_the_listing_in_pieces_is_one_json_document(count: int) -> None:
    kept = [Kept(f"sms:{n:064x}", message(n)) for n in range(count)]
    body = b"".join([piece async for piece in listed_json("primary", kept)])
    assert orjson.loads(body) == {"provider": "primary", "accepted": [m.listed() for m in kept]}
