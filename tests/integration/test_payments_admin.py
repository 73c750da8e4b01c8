"""An operator runs the gateway reconciliation of a day without a shell (CONTRACT section 8):
`POST /v1/admin/reconciliations` on `motcua run payments`, against the real broker, the VNPAY-style
sandbox over loopback HTTP and tokens of the dev issuer.

The sandbox pays a few orders, then cuts a statement with differences injected (rows omitted,
amounts and statuses changed, rows for orders nobody opened); the run must report exactly those,
announce each once, and be recorded as `audit.reconciliation_run`. The second gateway (`jsonpay`)
points at a port nobody listens on: its statement is unavailable.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from services.common.kafka import ensure_topics
from services.common.topics import AUDIT_EVENTS, declared_topics
from services.common.tz import VIETNAM_TZ
from services.dev.embedded import Broker, free_port
from tests.conftest import service_env
from tests.support import factories
from tests.support.kafka import read_all
from tests.support.operators import Issuer
from tests.support.processes import motcua, process, wait_http

pytestmark = pytest.mark.integration

PATH = "/v1/admin/reconciliations"
ADMIN = "admin-who-reconciles"
SANDBOX_CONFIG: dict[str, Any] = {
    "outcomes": {"00": 1.0},
    "faults": {},
    "pay_delay_seconds": 0.1,
    "seed": "reconcile-endpoint",
    "statement_faults": {"omit": 0.2, "amount": 0.2, "status": 0.2},
    "extra_rows": 2,
}


@dataclass
class Stack:
    url: str
    sandbox: str
    broker: Broker
    reports: Path


@pytest.fixture(scope="module")
def stack(
    broker: Broker, redis_url: str, issuer: Issuer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(2)))
    port, sandbox_port, nobody = free_port(), free_port(), free_port()
    reports = tmp_path_factory.mktemp("reconciliation")
    env = service_env(
        broker,
        redis_url,
        f"motcua-test-{uuid.uuid4().hex[:10]}",
        MOTCUA_TOPIC_PARTITIONS="2",
        PAYMENTS_PORT=str(port),
        VNPAY_SANDBOX_PORT=str(sandbox_port),
        VNPAY_URL=f"http://127.0.0.1:{sandbox_port}",
        JSONPAY_URL=f"http://127.0.0.1:{nobody}/jsonpay",  # the second gateway is down
        PAYMENTS_PUBLIC_URL=f"http://127.0.0.1:{port}",
        PAYMENTS_RECONCILE_ENABLED="false",
        PAYMENTS_RECONCILE_DIR=str(reports),
        PAYMENTS_GATEWAY_TIMEOUT_SECONDS="1",
        VNPAY_SANDBOX_CONFIG=json.dumps(SANDBOX_CONFIG),
        MOTCUA_OIDC_ISSUER=issuer.url,
    )
    with ExitStack() as running:
        running.enter_context(process(["services.cli", "run", "vnpay-sandbox"], env, "vnpay-rec"))
        wait_http(f"http://127.0.0.1:{sandbox_port}/healthz")
        running.enter_context(motcua("payments", env, port, log_name="payments-reconcile"))
        yield Stack(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{sandbox_port}", broker, reports)


def today() -> str:
    return datetime.now(VIETNAM_TZ).date().isoformat()


async def pay_orders(stack: Stack, issuer: Issuer, n: int) -> list[str]:
    """n dossiers submitted now and paid at the sandbox; returns their ids once succeeded."""
    run = uuid.uuid4().hex[:6]
    now = datetime.now(VIETNAM_TZ).isoformat(timespec="seconds")
    events = [factories.submitted(f"000.00.12.H34-{run}-{i:04d}", time=now) for i in range(n)]
    producer = AIOKafkaProducer(bootstrap_servers=stack.broker.bootstrap, acks="all")
    await producer.start()
    try:
        for event in events:
            await producer.send_and_wait(
                "dossier.events", orjson.dumps(event), key=event["subject"].encode()
            )
    finally:
        await producer.stop()
    ids = [e["subject"] for e in events]
    finance = issuer.headers("finance")
    opened: set[str] = set()
    deadline = asyncio.get_running_loop().time() + 60
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            states = {}
            for dossier_id in ids:
                r = await client.get(f"{stack.url}/v1/payments/{dossier_id}", headers=finance)
                if r.status_code != 200:
                    continue
                states[dossier_id] = r.json()["state"]
                if dossier_id not in opened:  # the applicant opens the payment page
                    await client.get(r.json()["payment_url"])
                    opened.add(dossier_id)
            if len(states) == n and set(states.values()) == {"succeeded"}:
                return ids
            assert asyncio.get_running_loop().time() < deadline, states
            await asyncio.sleep(0.3)


def test_only_an_admin_runs_a_reconciliation(stack: Stack, issuer: Issuer) -> None:
    body = {"date": today()}
    anonymous = httpx.post(f"{stack.url}{PATH}", json=body)
    assert anonymous.status_code == 401
    assert anonymous.headers["www-authenticate"].startswith("Bearer")
    assert anonymous.headers["content-type"] == "application/problem+json"
    for role in ("viewer", "finance"):
        refused = httpx.post(f"{stack.url}{PATH}", json=body, headers=issuer.headers(role))
        assert refused.status_code == 403, role
        assert refused.headers["content-type"] == "application/problem+json"
        assert "admin" in refused.json()["detail"]


def test_a_bad_date_or_gateway_is_422_naming_it(stack: Stack, issuer: Issuer) -> None:
    admin = issuer.headers("admin")
    tomorrow = (datetime.now(VIETNAM_TZ) + timedelta(days=1)).date().isoformat()
    for body, pointer, says in [
        ({"date": "2026-13-01"}, "/date", "not a calendar day"),
        ({"date": "26-11-2026"}, "/date", "YYYY-MM-DD"),
        ({"date": tomorrow}, "/date", "future"),
        ({}, "/date", "required"),
        ({"date": today(), "gateway": "momo"}, "/gateway", "momo"),
    ]:
        response = httpx.post(f"{stack.url}{PATH}", json=body, headers=admin)
        assert response.status_code == 422, (body, response.text)
        assert response.headers["content-type"] == "application/problem+json"
        [error] = response.json()["errors"]
        assert error["pointer"] == pointer and says in error["detail"], error
    garbled = httpx.post(f"{stack.url}{PATH}", content=b"{date", headers=admin)
    assert garbled.status_code == 422 and garbled.json()["errors"][0]["pointer"] == ""


async def mismatch_copies(stack: Stack, day: str) -> dict[str, set[bytes]]:
    copies: dict[str, set[bytes]] = defaultdict(set)
    for record in await read_all(stack.broker.bootstrap, "payment.events", idle=1.5):
        event = orjson.loads(record.value)
        if event["type"] == "payment.reconciliation_mismatch" and f"/{day}/" in event["id"]:
            copies[event["id"]].add(record.value)
    return copies


async def audits(stack: Stack, expect: int) -> list[dict[str, Any]]:
    records = await read_all(stack.broker.bootstrap, AUDIT_EVENTS, expect=expect)
    return [orjson.loads(r.value) for r in records]


async def test_an_admin_reconciles_a_day_and_gets_exactly_the_differences(
    stack: Stack, issuer: Issuer
) -> None:
    await pay_orders(stack, issuer, 12)
    day = today()
    injected = httpx.get(f"{stack.sandbox}/sandbox/statement-faults", params={"date": day}).json()
    assert len(injected) >= 2  # at least the rows for orders nobody opened

    admin = issuer.headers("admin", sub=ADMIN)
    response = httpx.post(f"{stack.url}{PATH}", json={"date": day}, headers=admin, timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["gateway"], result["date"]) == ("vnpay", day)
    kinds = Counter(i["kind"] for i in injected)
    assert result["by_kind"] == {
        kind: kinds[kind]
        for kind in (
            "missing_in_ledger",
            "missing_in_statement",
            "amount_mismatch",
            "status_mismatch",
        )
    }
    assert result["differences"] == len(injected)
    assert {(r["kind"], r["txn_ref"]) for r in result["report"]} == {
        (i["kind"], i["txn_ref"]) for i in injected
    }
    differing_rows = {i["txn_ref"] for i in injected if i["kind"] != "missing_in_statement"}
    assert result["matched"] == result["statement_rows"] - len(differing_rows)
    assert result["matched"] > 0
    # The report files of the run, where the nightly job writes them.
    assert (stack.reports / f"reconciliation-vnpay-{day}.csv").exists()

    # Each difference announced once; a second run announces the same events, byte for byte.
    again = httpx.post(f"{stack.url}{PATH}", json={"date": day}, headers=admin, timeout=60)
    assert again.status_code == 200 and again.json() == result
    copies = await mismatch_copies(stack, day)
    assert len(copies) == len(injected)
    assert all(len(c) == 1 for c in copies.values()), copies

    recorded = [e for e in await audits(stack, 2) if e["type"] == "audit.reconciliation_run"]
    assert len(recorded) == 2
    for event in recorded:
        data = event["data"]
        assert (data["actor"], data["roles"], data["action"]) == (
            ADMIN,
            ["admin"],
            "reconciliation_run",
        )
        assert (data["target"], data["outcome"]) == (f"vnpay/{day}", "succeeded")


async def test_a_statement_that_cannot_be_fetched_is_503_and_audited_failed(
    stack: Stack, issuer: Issuer
) -> None:
    admin = issuer.headers("admin", sub=ADMIN)
    day = today()
    response = httpx.post(
        f"{stack.url}{PATH}", json={"date": day, "gateway": "jsonpay"}, headers=admin, timeout=60
    )
    assert response.status_code == 503, response.text
    assert int(response.headers["retry-after"]) > 0
    assert response.headers["content-type"] == "application/problem+json"
    assert "jsonpay" in response.json()["detail"]
    deadline = asyncio.get_running_loop().time() + 15
    while True:
        failed = [
            e
            for e in await audits(stack, 1)
            if e["data"]["target"] == f"jsonpay/{day}" and e["data"]["outcome"] == "failed"
        ]
        if failed:
            break
        assert asyncio.get_running_loop().time() < deadline
    assert failed[0]["type"] == "audit.reconciliation_run" and failed[0]["data"]["actor"] == ADMIN
