"""Personal data through the whole stack (CONTRACT section 10), for real: the Tansu broker, Redis,
intake, payments, postal, SMS and metrics as processes, the SMS and VNPost sandboxes over
loopback HTTP, operators' tokens from the dev issuer.

- SMS opens the sealed phone to send; postal opens the sealed address to book.
- Erasure (`DELETE /v1/dossiers/{id}/personal-data`, admin): an SMS not yet sent is suppressed
  (`erased`), a postal order not yet booked fails (`erased`), an audit event records it, intake
  refuses that dossier's personal data again; the access request shows what is held.
- After a run of the simulator through the stack, no applicant's name, phone, e-mail or address
  is in the raw bytes of any topic (events, changelogs, callbacks, dead letters) or Redis key.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.structs import TopicPartition

from services.common.events import decode_event
from services.common.kafka import ensure_topics
from services.common.sealing import (
    Keks,
    KeyBook,
    Tampered,
    WrappedKey,
    is_sealed,
    unseal_data,
)
from services.common.settings import DEV_KEK
from services.common.survey_links import link_for, sign
from services.common.topics import declared_topics
from services.dev.embedded import Broker, free_port
from services.sms.decisions import idempotency_key
from tests.conftest import PORTAL_KEY, service_env
from tests.support.factories import envelope, submitted
from tests.support.kafka import read_all
from tests.support.operators import Issuer
from tests.support.processes import process, run_cli, wait_http
from tests.support.redis_keys import delete_namespace

pytestmark = pytest.mark.integration

KEKS = Keks.parse(DEV_KEK)
ADDRESS = {"province": "Khánh Hòa", "district": "Nha Trang", "commune": "Lộc Thọ"}


@dataclass
class Stack:
    broker: Broker
    env: dict[str, str]
    urls: dict[str, str]
    namespace: str
    redis_url: str

    def post(self, body: Any) -> httpx.Response:
        return httpx.post(
            f"{self.urls['intake']}/v1/events",
            content=orjson.dumps(body),
            headers={"content-type": "application/json", "authorization": f"Bearer {PORTAL_KEY}"},
            timeout=30,
        )

    def personal_data(
        self, method: str, dossier_id: str, headers: dict[str, str]
    ) -> httpx.Response:
        return httpx.request(
            method,
            f"{self.urls['intake']}/v1/dossiers/{dossier_id}/personal-data",
            headers=headers,
            timeout=30,
        )

    def sms_accepted(self) -> list[dict[str, Any]]:
        answer = httpx.get(f"{self.urls['sms-primary-sandbox']}/v1/messages", timeout=10)
        accepted: list[dict[str, Any]] = answer.json()["accepted"]
        return accepted

    def bookings(self) -> dict[str, int]:
        answer = httpx.get(f"{self.urls['vnpost-sandbox']}/sandbox/bookings", timeout=10)
        orders: dict[str, int] = answer.json()["orders"]
        return orders


@pytest.fixture(scope="module")
def stack(broker: Broker, redis_url: str, issuer: Issuer) -> Iterator[Stack]:
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    namespace = f"motcua-test-pii-{uuid.uuid4().hex[:10]}"
    ports = {
        name: free_port()
        for name in (
            "intake",
            "payments",
            "postal",
            "sms",
            "metrics",
            "sms-primary-sandbox",
            "vnpost-sandbox",
        )
    }
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    env = service_env(
        broker,
        redis_url,
        namespace,
        MOTCUA_OIDC_ISSUER=issuer.url,
        INTAKE_PORT=str(ports["intake"]),
        PAYMENTS_PORT=str(ports["payments"]),
        PAYMENTS_PUBLIC_URL=urls["payments"],
        POSTAL_PORT=str(ports["postal"]),
        POSTAL_PUBLIC_URL=urls["postal"],
        SMS_PORT=str(ports["sms"]),
        SMS_PUBLIC_URL=urls["sms"],
        METRICS_PORT=str(ports["metrics"]),
        SMS_PRIMARY_SANDBOX_PORT=str(ports["sms-primary-sandbox"]),
        SMS_PRIMARY_URL=urls["sms-primary-sandbox"],
        SMS_WEIGHTS='{"primary": 100}',
        SMS_QUIET_START="00:00",
        SMS_QUIET_END="00:00",
        SMS_PER_NUMBER_RATE="1000",
        SMS_PER_NUMBER_BURST="1000",
        SMS_TIMER_SECONDS="0.5",
        VNPOST_SANDBOX_PORT=str(ports["vnpost-sandbox"]),
        VNPOST_URL=urls["vnpost-sandbox"],
        VNPOST_SANDBOX_STEP_SECONDS="0.25",
        POSTAL_SCAN_INTERVAL_SECONDS="0.5",
        MOTCUA_DATA_DIR=tempfile.mkdtemp(prefix="motcua-pii-test-"),
        # traced: only what a caller's sampled `traceparent` starts (no trace of their own)
        MOTCUA_TRACES_DIR=tempfile.mkdtemp(prefix="motcua-pii-traces-"),
        OTEL_TRACES_SAMPLER="parentbased_traceidratio",
        OTEL_TRACES_SAMPLER_ARG="0",
    )
    names = list(ports)
    with contextlib.ExitStack() as running:
        procs = {
            name: running.enter_context(process(["services.cli", "run", name], env, f"pii-{name}"))
            for name in names
        }
        for name in names:
            path = "healthz" if name.endswith("sandbox") else "readyz"
            wait_http(f"{urls[name]}/{path}", timeout=120, proc=procs[name])
        yield Stack(broker, env, urls, namespace, redis_url)
    delete_namespace(redis_url, namespace)


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"not within {timeout} s: {what}")


def now_iso() -> str:
    return datetime.now(UTC).astimezone().isoformat()


def dossier(tag: str) -> str:
    return f"000.00.12.H34-PII{uuid.uuid4().hex[:6]}-{tag}"


def filed(did: str, *, mode: str = "none", phone: str = "0905123456") -> dict[str, Any]:
    return submitted(
        did,
        event_id=f"{did}-submitted",
        time=now_iso(),
        submitted_at=now_iso(),
        applicant={
            "name": "Trần Thị Kín",
            "phone": phone,
            "email": "kin.tran@example.vn",
            "address": {**ADDRESS, "street": "7 Hẻm Bí Mật"},
        },
        fee={"amount_vnd": 0, "method": "none"},
        postal={"mode": mode},
    )


def received(did: str) -> dict[str, Any]:
    return envelope(
        "dossier.received",
        did,
        {
            "received_at": now_iso(),
            "due_at": "2031-03-11T17:00:00+07:00",
            "receipt_no": f"R-{did[-12:]}",
        },
        event_id=f"{did}-received",
        time=now_iso(),
    )


def resolved(did: str) -> dict[str, Any]:
    return envelope(
        "dossier.resolved",
        did,
        {"resolved_at": now_iso(), "outcome": "approved"},
        event_id=f"{did}-resolved",
        time=now_iso(),
    )


def events_of(stack: Stack, topic: str, did: str) -> list[dict[str, Any]]:
    records = asyncio.run(read_all(stack.broker.bootstrap, topic, idle=0.5, timeout=10))
    return [decode_event(r.value).to_dict() for r in records if r.value and r.key == did.encode()]


def test_sms_and_postal_open_what_they_need_and_erasure_stops_them(
    stack: Stack, issuer: Issuer
) -> None:
    admin = issuer.headers("admin", sub="dpo-officer")
    kept, erased_sms, erased_postal = dossier("KEPT"), dossier("SMS"), dossier("POST")
    # sealed on the way in; SMS opens the phone to send, postal the address to book the pickup
    assert stack.post([filed(kept, mode="pickup"), received(kept)]).status_code == 202
    kept_key = idempotency_key("portal/test", f"{kept}-received", "dossier_received")
    wait_until(
        lambda: any(m["reference"] == kept_key for m in stack.sms_accepted()),
        60,
        "the SMS of the kept dossier",
    )
    sent = next(m for m in stack.sms_accepted() if m["reference"] == kept_key)
    assert sent["to_suffix"] == "56"  # the applicant's own number, opened for the call
    wait_until(lambda: stack.bookings().get(kept, 0) >= 1, 60, "the pickup of the kept dossier")

    # erased before its SMS and before its return is booked
    assert stack.post([filed(erased_sms), filed(erased_postal, mode="return")]).status_code == 202
    for did in (erased_sms, erased_postal):
        refused = stack.personal_data("DELETE", did, issuer.headers("viewer"))
        assert refused.status_code == 403
        answer = stack.personal_data("DELETE", did, admin)
        assert answer.status_code == 202, answer.text
    assert stack.post([received(erased_sms), resolved(erased_postal)]).status_code == 202

    def suppressed() -> bool:
        return any(
            e["type"] == "sms.suppressed" and e["data"]["reason"] == "erased"
            for e in events_of(stack, "sms.events", erased_sms)
        )

    wait_until(suppressed, 60, "sms.suppressed (erased)")
    erased_key = idempotency_key("portal/test", f"{erased_sms}-received", "dossier_received")
    assert all(m["reference"] != erased_key for m in stack.sms_accepted())

    def failed() -> bool:
        return any(
            e["type"] == "postal.failed" and e["data"]["reason"] == "erased"
            for e in events_of(stack, "postal.events", erased_postal)
        )

    wait_until(failed, 60, "postal.failed (erased)")
    assert stack.bookings().get(erased_postal, 0) == 0

    audits = asyncio.run(read_all(stack.broker.bootstrap, "audit.events", idle=0.5))
    erasures = [
        (e["type"], e["subject"], e["data"]["actor"], e["data"]["outcome"])
        for e in (decode_event(r.value).to_dict() for r in audits)
        if e["subject"] in (erased_sms, erased_postal)
    ]
    # exactly one event per erasure (the viewer's refused attempts change nothing: none)
    assert sorted(erasures) == sorted(
        [
            ("audit.personal_data_erased", erased_sms, "dpo-officer", "succeeded"),
            ("audit.personal_data_erased", erased_postal, "dpo-officer", "succeeded"),
        ]
    )

    # intake refuses to take an erased dossier's personal data back; other events still pass
    again = filed(erased_sms) | {"id": f"{erased_sms}-submitted-again"}
    refused = stack.post(again)
    assert refused.status_code == 409
    assert refused.json()["errors"][0]["index"] == 0

    # the access request: what is held, in clear, and who uses it
    held = stack.personal_data("GET", kept, admin)
    assert held.status_code == 200, held.text
    body = held.json()
    assert body["erased"] is False
    assert body["personal_data"] == {
        "applicant.name": "Trần Thị Kín",
        "applicant.phone": "0905123456",
        "applicant.email": "kin.tran@example.vn",
        "applicant.address": {**ADDRESS, "street": "7 Hẻm Bí Mật"},
    }
    assert {use["service"] for use in body["used_by"]} == {"intake", "sms", "postal"}
    gone = stack.personal_data("GET", erased_sms, admin).json()
    assert gone["erased"] is True and gone["personal_data"] == {}
    assert stack.personal_data("GET", "never-heard-of", admin).status_code == 404
    assert stack.personal_data("GET", "x" * 200, admin).status_code == 422
    assert stack.personal_data("GET", kept, issuer.headers("finance")).status_code == 403
    assert stack.personal_data("GET", kept, {}).status_code == 401


# --- nothing in clear at rest -------------------------------------------------------------------


async def every_record(bootstrap: str) -> list[bytes]:
    """The raw bytes (key, value, headers) of every record of every topic."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [t for t in await admin.list_topics() if not t.startswith("__")]
    finally:
        await admin.close()
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest"
    )
    await consumer.start()
    chunks: list[bytes] = []
    try:
        await consumer.topics()
        tps = [
            TopicPartition(name, p)
            for name in names
            for p in sorted(consumer.partitions_for_topic(name) or ())
        ]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        wanted = {tp: end for tp, end in ends.items() if end > 0}
        while wanted:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batch.values():
                for r in records:
                    chunks.append(r.key or b"")
                    chunks.append(r.value or b"")
                    for name, value in r.headers or ():
                        chunks.append(name.encode() + b"=" + (value or b""))
            for tp in list(wanted):
                if await consumer.position(tp) >= wanted[tp]:
                    del wanted[tp]
    finally:
        await consumer.stop()
    return chunks


