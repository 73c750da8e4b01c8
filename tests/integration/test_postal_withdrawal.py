"""Postal after a withdrawal, against the real broker, Redis and the VNPost sandbox over loopback
HTTP (issue 14): a booked order nobody has touched is cancelled at the carrier and the leg is
reported `postal.failed` with the carrier's cancel reason; a booking the carrier never
acknowledged (it was away) is cancelled once it is back, never booked; a token the carrier
revoked is refreshed once and the call goes through."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import httpx
import pytest

from services.dev.embedded import Broker
from tests.support.factories import envelope
from tests.support.postal import (
    Seen,
    Stack,
    dossier_id,
    now_iso,
    postal_events,
    postal_stack,
    postal_submitted,
    produce,
    resolved,
    sandbox,
    wait_until,
)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def stack(broker: Broker, redis_url: str) -> Iterator[Stack]:
    # orders stay untouched (the sandbox's next status is a minute away) and the token cached
    # for an hour, so a cancel or a 401 here is the test's doing; stale queries every 2 s
    with postal_stack(
        broker,
        redis_url,
        VNPOST_SANDBOX_STEP_SECONDS="60",
        VNPOST_SANDBOX_TOKEN_TTL_SECONDS="3600",
        POSTAL_STALE_GIVE_UP_AFTER_DAYS=str(120 / 86400),
    ) as running:
        yield running


def withdrawn(did: str) -> dict[str, Any]:
    return envelope(
        "dossier.withdrawn",
        did,
        {"withdrawn_at": now_iso()},
        event_id=f"{did}-withdrawn",
        time=now_iso(),
    )


def rejected(did: str) -> dict[str, Any]:
    return envelope(
        "dossier.rejected",
        did,
        {"reason": "incomplete"},
        event_id=f"{did}-rejected",
        time=now_iso(),
    )


def orders_of(stack: Stack) -> dict[str, dict[str, Any]]:
    """The sandbox's orders by client order id (`<dossier>:<leg>`)."""
    return {o["client_order_id"]: o for o in sandbox(stack.ports.sandbox_url, "/sandbox/orders")}


def bookings(stack: Stack) -> dict[str, Any]:
    found: dict[str, Any] = sandbox(stack.ports.sandbox_url, "/sandbox/bookings")
    return found


def configure(stack: Stack, **config: object) -> None:
    response = httpx.put(f"{stack.ports.sandbox_url}/sandbox/config", json=config, timeout=10)
    assert response.status_code == 200, response.text


async def until(check: Callable[[], Awaitable[bool]], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.3)
    return True


async def requested(stack: Stack, legs: list[tuple[str, str]]) -> bool:
    seen = await postal_events(stack.broker.bootstrap)
    return all(f"postal.{leg}_requested" in seen.types(did, leg) for did, leg in legs)


def carrier_calls(stack: Stack, operation: str, outcome: str) -> float:
    """postal's own count of carrier calls (`/metrics`), as an operator would read it."""
    text = httpx.get(f"{stack.ports.postal_url}/metrics", timeout=10).text
    pattern = re.compile(
        r"^motcua_postal_carrier_calls_total\{(?=[^}]*carrier=\"vnpost\")"
        rf"(?=[^}}]*operation=\"{operation}\")(?=[^}}]*outcome=\"{outcome}\")[^}}]*\}} (\S+)$",
        re.MULTILINE,
    )
    found = pattern.search(text)
    return float(found.group(1)) if found else 0.0


