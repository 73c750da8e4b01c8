"""Postal against the real broker, the real Redis and the VNPost sandbox over loopback HTTP,
with the sandbox's faults on (issue 5): orders by mode, exactly once; every result delivered or
accounted failed; COD amounts; stale orders; signed webhooks (CONTRACT section 6), each callback
accepted and written once however many copies arrive at once, bodies capped at 64 KiB."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest

from services.common.signing import sign_body
from services.dev.embedded import Broker
from tests.support.kafka import read_all
from tests.support.postal import (
    OLD_SECRET,
    SECRET,
    Seen,
    Stack,
    dossier_id,
    postal_events,
    postal_stack,
    postal_submitted,
    produce,
    resolved,
    sandbox,
    wait_until,
)

pytestmark = pytest.mark.integration

FINAL = {  # (leg, sandbox scenario) → the leg's last status event
    ("pickup", "delivered"): "postal.delivered_to_agency",
    ("pickup", "delivery_failed"): "postal.delivered_to_agency",
    ("pickup", "collection_failed"): "postal.failed",
    ("pickup", "returned_to_agency"): "postal.failed",
    ("pickup", "stuck"): "postal.failed",
    ("return", "delivered"): "postal.delivered",
    ("return", "delivery_failed"): "postal.delivered",
    ("return", "collection_failed"): "postal.delivered",
    ("return", "returned_to_agency"): "postal.returned_to_agency",
    ("return", "stuck"): "postal.failed",
}
LEGS = {
    "none": [],
    "pickup": ["pickup"],
    "return": ["return"],
    "pickup_and_return": ["pickup", "return"],
}


@pytest.fixture(scope="module")
def stack(broker: Broker, redis_url: str) -> Iterator[Stack]:
    with postal_stack(broker, redis_url) as running:
        yield running


def final_type(seen: Seen, did: str, leg: str) -> str | None:
    statuses = [t for t in seen.types(did, leg) if t != "postal.cod_collected"]
    return statuses[-1] if statuses else None


async def test_every_dossier_gets_exactly_its_orders_and_every_result_is_accounted(
    stack: Stack,
) -> None:
    faults = {
        "duplicate_rate": 0.2,
        "out_of_order_rate": 0.2,
        "missing_rate": 0.15,
        "error_rate": 0.1,
        "timeout_rate": 0.05,
        "collection_fail_rate": 0.15,
        "delivery_fail_rate": 0.15,
        "return_to_agency_rate": 0.15,
    }
    assert httpx.put(f"{stack.ports.sandbox_url}/sandbox/config", json=faults).status_code == 200

    modes = ["pickup", "return", "pickup_and_return", "none"]
    plans: dict[str, tuple[str, bool]] = {}
    events: list[dict[str, Any]] = []
    for i in range(28):
        did, mode, cod = dossier_id(), modes[i % 4], i % 3 != 2
        plans[did] = (mode, cod and mode != "none")
        events.append(postal_submitted(did, mode, cod=plans[did][1], fee=10_000 * (i + 1)))
    stuck = dossier_id()
    plans[stuck] = ("pickup", False)
    events.append(postal_submitted(stuck, "pickup", street="9 Lê Lợi [scenario:stuck]"))
    invalid = dossier_id()
    plans[invalid] = ("pickup_and_return", False)
    bad = postal_submitted(invalid, "pickup_and_return")
    del bad["data"]["applicant"]["address"]["commune"]
    events.append(bad)
    fees = {e["subject"]: e["data"]["fee"]["amount_vnd"] for e in events}
    results = [resolved(did, "denied" if n % 2 else "approved") for n, did in enumerate(plans)]
    # redeliveries of every input change nothing
    await produce(stack.broker.bootstrap, events + results + events[:10] + results[:10])

    booked = {did: len(LEGS[mode]) for did, (mode, _) in plans.items() if did != invalid}

    def all_booked() -> bool:
        orders = sandbox(stack.ports.sandbox_url, "/sandbox/bookings")["orders"]
        return all(orders.get(d, 0) >= n for d, n in booked.items() if n)

    assert wait_until(all_booked, 40)

    async def unfinished() -> tuple[Seen, list[str]]:
        seen = await postal_events(stack.broker.bootstrap)
        orders = {
            o["client_order_id"]: o for o in sandbox(stack.ports.sandbox_url, "/sandbox/orders")
        }
        problems = []
        for did, (mode, cod) in plans.items():
            for leg in LEGS[mode]:
                order = orders.get(f"{did}:{leg}")
                want = "postal.failed" if order is None else FINAL[(leg, order["scenario"])]
                got = final_type(seen, did, leg)
                paid = cod and order is not None and order["cod_reported"] is not None
                if got != want or (paid and "postal.cod_collected" not in seen.types(did, leg)):
                    problems.append(f"{did}:{leg} {seen.types(did, leg)} want {want} {order}")
        return seen, problems

    deadline = time.monotonic() + 60
    seen, problems = await unfinished()
    while problems and time.monotonic() < deadline:
        await asyncio.sleep(1)
        seen, problems = await unfinished()
    if problems:
        pytest.fail("legs short of their final status:\n" + "\n".join(problems))

    counts = sandbox(stack.ports.sandbox_url, "/sandbox/bookings")["orders"]
    orders = {o["client_order_id"]: o for o in sandbox(stack.ports.sandbox_url, "/sandbox/orders")}
    for did, (mode, cod) in plans.items():
        legs = LEGS[mode]
        if did == invalid:
            assert counts.get(did, 0) == 0
            for leg in legs:
                [failed] = seen.events(did, leg)
                assert failed["type"] == "postal.failed"
                assert failed["data"]["reason"] == "invalid_address"
            continue
        assert counts.get(did, 0) == len(legs), did  # exactly its orders, whatever the faults
        for leg in legs:
            types = seen.types(did, leg)
            requested = f"postal.{leg}_requested"
            assert types.count(requested) == 1 and types[0] == requested
            order = orders[f"{did}:{leg}"]
            assert seen.events(did, leg)[0]["data"]["order_id"] == order["order_id"]
            collected = [e for e in seen.events(did, leg) if e["type"] == "postal.cod_collected"]
            cod_leg = "pickup" if "pickup" in legs else "return"
            if cod and leg == cod_leg and order["cod_reported"] is not None:
                [money] = collected
                assert "amount_vnd" in money["data"], (money, order)
                assert money["data"]["amount_vnd"] == fees[did]
                assert money["data"]["expected_amount_vnd"] == fees[did]
                assert money["data"]["amount_mismatch"] is False
                first = seen.events(did, leg)[0]
                assert first["data"]["cod_amount_vnd"] == fees[did]
            else:
                assert collected == []
            if mode == "none":
                assert seen.events(did, leg) == []
    # the stuck order was queried, then given up: postal.failed with reason stale
    assert seen.events(stuck, "pickup")[-1]["data"]["reason"] == "stale"
    # faults really happened
    all_orders = list(orders.values())
    assert sum(o["callbacks_dropped"] for o in all_orders) > 0
    scenarios = {o["scenario"] for o in all_orders}
    assert {"delivered", "stuck"} <= scenarios and len(scenarios) >= 4
    metrics = httpx.get(f"{stack.ports.postal_url}/metrics").text
    assert (
        'motcua_webhook_calls_total{outcome="duplicate",partner="vnpost",service="postal"}'
        in metrics
    )
    assert 'motcua_postal_events_total{carrier="vnpost",status="picked_up"}' in metrics


def signed(body: bytes, secret: str = SECRET, at: int | None = None) -> dict[str, str]:
    return {"content-type": "application/json", "X-Motcua-Signature": sign_body(body, secret, at)}


async def test_webhook_verifies_signatures_rejects_malformed_bodies_and_dedupes(
    stack: Stack,
) -> None:
    did = dossier_id()
    await produce(
        stack.broker.bootstrap,
        [postal_submitted(did, "pickup", street="2 Lê Lợi [scenario:stuck]")],
    )

    def order() -> Any:
        # the sandbox's own script ("stuck": created, then code 2) must be over before this test
        # plays the carrier: a status stamped after ours would make ours out of order, ignored
        found = [
            o
            for o in sandbox(stack.ports.sandbox_url, "/sandbox/orders")
            if o["dossier_id"] == did and o["finished"]
        ]
        return found[0] if found else None

    placed = wait_until(order, 30)
    assert placed
    callback = {
        "order_id": placed["order_id"],
        "client_order_id": f"{did}:pickup",
        "status_code": 6,
        "status_time": datetime.now(UTC).isoformat(),
    }
    body = orjson.dumps(callback)
    post = httpx.Client(timeout=10)

    assert (
        post.post(
            stack.webhook, content=body, headers={"content-type": "application/json"}
        ).status_code
        == 401
    )
    assert post.post(stack.webhook, content=body, headers=signed(body, "forged")).status_code == 401
    old = int(time.time()) - 1000
    assert post.post(stack.webhook, content=body, headers=signed(body, at=old)).status_code == 401
    tampered = body.replace(b'"status_code":6', b'"status_code":14')
    assert post.post(stack.webhook, content=tampered, headers=signed(body)).status_code == 401

    for malformed in (
        b"{not json",
        b"[1, 2]",
        orjson.dumps({**callback, "status_time": "yesterday"}),
        orjson.dumps({**callback, "client_order_id": "nobody"}),
        orjson.dumps({k: v for k, v in callback.items() if k != "order_id"}),
    ):
        response = post.post(stack.webhook, content=malformed, headers=signed(malformed))
        assert response.status_code == 422, malformed

    # a rotated (older) secret is still active
    first = post.post(stack.webhook, content=body, headers=signed(body, OLD_SECRET))
    assert (first.status_code, first.json()) == (200, {"status": "accepted"})
    again = post.post(stack.webhook, content=body, headers=signed(body, at=int(time.time()) - 5))
    assert (again.status_code, again.json()) == (200, {"status": "duplicate"})

    # an unknown code is accepted, recorded and alerted; the worker keeps going
    later = (datetime.now(UTC) + timedelta(seconds=1)).isoformat()
    unknown = orjson.dumps({**callback, "status_code": 99, "status_time": later})
    assert post.post(stack.webhook, content=unknown, headers=signed(unknown)).json() == {
        "status": "accepted"
    }
    latest = (datetime.now(UTC) + timedelta(seconds=2)).isoformat()
    delivered = orjson.dumps({**callback, "status_code": 14, "status_time": latest})
    assert post.post(stack.webhook, content=delivered, headers=signed(delivered)).status_code == 200

    async def delivered_seen() -> bool:
        seen = await postal_events(stack.broker.bootstrap)
        return seen.types(did, "pickup")[-1:] == ["postal.delivered_to_agency"]

    deadline = time.monotonic() + 20
    while not await delivered_seen() and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    seen = await postal_events(stack.broker.bootstrap)
    assert seen.types(did, "pickup") == [
        "postal.pickup_requested",
        "postal.picked_up",
        "postal.delivered_to_agency",
    ]
    metrics = post.get(f"{stack.ports.postal_url}/metrics").text
    assert 'motcua_postal_alerts_total{kind="unknown_code"}' in metrics
    assert 'motcua_postal_carrier_codes_total{carrier="vnpost",code="99"}' in metrics
    assert 'outcome="unauthorized"' in metrics and 'outcome="malformed"' in metrics
    assert post.get(f"{stack.ports.postal_url}/readyz").status_code == 200
    assert (
        post.post(
            f"{stack.ports.postal_url}/v1/webhooks/postal/nobody",
            content=body,
            headers=signed(body),
        ).status_code
        == 404
    )


async def test_300_concurrent_copies_of_one_callback_are_accepted_once_and_written_once(
    stack: Stack,
) -> None:
    did = dossier_id()  # a dossier postal never planned: the consumer only alerts about it
    body = orjson.dumps(
        {
            "order_id": f"VNC{uuid.uuid4().hex[:9]}",
            "client_order_id": f"{did}:pickup",
            "status_code": 6,
            "status_time": datetime.now(UTC).isoformat(),
        }
    )
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
    async with httpx.AsyncClient(timeout=30, limits=limits) as client:
        responses = await asyncio.gather(
            *(client.post(stack.webhook, content=body, headers=signed(body)) for _ in range(300))
        )
    answers = [(r.status_code, r.json()["status"]) for r in responses]
    assert answers.count((200, "accepted")) == 1, sorted(set(answers))
    for response in responses:
        if response.status_code == 503:
            assert response.headers["Retry-After"]
        else:
            assert (response.status_code, response.json()["status"]) in {
                (200, "accepted"),
                (200, "duplicate"),
            }
    records = await read_all(stack.broker.bootstrap, "postal.callbacks", timeout=10, idle=1)
    written = [r for r in records if r.key == did.encode()]
    assert len(written) == 1
    assert orjson.loads(written[0].value)["kind"] == "callback"


async def test_a_body_over_64_kib_is_refused_with_or_without_a_content_length(
    stack: Stack,
) -> None:
    big = b"{" + b" " * (64 * 1024) + b"}"
    async with httpx.AsyncClient(timeout=10) as client:
        declared = await client.post(stack.webhook, content=big, headers=signed(big))
        assert "content-length" in declared.request.headers
        assert declared.status_code == 413

        async def chunks() -> AsyncIterator[bytes]:
            for start in range(0, len(big), 8192):
                yield big[start : start + 8192]

        streamed = await client.post(stack.webhook, content=chunks(), headers=signed(big))
        assert "content-length" not in streamed.request.headers
        assert streamed.request.headers["transfer-encoding"] == "chunked"
        assert streamed.status_code == 413