def every_redis_value(redis_url: str, namespace: str) -> list[bytes]:
    """Every key the stack wrote (all under its namespace, on a Redis others share) and its
    value, whatever its type."""
    client = redis.Redis.from_url(redis_url)
    chunks: list[bytes] = []
    for key in client.scan_iter(f"{namespace}:*", count=1000):
        chunks.append(key)
        kind = client.type(key)
        if kind == b"string":
            chunks.append(client.get(key) or b"")
        elif kind == b"hash":
            for field, value in client.hgetall(key).items():
                chunks += [field, value]
        elif kind == b"list":
            chunks += client.lrange(key, 0, -1)
        elif kind == b"set":
            chunks += list(client.smembers(key))
        elif kind == b"zset":
            chunks += [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            for _, fields in client.xrange(key):
                for field, value in fields.items():
                    chunks += [field, value]
    return chunks


def needles(data: dict[str, Any]) -> set[str]:
    """What would give an applicant away: name, phone (as written, its digits, E.164), e-mail,
    the street of an address, an address given as text."""
    found: set[str] = set()
    applicant = data.get("applicant") or {}
    postal = data.get("postal") or {}
    for value in (applicant.get("name"), applicant.get("email")):
        if isinstance(value, str) and len(value) >= 5:
            found.add(value)
    phone = applicant.get("phone")
    if isinstance(phone, str):
        digits = "".join(c for c in phone if c.isdigit())
        if len(digits) >= 9:
            found |= {phone, digits}
            if digits.startswith("0"):
                found.add("+84" + digits[1:])
    for address in (applicant.get("address"), postal.get("address")):
        if isinstance(address, str) and len(address) >= 8:
            found.add(address)
        elif isinstance(address, dict):
            street = address.get("street")
            if isinstance(street, str) and len(street) >= 6:
                found.add(street)
    return found


def spans_of(stack: Stack, trace_id: str) -> list[dict[str, Any]]:
    """The spans of one trace the services wrote (`MOTCUA_TRACES_DIR`, one file per process)."""
    spans = []
    for path in Path(stack.env["MOTCUA_TRACES_DIR"]).glob("*.jsonl"):
        for line in path.read_text().splitlines():
            span = json.loads(line)
            if span["trace_id"] == trace_id:
                spans.append(span)
    return spans


def test_one_trace_follows_a_dossier_from_the_portal_to_the_sms_gateway_and_metrics(
    stack: Stack,
) -> None:
    trace_id, portal_span = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    did = dossier("TRACE")
    batch = orjson.dumps([filed(did), received(did)])

    def post(traceparent: str) -> httpx.Response:
        return httpx.post(
            f"{stack.urls['intake']}/v1/events",
            content=batch,
            headers={
                "content-type": "application/json",
                "authorization": f"Bearer {PORTAL_KEY}",
                "traceparent": traceparent,
            },
            timeout=30,
        )

    answer = post(f"00-{trace_id}-{portal_span}-01")
    assert answer.status_code == 202, answer.text
    assert answer.json() == {"accepted": 2, "duplicates": 0}
    # resent in another trace: the same events
    again = post(f"00-{uuid.uuid4().hex}-{portal_span}-01")
    assert again.json() == {"accepted": 0, "duplicates": 2}
    key = idempotency_key("portal/test", f"{did}-received", "dossier_received")
    wait_until(lambda: any(m["reference"] == key for m in stack.sms_accepted()), 60, "the SMS")

    def where(spans: list[dict[str, Any]]) -> set[tuple[str, str]]:
        return {(s["service"], s["name"]) for s in spans}

    wanted = {
        ("motcua-intake", "kafka publish"),
        ("motcua-sms", "process dossier.events"),
        ("motcua-sms", "sms send primary"),
        ("motcua-sms", "POST /v1/messages/batch"),
        ("motcua-metrics", "process dossier.events"),
    }
    wait_until(lambda: wanted <= where(spans_of(stack, trace_id)), 30, "the trace's spans")
    spans = spans_of(stack, trace_id)
    # intake's request is a child of the portal's span; the gateway answered the traced call
    (request,) = [s for s in spans if s["service"] == "motcua-intake" and s["kind"] == "SERVER"]
    assert request["parent_id"] == portal_span
    (call,) = [s for s in spans if s["name"] == "POST /v1/messages/batch"]
    assert call["kind"] == "CLIENT"
    assert call["attributes"]["http.response.status_code"] == 200
    # the events carry the trace on: intake's, and the SMS worker's `sms.sent`
    published = events_of(stack, "dossier.events", did)
    assert {e["traceparent"].split("-")[1] for e in published} == {trace_id}
    sent = [e for e in events_of(stack, "sms.events", did) if e["type"] == "sms.sent"]
    assert sent
    assert sent[0]["traceparent"].split("-")[1] == trace_id
    # no personal value in the spans
    written = "".join(json.dumps(s, ensure_ascii=False) for s in spans)
    assert "0905123456" not in written
    assert "Trần Thị Kín" not in written


def test_the_survey_link_of_the_sms_takes_an_answer_and_an_update_as_one_vote(
    stack: Stack, issuer: Issuer
) -> None:
    did = dossier("SURVEY")
    returned = envelope(
        "dossier.result_returned",
        did,
        {"returned_at": now_iso(), "via": "counter"},
        event_id=f"{did}-returned",
        time=now_iso(),
    )
    assert stack.post([filed(did), received(did), resolved(did), returned]).status_code == 202
    wait_until(
        lambda: any(
            m["dossier_id"] == did and m["template"] == "survey_invite"
            for m in stack.sms_accepted()
        ),
        60,
        "the survey's invitation by SMS",
    )
    # the link the SMS carries: signed with the stack's (dev) survey secret
    today = datetime.now(UTC)
    token = sign(link_for(did, "000.00.12.H34", today, 30), ["dev-survey-secret"])
    page = f"{stack.urls['intake']}/s/{token}"
    shown = httpx.get(page, timeout=10)
    assert shown.status_code == 200 and shown.headers["content-type"].startswith("text/html")
    assert did in shown.text and 'name="score"' in shown.text
    assert httpx.get(f"{page}x", timeout=10).status_code == 404
    old = sign(
        link_for(did, "000.00.12.H34", today - timedelta(days=40), 30), ["dev-survey-secret"]
    )
    assert httpx.get(f"{stack.urls['intake']}/s/{old}", timeout=10).status_code == 410

    def answer(body: dict[str, str]) -> httpx.Response:
        return httpx.post(page, data=body, timeout=30)

    assert answer({"score": "9"}).status_code == 422
    first = answer({"score": "2"})
    assert first.status_code == 200 and "Cảm ơn" in first.text
    second = answer({"score": "5", "comment": "Gọi tôi: 0905123456"})
    assert second.status_code == 200 and "0905123456" not in second.text

    raw = [
        r.value
        for r in asyncio.run(read_all(stack.broker.bootstrap, "survey.events", idle=0.5))
        if r.key == did.encode()
    ]
    assert len(raw) == 2 and all(b"0905123456" not in value for value in raw)
    scores = [decode_event(value).to_dict()["data"] for value in raw]
    assert [(d["score"], d["previous_score"]) for d in scores] == [(2, None), (5, 2)]
    assert is_sealed(scores[1]["comment"])

    viewer = issuer.headers("viewer")
    span = {
        "from": (today - timedelta(hours=1)).isoformat(),
        "to": (today + timedelta(hours=1)).isoformat(),
        "agency_code": "000.00.12.H34",
    }

    def satisfaction() -> dict[str, Any]:
        summary = httpx.get(
            f"{stack.urls['metrics']}/v1/metrics/summary", params=span, headers=viewer, timeout=10
        )
        found: dict[str, Any] = summary.json()["satisfaction"]
        return found

    wait_until(
        lambda: satisfaction()["satisfied"] >= 1, 60, "the answer in the metrics' satisfaction"
    )
    assert satisfaction() == {"answers": 1, "satisfied": 1, "rate": 1.0}

    # one address asking on and on (INTAKE_SURVEY_PER_CLIENT_PER_MINUTE, 30) is told to wait
    statuses = [httpx.get(page, timeout=10) for _ in range(40)]
    limited = next(r for r in statuses if r.status_code == 429)
    assert int(limited.headers["retry-after"]) >= 1 and "<html" in limited.text


def test_after_a_simulator_run_no_personal_value_is_stored_in_clear(stack: Stack) -> None:
    run = run_cli(
        "simulate",
        "--rate",
        "20",
        "--duration",
        "6",
        "--day-seconds",
        "1",
        "--seed",
        "13",
        "--intake-url",
        stack.urls["intake"],
        "--key",
        PORTAL_KEY,
        "--source",
        "portal/test",
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr

    # every applicant the stack heard of, in clear: the sealed submissions opened with their keys
    records = asyncio.run(read_all(stack.broker.bootstrap, "dossier.events", idle=1.0))
    keys = asyncio.run(read_all(stack.broker.bootstrap, "dossier.keys", idle=0.5))
    wrapped = {r.key.decode(): r.value for r in keys}
    clear_values: set[str] = set()
    simulated = 0
    for record in records:
        event = decode_event(record.value)
        if event.type != "dossier.submitted":
            continue
        data = event.to_dict()["data"]
        assert is_sealed(data["applicant"]["name"])
        value = wrapped.get(event.subject)
        if not value:
            continue  # erased: nobody can open it any more
        try:
            opened = unseal_data(data, KEKS.unwrap(event.subject, WrappedKey.decode(value)))
        except Tampered:
            continue  # altered on purpose by another test: not an applicant's value
        clear_values |= needles(opened)
        simulated += event.source == "portal/test" and "PII" not in event.subject
    assert simulated >= 50, "the simulator filed too few dossiers to mean anything"

    # let the services act on them (SMS sent, postal booked), then look everywhere
    wait_until(lambda: len(stack.sms_accepted()) >= 20, 60, "SMS sent for simulated dossiers")
    stored = asyncio.run(every_record(stack.broker.bootstrap))
    stored += every_redis_value(stack.redis_url, stack.namespace)
    blob = b"\x00".join(stored)
    # the scan sees what is there: every dossier id, and the Redis keys of this stack
    assert all(subject.encode() in blob for subject in wrapped)
    assert stack.namespace.encode() in blob
    assert len(clear_values) >= 3 * simulated
    leaks = sorted(
        needle
        for needle in clear_values
        if needle.encode() in blob or json.dumps(needle)[1:-1].encode() in blob
    )
    assert not leaks, f"{len(leaks)} personal values stored in clear, e.g. {leaks[:5]}"


def test_a_tampered_phone_is_a_dead_letter_with_its_reason_and_the_worker_goes_on(
    stack: Stack,
) -> None:
    did, after = dossier("TAMPER"), dossier("AFTER")
    book = KeyBook(KEKS)
    event = book.seal_event(filed(did))
    phone = event["data"]["applicant"]["phone"]
    flipped = "A" if phone[-1] != "A" else "B"
    event["data"]["applicant"]["phone"] = phone[:-1] + flipped

    async def write() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=stack.broker.bootstrap, acks="all")
        await producer.start()
        try:
            for key, value in book.take_records():
                await producer.send_and_wait("dossier.keys", value, key=key)
            for value in (event, received(did)):
                await producer.send_and_wait(
                    "dossier.events", orjson.dumps(value), key=did.encode()
                )
        finally:
            await producer.stop()

    asyncio.run(write())
    # the worker goes on: a dossier filed afterwards gets its SMS
    assert stack.post([filed(after), received(after)]).status_code == 202
    after_key = idempotency_key("portal/test", f"{after}-received", "dossier_received")
    wait_until(
        lambda: any(m["reference"] == after_key for m in stack.sms_accepted()),
        60,
        "the SMS of the dossier filed after the tampered one",
    )

    def dead_letters() -> list[dict[str, bytes]]:
        records = asyncio.run(
            read_all(stack.broker.bootstrap, "dossier.events.dlq", idle=0.5, timeout=10)
        )
        return [dict(r.headers) for r in records if r.key == did.encode()]

    wait_until(lambda: bool(dead_letters()), 60, "the tampered event dead-lettered")
    headers = dead_letters()[0]
    assert headers["error_type"] == b"Tampered"
    assert b"applicant.phone" in headers["error"]
