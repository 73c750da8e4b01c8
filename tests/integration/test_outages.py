"""A dependency away answers 503 with Retry-After, never 500: services pointed at a Redis where
nothing listens, as real processes over loopback HTTP, with the real broker."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import httpx
import orjson
import pytest

from services.common.kafka import ensure_topics
from services.common.signing import SIGNATURE_HEADER, sign_body
from services.common.topics import declared_topics
from services.dev.embedded import Broker, free_port
from tests.conftest import PORTAL_KEY, service_env
from tests.support.processes import motcua, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

SMS_SECRET = "test-outage-sms-secret"
POSTAL_SECRET = "test-outage-postal-secret"


@dataclass(frozen=True)
class Urls:
    sms: str
    postal: str
    intake: str


@pytest.fixture(scope="module")
def without_redis(broker: Broker) -> Iterator[Urls]:
    """SMS, postal and intake started against a Redis URL on a port nothing listens on."""
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    nowhere = f"redis://127.0.0.1:{free_port()}/0"
    ports = {name: free_port() for name in ("sms", "postal", "intake")}
    env = service_env(
        broker,
        nowhere,
        f"motcua-test-outage-{uuid.uuid4().hex[:8]}",
        SMS_PORT=str(ports["sms"]),
        POSTAL_PORT=str(ports["postal"]),
        INTAKE_PORT=str(ports["intake"]),
        SMS_SECRETS=SMS_SECRET,
        VNPOST_SECRETS=POSTAL_SECRET,
        # no partner is called here
        SMS_PRIMARY_URL=f"http://127.0.0.1:{free_port()}",
        SMS_SECONDARY_URL=f"http://127.0.0.1:{free_port()}",
        VNPOST_URL=f"http://127.0.0.1:{free_port()}",
        MOTCUA_DATA_DIR=tempfile.mkdtemp(prefix="motcua-outage-"),
    )
    with ExitStack() as stack:
        processes = {
            name: stack.enter_context(
                motcua(name, env, port, ready=False, log_name=f"outage-{name}")
            )
            for name, port in ports.items()
        }
        for name, port in ports.items():  # every one up (healthz) before the first check
            wait_http(f"http://127.0.0.1:{port}/healthz", proc=processes[name])
        yield Urls(*(f"http://127.0.0.1:{ports[n]}" for n in ("sms", "postal", "intake")))


def assert_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/problem+json", response.headers
    assert int(response.headers["retry-after"]) >= 1
    problem = response.json()
    assert problem["status"] == 503 and problem["detail"], problem


def test_the_sms_webhook_answers_503_with_retry_after_while_redis_is_away(
    without_redis: Urls,
) -> None:
    body = orjson.dumps(
        {
            "event_id": f"rep-{uuid.uuid4().hex}",
            "message_id": "m-1",
            "reference": "sms:outage",
            "dossier_id": "000.00.12.H34-261126-0001",
            "status": "DELIVRD",
        }
    )
    headers = {"content-type": "application/json", SIGNATURE_HEADER: sign_body(body, SMS_SECRET)}
    answer = httpx.post(
        f"{without_redis.sms}/v1/webhooks/sms/primary", content=body, headers=headers, timeout=30
    )
    assert_unavailable(answer)
    # a forged report is still refused for what it is: the outage does not hide a 401
    forged = {**headers, SIGNATURE_HEADER: sign_body(body, "not-the-secret")}
    refused = httpx.post(
        f"{without_redis.sms}/v1/webhooks/sms/primary", content=body, headers=forged, timeout=30
    )
    assert refused.status_code == 401


def test_the_postal_webhook_answers_503_with_retry_after_while_redis_is_away(
    without_redis: Urls,
) -> None:
    body = orjson.dumps(
        {
            "order_id": f"VN{uuid.uuid4().hex[:12]}",
            "client_order_id": "000.00.12.H34-261126-0001:pickup",
            "status_code": 200,
            "status_time": "2026-11-26T08:00:00+07:00",
        }
    )
    headers = {
        "content-type": "application/json",
        SIGNATURE_HEADER: sign_body(body, POSTAL_SECRET),
    }
    answer = httpx.post(
        f"{without_redis.postal}/v1/webhooks/postal/vnpost",
        content=body,
        headers=headers,
        timeout=30,
    )
    assert_unavailable(answer)


def test_intake_answers_503_with_retry_after_while_redis_is_away(without_redis: Urls) -> None:
    event = {
        "specversion": "1.0",
        "id": uuid.uuid4().hex,
        "source": "portal/test",
        "type": "dossier.rejected",
        "subject": "000.00.12.H34-261126-0001",
        "time": "2026-11-26T08:15:00+07:00",
        "datacontenttype": "application/json",
        "data": {
            "dossier_id": "000.00.12.H34-261126-0001",
            "agency_code": "000.00.12.H34",
            "reason": "incomplete",
        },
    }
    answer = httpx.post(
        f"{without_redis.intake}/v1/events",
        json=event,
        headers={"Authorization": f"Bearer {PORTAL_KEY}"},
        timeout=30,
    )
    assert_unavailable(answer)


@pytest.mark.parametrize("service", ["sms", "postal", "intake"])
def test_readiness_says_not_ready_while_redis_is_away(without_redis: Urls, service: str) -> None:
    answer = httpx.get(f"{getattr(without_redis, service)}/readyz", timeout=30)
    assert answer.status_code == 503
    assert answer.json()["status"] == "not ready"
