"""The SMS delivery-report webhook's partner (verify, parse) and its door when Redis is away:
503 with Retry-After, never a 500, and nothing claimed."""

from __future__ import annotations

import asyncio
import socket

import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from starlette.applications import Starlette
from starlette.routing import Route

from services.common.claims import Claims
from services.common.kafka import DurablePublisher
from services.common.signing import SIGNATURE_HEADER, sign_body
from services.common.webhooks import InboundCall, Rejected, WebhookIntake, json_reply
from services.sms.inbox import Report as ReportItem
from services.sms.inbox import decode_callback
from services.sms.settings import PROVIDERS
from services.sms.webhook import delivery_report_partners

SECRET = "unit-sms-secret"
PARTNERS = delivery_report_partners(PROVIDERS, [SECRET, "older"], 300)
BODY = orjson.dumps(
    {
        "event_id": "rep-1",
        "message_id": "m-1",
        "reference": "sms:k1",
        "dossier_id": "D-1",
        "status": "DELIVRD",
        "occurred_at": "2026-11-25T12:00:00+07:00",
    }
)


def call(body: bytes, signature: str | None) -> InboundCall:
    headers = {} if signature is None else {SIGNATURE_HEADER: signature}
    return InboundCall(b"", body, headers)


def test_both_providers_verify_with_any_active_secret_and_refuse_the_rest() -> None:
    assert set(PARTNERS) == {"primary", "secondary"}
    for partner in PARTNERS.values():
        partner.verify(call(BODY, sign_body(BODY, SECRET)))
        partner.verify(call(BODY, sign_body(BODY, "older")))
        for signature in (None, sign_body(BODY, "forged"), sign_body(BODY + b" ", SECRET)):
            with pytest.raises(Rejected):
                partner.verify(call(BODY, signature))


def test_a_report_is_claimed_by_its_event_id_and_written_as_the_worker_reads_it() -> None:
    callback = PARTNERS["secondary"].parse(call(BODY, None))
    assert callback.event_id == "rep-1" and callback.key == b"D-1"
    item = decode_callback(callback.value)
    assert isinstance(item, ReportItem)
    assert item.provider == "secondary" and item.report.reference == "sms:k1"
    assert item.status.value == "delivered"


@pytest.mark.parametrize(
    "body",
    [
        b'{"event_id": "x"}',
        BODY.replace(b"DELIVRD", b"WHATEVER"),
        b"not json",
    ],
)
def test_a_malformed_or_unknown_report_is_rejected(body: bytes) -> None:
    with pytest.raises(Rejected):
        PARTNERS["primary"].parse(call(body, None))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_redis_away_is_503_with_retry_after_never_500() -> None:
    port = closed_port()
    no_retries = Retry(NoBackoff(), 0)
    client = aioredis.Redis(
        host="127.0.0.1", port=port, socket_connect_timeout=0.5, retry=no_retries
    )
    intake = WebhookIntake(
        "sms",
        PARTNERS,
        path_param="provider",
        topic="sms.callbacks",
        claims=Claims(client, 3600),
        claim_key=lambda provider, event_id: f"t:sms:report:{provider}:{event_id}",
        publisher=DurablePublisher(f"127.0.0.1:{closed_port()}", timeout=0.5),
        reply=json_reply,
    )
    app = Starlette(
        routes=[Route("/v1/webhooks/sms/{provider}", intake.endpoint, methods=["POST"])]
    )

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://sms") as http:
            return await http.post(
                "/v1/webhooks/sms/primary",
                content=BODY,
                headers={SIGNATURE_HEADER: sign_body(BODY, SECRET)},
            )

    answer = asyncio.run(post())
    assert answer.status_code == 503
    assert answer.headers["retry-after"]
    assert answer.json()["status"] == 503  # a problem document (RFC 9457)
