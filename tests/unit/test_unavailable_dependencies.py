"""Every service built by `create_service` answers 503 problem+json with Retry-After when a route
meets Redis or the broker away, whatever the route forgot to catch; never a 500."""

from __future__ import annotations

import httpx
import pytest
from aiokafka.errors import KafkaConnectionError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.requests import Request
from starlette.responses import Response

from services.common.kafka import BrokerUnavailable
from services.common.service import create_service
from services.common.settings import Settings

FAILURES: dict[str, Exception] = {
    "redis-down": RedisConnectionError("Error 111 connecting to 127.0.0.1:1. Connection refused."),
    "redis-slow": RedisTimeoutError("Timeout reading from socket"),
    "broker-down": BrokerUnavailable("not acknowledged: KafkaTimeoutError"),
    "kafka": KafkaConnectionError("no broker"),
    "refused": ConnectionRefusedError(111, "Connection refused"),
}


@pytest.fixture
def client() -> httpx.AsyncClient:
    service = create_service("outage-test", Settings())

    @service.api.get("/v1/things/{failure}")
    async def thing(failure: str) -> dict[str, str]:
        raise FAILURES[failure]

    async def webhook(request: Request) -> Response:
        raise FAILURES[request.path_params["failure"]]

    service.webhook("/v1/webhooks/test/{failure}", webhook)

    @service.api.get("/v1/bug")
    async def bug() -> dict[str, str]:
        raise ValueError("a bug is not an outage")

    transport = httpx.ASGITransport(app=service.api, raise_app_exceptions=False)
    return httpx.AsyncClient(transport=transport, base_url="http://test")


@pytest.mark.parametrize("failure", sorted(FAILURES))
@pytest.mark.parametrize("path", ["/v1/things/{}", "/v1/webhooks/test/{}"])
async def test_a_dependency_away_is_503_with_retry_after(
    client: httpx.AsyncClient, failure: str, path: str
) -> None:
    method = "GET" if path.startswith("/v1/things") else "POST"
    answer = await client.request(method, path.format(failure))
    assert answer.status_code == 503
    assert answer.headers["content-type"] == "application/problem+json"
    assert int(answer.headers["retry-after"]) >= 1
    body = answer.json()
    assert body["status"] == 503 and "unreachable" in body["detail"]


async def test_a_bug_is_not_dressed_up_as_an_outage(client: httpx.AsyncClient) -> None:
    answer = await client.get("/v1/bug")
    assert answer.status_code == 500
