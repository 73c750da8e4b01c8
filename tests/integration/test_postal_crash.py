"""SIGKILL of the postal worker mid-stream books nothing twice (issue 5): after a restart every
dossier has exactly its order at the sandbox carrier, and one `*_requested` event id."""

from __future__ import annotations

import asyncio
import os
import signal
import uuid

import httpx
import pytest

from services.common.kafka import ensure_topics
from services.common.topics import declared_topics
from services.dev.embedded import Broker
from tests.support.postal import (
    Ports,
    dossier_id,
    postal_env,
    postal_events,
    postal_submitted,
    produce,
    sandbox,
    wait_until,
)
from tests.support.processes import motcua, process, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


async def test_sigkill_mid_stream_books_nothing_twice(broker: Broker, redis_url: str) -> None:
    await ensure_topics(broker.bootstrap, declared_topics(4))
    ports = Ports()
    # a restart after SIGKILL waits out the dead member's session (10 s): give up later than that
    env = postal_env(
        broker,
        redis_url,
        f"motcua-test-{uuid.uuid4().hex[:10]}",
        ports,
        POSTAL_STALE_GIVE_UP_AFTER_DAYS=str(90 / 86400),
    )
    dossiers = [dossier_id() for _ in range(80)]
    with motcua("vnpost-sandbox", env, ports.sandbox, ready=False, log_name="vnpost-sandbox"):
        # slow, failing carrier calls keep bookings in flight when the worker dies
        faults = {"error_rate": 0.2, "timeout_rate": 0.15, "missing_rate": 0.2}
        assert httpx.put(f"{ports.sandbox_url}/sandbox/config", json=faults).status_code == 200
        with process(["services.cli", "run", "postal"], env, "postal-crash") as first:
            wait_http(f"{ports.postal_url}/readyz", proc=first)
            await produce(
                broker.bootstrap,
                [postal_submitted(d, "pickup", cod=i % 2 == 0) for i, d in enumerate(dossiers)],
            )

            def some_booked() -> bool:
                orders = sandbox(ports.sandbox_url, "/sandbox/bookings")["orders"]
                return len(orders) >= 12

            assert wait_until(some_booked, 40, interval=0.05)
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        at_kill = sandbox(ports.sandbox_url, "/sandbox/bookings")["orders"]
        assert len(at_kill) < len(dossiers), "the worker finished before it was killed"

        with motcua("postal", env, ports.postal, log_name="postal-crash"):

            def all_booked() -> bool:
                orders = sandbox(ports.sandbox_url, "/sandbox/bookings")["orders"]
                return len(orders) == len(dossiers)

            assert wait_until(all_booked, 60)

            async def all_requested() -> bool:
                seen = await postal_events(broker.bootstrap)
                return all("postal.pickup_requested" in seen.types(d, "pickup") for d in dossiers)

            # a booking whose acknowledgement was lost is re-sent by the scan: give it time
            for _ in range(180):
                if await all_requested():
                    break
                await asyncio.sleep(0.5)

            bookings = sandbox(ports.sandbox_url, "/sandbox/bookings")
            assert {d: bookings["orders"].get(d) for d in dossiers} == dict.fromkeys(dossiers, 1)
            # the same orders were asked for more than once (retries, replays), booked once
            assert sum(bookings["create_requests"].values()) > len(dossiers)
            seen = await postal_events(broker.bootstrap)
            orders = {o["dossier_id"]: o for o in sandbox(ports.sandbox_url, "/sandbox/orders")}
            for d in dossiers:
                requested = [e for e in seen.events(d, "pickup") if e["type"].endswith("requested")]
                assert len(requested) == 1, d
                assert requested[0]["data"]["order_id"] == orders[d]["order_id"]
