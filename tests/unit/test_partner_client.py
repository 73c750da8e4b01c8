"""The partner client's retry loop through `httpx.MockTransport`: no server, no sleeping."""

from __future__ import annotations

import httpx
import pytest

from services.common.partner import IDEMPOTENCY_HEADER, PartnerClient, PartnerError, RetryPolicy


class ScriptedPartner:
    """Answers each call with the next status of `statuses` (the last one repeats)."""

    def __init__(self, *statuses: int) -> None:
        self.statuses = list(statuses)
        self.calls: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.calls.append(request)
        status = self.statuses[min(len(self.calls), len(self.statuses)) - 1]
        return httpx.Response(status, json={"call": len(self.calls)})


def client_of(partner: ScriptedPartner, slept: list[float], attempts: int = 4) -> PartnerClient:
    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    return PartnerClient(
        "http://partner.test",
        retry=RetryPolicy(attempts=attempts, base_delay=0.1, max_delay=1.0),
        sleep=sleep,
        transport=httpx.MockTransport(partner),
    )


async def test_503_twice_then_200_is_retried_with_one_idempotency_key() -> None:
    partner, slept = ScriptedPartner(503, 503, 200), list[float]()
    client = client_of(partner, slept)
    try:
        response = await client.request("POST", "/orders", idempotency_key="k-1", json={"a": 1})
    finally:
        await client.aclose()
    assert response.status_code == 200 and response.json() == {"call": 3}
    assert [c.headers[IDEMPOTENCY_HEADER] for c in partner.calls] == ["k-1"] * 3
    assert {str(c.url) for c in partner.calls} == {"http://partner.test/orders"}
    assert len(slept) == 2  # a backoff before each retry, none after the success


async def test_a_400_is_not_retried() -> None:
    partner, slept = ScriptedPartner(400), list[float]()
    client = client_of(partner, slept)
    try:
        with pytest.raises(PartnerError) as refused:
            await client.request("POST", "/orders", idempotency_key="k-2")
    finally:
        await client.aclose()
    assert refused.value.status == 400 and not refused.value.retryable
    assert len(partner.calls) == 1 and slept == []


async def test_retries_are_bounded_and_the_last_error_is_retryable() -> None:
    partner, slept = ScriptedPartner(503), list[float]()
    client = client_of(partner, slept, attempts=3)
    try:
        with pytest.raises(PartnerError) as down:
            await client.request("GET", "/status")
    finally:
        await client.aclose()
    assert down.value.retryable and down.value.status == 503
    assert len(partner.calls) == 3 and len(slept) == 2


async def test_a_transport_error_is_retried() -> None:
    calls: list[httpx.Request] = []

    def flaky(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        if len(calls) == 1:
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(200)

    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    client = PartnerClient(
        "http://partner.test",
        retry=RetryPolicy(attempts=2, base_delay=0.1),
        sleep=sleep,
        transport=httpx.MockTransport(flaky),
    )
    try:
        assert (await client.request("GET", "/status")).status_code == 200
    finally:
        await client.aclose()
    assert len(calls) == 2 and len(slept) == 1
