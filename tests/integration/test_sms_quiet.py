"""Quiet hours with the real worker: a message decided inside them is announced `sms.queued`
(with when it may go) and not sent; an urgent one is sent at once and never announced as queued."""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from services.common.events import decode_event
from services.common.kafka import ensure_topics
from services.common.topics import declared_topics
from services.common.tz import VIETNAM_TZ
from services.dev.embedded import Broker, free_port
from services.sms.decisions import idempotency_key
from tests.conftest import service_env
from tests.integration.test_sms_service import dossier_events, produce
from tests.support.kafka import read_all
from tests.support.processes import process, wait_http

pytestmark = pytest.mark.integration


def window_around_now() -> tuple[str, str]:
    local = datetime.now(UTC).astimezone(VIETNAM_TZ)
    start, end = local - timedelta(hours=1), local + timedelta(hours=1)
    return start.strftime("%H:%M"), end.strftime("%H:%M")


@pytest.fixture(scope="module")
def quiet_stack(broker: Broker, redis_url: str) -> Iterator[tuple[Broker, list[str]]]:
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    sms_port, primary_port, secondary_port = free_port(), free_port(), free_port()
    start, end = window_around_now()
    env = service_env(
        broker,
        redis_url,
        f"motcua-test-sms-quiet-{uuid.uuid4().hex[:10]}",
        SMS_PORT=str(sms_port),
        SMS_PUBLIC_URL=f"http://127.0.0.1:{sms_port}",
        SMS_PRIMARY_URL=f"http://127.0.0.1:{primary_port}",
        SMS_SECONDARY_URL=f"http://127.0.0.1:{secondary_port}",
        SMS_PRIMARY_SANDBOX_PORT=str(primary_port),
        SMS_SECONDARY_SANDBOX_PORT=str(secondary_port),
        MOTCUA_DATA_DIR=tempfile.mkdtemp(prefix="motcua-sms-quiet-"),
        SMS_QUIET_START=start,
        SMS_QUIET_END=end,
        SMS_SANDBOX_REPORTS="false",
    )
    gateways = [f"http://127.0.0.1:{primary_port}", f"http://127.0.0.1:{secondary_port}"]
    with (
        process(["services.cli", "run", "sms-primary-sandbox"], env, "sms-quiet-primary"),
        process(["services.cli", "run", "sms-secondary-sandbox"], env, "sms-quiet-secondary"),
        process(["services.cli", "run", "sms"], env, "sms-quiet-worker"),
    ):
        for gateway in gateways:
            wait_http(f"{gateway}/healthz", timeout=30)
        wait_http(f"http://127.0.0.1:{sms_port}/readyz", timeout=90)
        yield broker, gateways


def test_inside_quiet_hours_a_message_is_queued_and_an_urgent_one_sent(
    quiet_stack: tuple[Broker, list[str]],
) -> None:
    broker, gateways = quiet_stack
    events, _ = dossier_events(3, "quiet")
    waiting = {
        idempotency_key(e["source"], e["id"], "dossier_received")
        for e in events
        if e["type"] == "dossier.received"
    }
    urgent = {  # payment links are urgent: they ignore quiet hours
        idempotency_key(e["source"], e["id"], "payment_requested")
        for e in events
        if e["type"] == "payment.requested"
    }
    asyncio.run(produce(broker.bootstrap, events))

    deadline = time.monotonic() + 45
    by_key: dict[str, dict[str, dict[str, object]]] = {}
    while time.monotonic() < deadline:
        records = asyncio.run(read_all(broker.bootstrap, "sms.events", idle=1.0, timeout=20))
        for record in records:
            event = decode_event(record.value)
            data = event.to_dict()["data"]
            by_key.setdefault(data["key"], {})[event.type] = data
        if all("sms.queued" in by_key.get(k, {}) for k in waiting) and all(
            "sms.sent" in by_key.get(k, {}) for k in urgent
        ):
            break
        time.sleep(0.5)
    for key in waiting:
        queued = by_key[key]["sms.queued"]
        assert queued["reason"] == "quiet_hours"
        assert datetime.fromisoformat(str(queued["not_before"])) > datetime.now(UTC)
        assert "sms.sent" not in by_key[key]
    for key in urgent:
        assert set(by_key[key]) == {"sms.sent"}  # sent at once: never announced as queued
    sent = {
        m["reference"] for g in gateways for m in httpx.get(f"{g}/v1/messages").json()["accepted"]
    }
    assert urgent <= sent and not waiting & sent
