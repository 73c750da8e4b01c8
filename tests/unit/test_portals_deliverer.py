"""The portals' outbound shell (services/portals/deliverer.py): signed bodies, the delivery id,
2xx only, the timeout, and a slow portal holding only its own slots."""

from __future__ import annotations

import asyncio

import httpx

from services.common.signing import SIGNATURE_HEADER, verify_body
from services.portals.deliverer import DELIVERY_HEADER, Deliverer

BODY = b'{"specversion":"1.0","id":"ev-1","type":"payment.succeeded"}'


def deliverer(handler: object, *, timeout: float = 5.0, per_portal: int = 2) -> Deliverer:
    transport = httpx.MockTransport(handler)  # type: ignore[arg-type]
    return Deliverer(timeout=timeout, per_portal=per_portal, concurrency=8, transport=transport)


def test_a_delivery_is_signed_and_carries_its_id() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    async def run() -> None:
        d = deliverer(handler)
        answer = await d.post("portal/a", "https://a.example/cb", "secret-a", "ev-1", BODY)
        assert answer.ok and answer.status_code == 204 and answer.error is None
        await d.close()

    asyncio.run(run())
    [request] = seen
    assert request.content == BODY
    assert request.headers[DELIVERY_HEADER] == "ev-1"
    verify_body(BODY, request.headers[SIGNATURE_HEADER], ["secret-a"])


def test_only_a_2xx_is_delivered() -> None:
    codes = iter([301, 404, 500, 200])

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(next(codes), headers={"Location": "https://elsewhere.example/"})

    async def run() -> list[tuple[bool, int | None]]:
        d = deliverer(handler)
        out = []
        for _ in range(4):
            a = await d.post("portal/a", "https://a.example/cb", "s", "ev-1", BODY)
            out.append((a.ok, a.status_code))
        await d.close()
        return out

    assert asyncio.run(run()) == [(False, 301), (False, 404), (False, 500), (True, 200)]


def test_no_answer_within_the_timeout_is_a_failed_attempt() -> None:
    async def handler(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(10)
        return httpx.Response(200)

    async def run() -> None:
        d = deliverer(handler, timeout=0.05)
        answer = await d.post("portal/a", "https://a.example/cb", "s", "ev-1", BODY)
        assert not answer.ok and answer.status_code is None
        assert answer.error is not None and "within" in answer.error
        await d.close()

    asyncio.run(run())


def test_a_slow_portal_holds_only_its_own_slots() -> None:
    release = asyncio.Event()

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.host == "slow.example":
            await release.wait()
        return httpx.Response(200)

    async def run() -> None:
        d = deliverer(handler, per_portal=2)
        slow = [
            asyncio.create_task(d.post("portal/slow", "https://slow.example/", "s", f"s{i}", BODY))
            for i in range(10)
        ]
        await asyncio.sleep(0.05)
        assert d.busy("portal/slow")
        # the other portal's deliveries go through while every slow slot is taken
        fast = await asyncio.wait_for(
            asyncio.gather(
                *(
                    d.post("portal/fast", "https://fast.example/", "s", f"f{i}", BODY)
                    for i in range(5)
                )
            ),
            timeout=2.0,
        )
        assert all(a.ok for a in fast)
        assert not any(t.done() for t in slow)
        release.set()
        assert all(a.ok for a in await asyncio.gather(*slow))
        await d.close()

    asyncio.run(run())
