"""The SMS service end to end: the real broker, the real Redis, two sandbox gateways over
loopback HTTP (the primary failing 20 % of calls: errors and timeouts), and the worker as a
real process that gets SIGKILLed mid-stream."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from services.common.events import decode_event
from services.common.kafka import ensure_topics
from services.common.signing import SIGNATURE_HEADER, sign_body
from services.common.topics import declared_topics
from services.dev.embedded import Broker, free_port, terminate_group
from services.sms.decisions import idempotency_key
from tests.conftest import service_env
from tests.support.factories import envelope, submitted
from tests.support.kafka import read_all
from tests.support.processes import ROOT, process, wait_http
from tests.support.prometheus import metric_total
from tests.support.redis_keys import delete_namespace

pytestmark = pytest.mark.integration

SECRET = "test-sms-secret"


class Stack:
    def __init__(self, broker: Broker, env: dict[str, str], port: int, gateways: list[str]):
        self.broker = broker
        self.env = env
        self.url = f"http://127.0.0.1:{port}"
        self.gateways = gateways
        self.worker: subprocess.Popen[bytes] | None = None
        self.started = 0

    def start_worker(self) -> None:
        log_dir = ROOT / "test-output" / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        self.started += 1
        with (log_dir / "sms-worker.log").open("ab") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "run", "sms"],
                env={**os.environ, **self.env},
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_http(f"{self.url}/readyz", timeout=90, proc=self.worker)

    def kill_worker(self) -> None:
        assert self.worker is not None
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait()

    def stop_worker(self) -> None:
        if self.worker is not None:
            terminate_group(self.worker, timeout=10)

    def accepted(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for gateway in self.gateways:
            out.extend(httpx.get(f"{gateway}/v1/messages", timeout=10).json()["accepted"])
        return out

    def references(self) -> Counter[str]:
        return Counter(m["reference"] for m in self.accepted())

    def wait_for(self, keys: set[str], timeout: float) -> Counter[str]:
        deadline = time.monotonic() + timeout
        seen: Counter[str] = Counter()
        while time.monotonic() < deadline:
            seen = self.references()
            if keys <= set(seen):
                return seen
            time.sleep(0.3)
        return seen


@pytest.fixture(scope="module")
def stack(broker: Broker, redis_url: str) -> Iterator[Stack]:
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    namespace = f"motcua-test-sms-{uuid.uuid4().hex[:10]}"
    sms_port, primary_port, secondary_port = free_port(), free_port(), free_port()
    env = service_env(
        broker,
        redis_url,
        namespace,
        SMS_PORT=str(sms_port),
        SMS_PUBLIC_URL=f"http://127.0.0.1:{sms_port}",
        SMS_PRIMARY_URL=f"http://127.0.0.1:{primary_port}",
        SMS_SECONDARY_URL=f"http://127.0.0.1:{secondary_port}",
        SMS_PRIMARY_SANDBOX_PORT=str(primary_port),
        SMS_SECONDARY_SANDBOX_PORT=str(secondary_port),
        SMS_SECRETS=f"{SECRET},older-secret",
        MOTCUA_DATA_DIR=tempfile.mkdtemp(prefix="motcua-sms-test-"),
        # Tests run at any hour: no quiet hours here (the deferral is a unit test).
        SMS_QUIET_START="00:00",
        SMS_QUIET_END="00:00",
        SMS_PER_NUMBER_RATE="1000",
        SMS_PER_NUMBER_BURST="1000",
        SMS_WEIGHTS='{"primary": 50, "secondary": 50}',
        SMS_WEIGHT_COOLDOWN_SECONDS="5",
        SMS_REQUEST_TIMEOUT_SECONDS="0.5",
        SMS_BACKOFF_BASE_SECONDS="0.05",
        SMS_TIMER_SECONDS="0.5",
        SMS_RESCAN_SECONDS="5",
    )
    faulty = {
        "SMS_SANDBOX_ERROR_RATE": "0.25",  # so that 40 dossiers surely meet some faults
        "SMS_SANDBOX_TIMEOUT_RATE": "0.1",
        "SMS_SANDBOX_HANG_SECONDS": "1.5",
        "SMS_SANDBOX_DUPLICATE_REPORT_RATE": "0.3",
        "SMS_SANDBOX_OUT_OF_ORDER_RATE": "0.3",
        "SMS_SANDBOX_UNDELIVERABLE_RATE": "0.05",
        "SMS_SANDBOX_REPORT_DELAY_MS": "50",
    }
    primary = ["services.cli", "run", "sms-primary-sandbox"]
    secondary = ["services.cli", "run", "sms-secondary-sandbox"]
    with (
        process(primary, {**env, **faulty}, "sms-primary-sandbox"),
        process(secondary, {**env, "SMS_SANDBOX_REPORT_DELAY_MS": "50"}, "sms-secondary"),
    ):
        gateways = [f"http://127.0.0.1:{primary_port}", f"http://127.0.0.1:{secondary_port}"]
        for gateway in gateways:
            wait_http(f"{gateway}/healthz", timeout=30)
        stack = Stack(broker, env, sms_port, gateways)
        stack.start_worker()
        try:
            yield stack
        finally:
            stack.stop_worker()
            delete_namespace(redis_url, namespace)


def dossier_events(n: int, tag: str) -> tuple[list[dict[str, Any]], set[str]]:
    """n dossiers: submitted, received and payment.requested; two messages each."""
    events: list[dict[str, Any]] = []
    expected: set[str] = set()
    now = datetime.now(UTC).isoformat()  # real time: the wait for a phone number runs from it
    for i in range(n):
        dossier = f"000.00.12.H34-{tag}-{i:04d}"
        phone = f"0905{abs(hash((tag, i))) % 1_000_000:06d}"
        first = submitted(dossier, applicant={"name": "Nguyễn Thị B", "phone": phone}) | {
            "time": now
        }
        received = envelope(
            "dossier.received",
            dossier,
            {
                "received_at": "2019-03-04T08:20:00+07:00",
                "due_at": "2019-03-11T17:00:00+07:00",
                "receipt_no": f"H34.{tag}.{i}",
            },
            time=now,
        )
        payment = envelope(
            "payment.requested",
            dossier,
            {
                "amount_vnd": 150000,
                "payment_url": f"https://pay.example/{tag}/{i}",
                "expires_at": "2019-03-04T08:35:00+07:00",
            },
            source="motcua/payments",
            time=now,
        )
        events += [first, received, payment]
        expected.add(idempotency_key(received["source"], received["id"], "dossier_received"))
        expected.add(idempotency_key(payment["source"], payment["id"], "payment_requested"))
    return events, expected


async def produce(bootstrap: str, events: list[dict[str, Any]], delay: float = 0.0) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for event in events:
            topic = "payment.events" if event["type"].startswith("payment.") else "dossier.events"
            await producer.send(topic, orjson.dumps(event), key=event["subject"].encode())
            if delay:
                await asyncio.sleep(delay)
        await producer.flush()
    finally:
        await producer.stop()


def sms_events(stack: Stack) -> list[Any]:
    records = asyncio.run(read_all(stack.broker.bootstrap, "sms.events", idle=2.0, timeout=30))
    return [decode_event(r.value) for r in records]


def test_every_message_is_accepted_exactly_once_across_both_gateways(stack: Stack) -> None:
    events, expected = dossier_events(40, "once")
    asyncio.run(produce(stack.broker.bootstrap, events))

    seen = stack.wait_for(expected, timeout=60)
    assert expected <= set(seen), f"missing {len(expected - set(seen))} of {len(expected)}"
    assert {k: c for k, c in seen.items() if c > 1} == {}
    primary = httpx.get(f"{stack.gateways[0]}/v1/stats").json()
    assert primary["errors"] + primary["timeouts"] > 0  # the faults really happened

    # sms.sent for each, and no sms.queued (sent at once: only a message that waits is queued);
    # delivery reports (duplicated, out of order) never move a delivered message back. A
    # gateway that accepted a message and left the answer hanging may report its delivery while
    # the sender is still retrying the call (same key, a replay): its sms.sent comes after.
    deadline = time.monotonic() + 20
    while True:
        by_key: dict[str, list[str]] = {}
        for event in sms_events(stack):
            key = event.to_dict()["data"].get("key")
            if key in expected:
                by_key.setdefault(key, []).append(event.type)
        delivered = {k for k, types in by_key.items() if "sms.delivered" in types}
        sent = {k for k, types in by_key.items() if "sms.sent" in types}
        if (sent >= expected and len(delivered) >= len(expected) * 0.8) or (
            time.monotonic() > deadline
        ):
            break
        time.sleep(1)
    for key in expected:
        types = by_key.get(key, [])
        assert "sms.sent" in types and "sms.queued" not in types, types
        if "sms.delivered" in types:
            assert "sms.failed" not in types[types.index("sms.delivered") :]
    assert len(delivered) >= len(expected) * 0.8


@pytest.mark.chaos
def test_sigkill_mid_stream_and_restart_sends_no_duplicate(stack: Stack) -> None:
    events, expected = dossier_events(120, "kill")

    async def feed() -> None:
        await produce(stack.broker.bootstrap, events, delay=0.004)

    with ThreadRunner(feed):
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if len(expected & set(stack.references())) >= 30:
                break
            time.sleep(0.1)
        before = len(expected & set(stack.references()))
        assert 0 < before < len(expected), before
        stack.kill_worker()
    stack.start_worker()

    seen = stack.wait_for(expected, timeout=90)
    assert expected <= set(seen), f"missing {len(expected - set(seen))} of {len(expected)}"
    assert {k: c for k, c in seen.items() if c > 1} == {}


def test_poison_message_goes_to_the_dlq_and_the_worker_keeps_going(stack: Stack) -> None:
    events, expected = dossier_events(1, "poison")
    later, later_expected = dossier_events(3, "after-poison")
    dossier = events[0]["subject"]
    no_link = envelope(
        "payment.requested",
        dossier,
        {"amount_vnd": 1},
        source="motcua/payments",
        time=datetime.now(UTC).isoformat(),
    )
    garbage = b"\xff not an event"
    asyncio.run(produce(stack.broker.bootstrap, events))
    assert expected <= set(stack.wait_for(expected, timeout=60))

    async def send_poison() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=stack.broker.bootstrap, acks="all")
        await producer.start()
        try:
            await producer.send_and_wait("dossier.events", garbage, key=b"D-garbage")
            await producer.send_and_wait(
                "payment.events", orjson.dumps(no_link), key=dossier.encode()
            )
        finally:
            await producer.stop()

    asyncio.run(send_poison())
    asyncio.run(produce(stack.broker.bootstrap, later))
    seen = stack.wait_for(later_expected, timeout=60)
    assert later_expected <= set(seen)  # the worker kept going

    dossier_dlq = asyncio.run(read_all(stack.broker.bootstrap, "dossier.events.dlq", expect=1))
    assert garbage in {r.value for r in dossier_dlq}
    payment_dlq = asyncio.run(read_all(stack.broker.bootstrap, "payment.events.dlq", expect=1))
    [dead] = [r for r in payment_dlq if r.value == orjson.dumps(no_link)]
    headers = dict(dead.headers)
    assert headers["error_type"] == b"PoisonMessage"
    assert b"payment_url" in headers["error"]
    assert {"error", "error_type", "attempts", "failed_at"} <= set(headers)
    failed = [e for e in sms_events(stack) if e.type == "sms.failed" and e.subject == dossier]
    assert any("render_error" in (e.data.reason or "") for e in failed)


def test_delivery_reports_forged_or_stale_are_401(stack: Stack) -> None:
    url = f"{stack.url}/v1/webhooks/sms/primary"
    body = orjson.dumps(
        {
            "event_id": f"rep-{uuid.uuid4().hex}",
            "message_id": "m-1",
            "reference": "sms:unknown",
            "dossier_id": "000.00.12.H34-report-0001",
            "status": "DELIVRD",
        }
    )

    def post(content: bytes, signature: str | None) -> httpx.Response:
        headers = {"content-type": "application/json"}
        if signature is not None:
            headers[SIGNATURE_HEADER] = signature
        return httpx.post(url, content=content, headers=headers, timeout=10)

    assert post(body, None).status_code == 401
    assert post(body, sign_body(body, "forged-secret")).status_code == 401
    assert post(body, sign_body(body, SECRET, int(time.time()) - 301)).status_code == 401
    assert post(body + b" ", sign_body(body, SECRET)).status_code == 401  # body changed
    malformed = b'{"event_id": "x"}'
    assert post(malformed, sign_body(malformed, SECRET)).status_code == 422
    unknown = body.replace(b"DELIVRD", b"WHATEVER")
    assert post(unknown, sign_body(unknown, SECRET)).status_code == 422

    first = post(body, sign_body(body, "older-secret"))  # a secret being rotated out still works
    assert (first.status_code, first.json()) == (200, {"status": "accepted"})
    again = post(body, sign_body(body, SECRET))
    assert (again.status_code, again.json()) == (200, {"status": "duplicate"})
    records = asyncio.run(read_all(stack.broker.bootstrap, "sms.callbacks", idle=1.0))
    event_id = orjson.loads(body)["event_id"]  # the topic also carries the sender's settle batches
    assert any(orjson.loads(r.value).get("event_id") == event_id for r in records)


def test_a_backlog_over_max_pending_waits_on_the_broker_and_every_message_goes_once(
    stack: Stack,
) -> None:
    """With room for 3 messages in flight, 80 messages decided at once: the worker holds its
    inputs while the news of those sent is on its way (`motcua_consumer_holds_total`), reads on
    once it is in, and every message still goes exactly once."""
    normal = stack.env
    stack.stop_worker()
    stack.env = {**normal, "SMS_MAX_PENDING": "3"}
    stack.start_worker()
    try:
        events, expected = dossier_events(40, "held")
        asyncio.run(produce(stack.broker.bootstrap, events))

        seen = stack.wait_for(expected, timeout=120)
        assert expected <= set(seen), f"missing {len(expected - set(seen))} of {len(expected)}"
        assert {k: c for k, c in seen.items() if c > 1} == {}
        assert metric_total(stack.url, "motcua_consumer_holds_total", service="sms") > 0
    finally:
        stack.stop_worker()
        stack.env = normal
        stack.start_worker()


class ThreadRunner:
    """Run a coroutine function on its own loop in a thread while the test goes on."""

    def __init__(self, fn: Any) -> None:
        import threading

        self._thread = threading.Thread(target=lambda: asyncio.run(fn()), daemon=True)

    def __enter__(self) -> ThreadRunner:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=60)
