"""The postal webhook as bootstrap wires it, over `httpx.ASGITransport`, with nothing behind it:
an unreachable Redis answers 503 with Retry-After (nothing accepted), and what is refused before
the claim (unknown carrier, bad signature, malformed body, too large) never needs Redis."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import orjson
import pytest

from services.common.settings import Settings
from services.common.signing import SIGNATURE_HEADER, sign_body
from services.postal.bootstrap import bootstrap

SECRET = "unit-vnpost-secret"
DID = "000.00.12.H34-190704-0001"
BODY = orjson.dumps(
    {
        "order_id": "VN000000001",
        "client_order_id": f"{DID}:pickup",
        "status_code": 6,
        "status_time": datetime.now(UTC).isoformat(),
    }
)
URL = "/v1/webhooks/postal/vnpost"


@pytest.fixture
async def client(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[httpx.AsyncClient]:
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    monkeypatch.setenv("KAFKA_BOOTSTRAP", "127.0.0.1:1")
    monkeypatch.setenv("VNPOST_SECRETS", SECRET)
    service = bootstrap(Settings())
    transport = httpx.ASGITransport(app=service.api)
    async with httpx.AsyncClient(transport=transport, base_url="http://postal") as client:
        yield client


def signed(body: bytes, secret: str = SECRET) -> dict[str, str]:
    return {"content-type": "application/json", SIGNATURE_HEADER: sign_body(body, secret)}


async def test_redis_down_answers_503_with_retry_after_and_accepts_nothing(
    client: httpx.AsyncClient,
) -> None:
    response = await client.post(URL, content=BODY, headers=signed(BODY))
    assert response.status_code == 503
    assert response.headers["Retry-After"]
    assert response.json()["status"] == 503  # a problem document (RFC 9457)


async def test_what_is_refused_before_the_claim_does_not_need_redis(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.post(URL, content=BODY, headers=signed(BODY, "forged"))).status_code == 401
    malformed = b'{"order_id": "VN1"}'
    assert (await client.post(URL, content=malformed, headers=signed(malformed))).status_code == 422
    nobody = "/v1/webhooks/postal/nobody"
    assert (await client.post(nobody, content=BODY, headers=signed(BODY))).status_code == 404
    big = b" " * (64 * 1024 + 1)
    assert (await client.post(URL, content=big, headers=signed(big))).status_code == 413
