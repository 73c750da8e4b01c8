"""The partner HTTP client against a real HTTP server on loopback."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from fastapi import FastAPI, Request, Response

from services.common.partner import PartnerClient, PartnerError, RetryPolicy
from services.dev.embedded import free_port

pytestmark = pytest.mark.integration


class FlakyPartner:
    """Fails the first `fail` calls of each path with 503, or sleeps past the timeout."""

    def __init__(self) -> None:
        self.calls: dict[str, list[str | None]] = {}
        self.api = FastAPI()

        @self.api.post("/{path}")
        async def handle(path: str, request: Request) -> Response:
            seen = self.calls.setdefault(path, [])
            seen.append(request.headers.get("idempotency-key"))
            if path == "slow" and len(seen) < 3:
                await asyncio.sleep(1.0)
            if path == "flaky" and len(seen) < 3:
                return Response(status_code=503)
            if path == "refused":
                return Response(status_code=400)
            if path == "down":
                return Response(status_code=502)
            return Response(b'{"ok": true}', media_type="application/json")


@pytest.fixture(scope="module")
def partner() -> Iterator[tuple[FlakyPartner, str]]:
    fake = FlakyPartner()
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(fake.api, port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    yield fake, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(5)


async def test_transient_failures_are_retried_with_one_idempotency_key(
    partner: tuple[FlakyPartner, str],
) -> None:
    fake, url = partner
    client = PartnerClient(url, timeout=0.3, retry=RetryPolicy(attempts=4, base_delay=0.01))
    try:
        assert (await client.request("POST", "/flaky", idempotency_key="k-1")).json() == {
            "ok": True
        }
        assert fake.calls["flaky"] == ["k-1", "k-1", "k-1"]
        assert (await client.request("POST", "/slow", idempotency_key="k-2")).status_code == 200
        assert fake.calls["slow"] == ["k-2"] * 3
    finally:
        await client.aclose()


async def test_permanent_errors_are_not_retried_and_retries_are_bounded(
    partner: tuple[FlakyPartner, str],
) -> None:
    fake, url = partner
    client = PartnerClient(url, timeout=0.3, retry=RetryPolicy(attempts=3, base_delay=0.01))
    try:
        with pytest.raises(PartnerError) as refused:
            await client.request("POST", "/refused")
        assert refused.value.status == 400 and not refused.value.retryable
        assert len(fake.calls["refused"]) == 1
        with pytest.raises(PartnerError) as down:
            await client.request("POST", "/down")
        assert down.value.retryable
        assert len(fake.calls["down"]) == 3
    finally:
        await client.aclose()