async def test_withdrawal_or_rejection_cancels_untouched_orders_and_reports_them_failed(
    stack: Stack,
) -> None:
    pickup, ret, both = dossier_id(), dossier_id(), dossier_id()
    await produce(
        stack.broker.bootstrap,
        [
            postal_submitted(pickup, "pickup", cod=True),
            postal_submitted(ret, "return"),
            resolved(ret),
            postal_submitted(both, "pickup_and_return"),
        ],
    )
    legs = [(pickup, "pickup"), (ret, "return"), (both, "pickup")]
    assert await until(lambda: requested(stack, legs), 30), "the orders were never booked"
    booked = orders_of(stack)
    assert all(booked[f"{did}:{leg}"]["history"][-1][0] == 1 for did, leg in legs)  # untouched

    await produce(
        stack.broker.bootstrap,
        [withdrawn(pickup), withdrawn(ret), rejected(both), resolved(both)],
    )

    def all_cancelled() -> bool:
        orders = orders_of(stack)
        return all(orders[f"{did}:{leg}"]["cancelled"] for did, leg in legs)

    assert wait_until(all_cancelled, 30, interval=0.3), orders_of(stack)

    async def failed_seen() -> bool:
        seen = await postal_events(stack.broker.bootstrap)
        return all(seen.types(did, leg)[-1:] == ["postal.failed"] for did, leg in legs)

    assert await until(failed_seen, 30)
    seen: Seen = await postal_events(stack.broker.bootstrap)
    orders = orders_of(stack)
    expected = {"pickup": ("9", "collection_cancelled"), "return": ("22", "delivery_cancelled")}
    for did, leg in legs:
        order = orders[f"{did}:{leg}"]
        code, reason = expected[leg]
        assert [c for c, _ in order["history"]] == [1, int(code)], order
        assert seen.types(did, leg) == [f"postal.{leg}_requested", "postal.failed"]
        failed = seen.events(did, leg)[-1]
        assert failed["subject"] == did and failed["source"] == "motcua/postal"
        data = failed["data"]
        assert (data["reason"], data["carrier_code"]) == (reason, code)
        assert (data["order_id"], data["dossier_id"], data["leg"]) == (order["order_id"], did, leg)
    # one order each: the rejected dossier's return was not booked when it was resolved after
    counts = bookings(stack)["orders"]
    assert {did: counts.get(did) for did in (pickup, ret, both)} == dict.fromkeys(
        (pickup, ret, both), 1
    )
    assert carrier_calls(stack, "cancel", "ok") >= 3


async def test_a_booking_the_carrier_never_acknowledged_is_cancelled_not_booked_after_withdrawal(
    stack: Stack,
) -> None:
    did = dossier_id()
    creates_failed = carrier_calls(stack, "create", "error")
    cancels_failed = carrier_calls(stack, "cancel", "error")
    configure(stack, outage=True)
    try:
        await produce(stack.broker.bootstrap, [postal_submitted(did, "pickup")])
        assert wait_until(lambda: carrier_calls(stack, "create", "error") > creates_failed, 30)
        await produce(stack.broker.bootstrap, [withdrawn(did)])
        # the withdrawal's cancel met the outage too: postal has seen the withdrawal
        assert wait_until(lambda: carrier_calls(stack, "cancel", "error") > cancels_failed, 30)
    finally:
        configure(stack, outage=False)

    # back up: the next stale query cancels again by our reference; nothing books the order
    assert wait_until(lambda: bookings(stack)["cancel_requests"].get(did, 0) >= 1, 30)
    found = bookings(stack)
    assert found["create_requests"].get(did) is None and found["orders"].get(did) is None
    seen = await postal_events(stack.broker.bootstrap)
    assert "postal.pickup_requested" not in seen.types(did, "pickup")


async def test_a_revoked_token_is_refreshed_once_and_the_booking_goes_through(
    stack: Stack,
) -> None:
    first, second = dossier_id(), dossier_id()
    await produce(stack.broker.bootstrap, [postal_submitted(first, "pickup")])
    assert await until(lambda: requested(stack, [(first, "pickup")]), 30)  # a token is cached

    # read before the revocation: any call after it may be the one to meet the 401 (a stale
    # query too), and that one refreshes the token for the booking
    refused_before = bookings(stack)["unauthorized"]
    revoked = httpx.post(f"{stack.ports.sandbox_url}/sandbox/tokens/revoke", timeout=10)
    assert revoked.status_code == 200 and revoked.json()["revoked"] >= 1

    await produce(stack.broker.bootstrap, [postal_submitted(second, "pickup")])
    assert await until(lambda: requested(stack, [(second, "pickup")]), 30)

    after = bookings(stack)
    # a call met a 401 with the revoked token; one new token served every call after it, and
    # the booking went through once
    assert after["unauthorized"] > refused_before
    assert after["tokens_issued"] == 1
    assert after["orders"][second] == 1 and after["create_requests"][second] == 1
    seen = await postal_events(stack.broker.bootstrap)
    order_id = orders_of(stack)[f"{second}:pickup"]["order_id"]
    assert seen.events(second, "pickup")[0]["data"]["order_id"] == order_id
