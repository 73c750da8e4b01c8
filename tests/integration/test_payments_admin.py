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
import csv
import io
import json
import os
import signal
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from services.common.audit import audit_event_id
from services.common.audit_reader import recent_audit_events
from services.common.events import AuditAction
from services.common.kafka import ensure_topics
from services.common.operators import Operator
from services.common.topics import AUDIT_EVENTS, declared_topics
from services.common.tz import VIETNAM_TZ
from services.dev.embedded import Broker, free_port
from services.payments.domain import refund_id_for
from tests.conftest import service_env
from tests.support import factories
from tests.support.kafka import produce, read_all
from tests.support.operators import Issuer
from tests.support.processes import motcua, process, wait_http

pytestmark = pytest.mark.integration

PATH = "/v1/admin/reconciliations"
AUTO_AGENCY = "000.00.77.H34"  # its fees go back by themselves when a paid dossier closes
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
    env: dict[str, str]


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
        PAYMENTS_SWEEP_INTERVAL_SECONDS="1",  # refunds are asked of the gateway by the sweep
        PAYMENTS_AUTO_REFUND_AGENCIES=AUTO_AGENCY,
        VNPAY_SANDBOX_CONFIG=json.dumps(SANDBOX_CONFIG),
        MOTCUA_OIDC_ISSUER=issuer.url,
    )
    with ExitStack() as running:
        running.enter_context(process(["services.cli", "run", "vnpay-sandbox"], env, "vnpay-rec"))
        wait_http(f"http://127.0.0.1:{sandbox_port}/healthz")
        running.enter_context(motcua("payments", env, port, log_name="payments-reconcile"))
        yield Stack(
            f"http://127.0.0.1:{port}", f"http://127.0.0.1:{sandbox_port}", broker, reports, env
        )


def today() -> str:
    return datetime.now(VIETNAM_TZ).date().isoformat()


async def submit(stack: Stack, events: list[dict[str, Any]]) -> None:
    """Dossier events onto `dossier.events`, each keyed by its dossier, in order."""
    messages = [(event["subject"].encode(), orjson.dumps(event)) for event in events]
    await produce(stack.broker.bootstrap, "dossier.events", messages)


async def pay_orders(
    stack: Stack, issuer: Issuer, n: int, agency: str = "000.00.12.H34"
) -> list[str]:
    """n dossiers submitted now and paid at the sandbox; returns their ids once succeeded."""
    run = uuid.uuid4().hex[:6]
    now = datetime.now(VIETNAM_TZ).isoformat(timespec="seconds")
    events = [
        factories.submitted(f"{agency}-{run}-{i:04d}", time=now, agency_code=agency)
        for i in range(n)
    ]
    await submit(stack, events)
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


# --- finance reports (GET /v1/payments, its CSV, its daily totals) -----------------------------

OTHER_AGENCY = "000.00.13.H34"


def unpaid(run: str, n: int, agency: str = OTHER_AGENCY, amount: int = 20_000) -> list[Any]:
    now = datetime.now(VIETNAM_TZ).isoformat(timespec="seconds")
    return [
        factories.submitted(
            f"{agency}-{run}-{i:04d}",
            time=now,
            agency_code=agency,
            fee={"amount_vnd": amount, "method": "online"},
        )
        for i in range(n)
    ]


def listed(stack: Stack, headers: dict[str, str], **params: Any) -> list[dict[str, Any]]:
    """Every row of the list, page after page."""
    rows: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        r = httpx.get(f"{stack.url}/v1/payments", params=query, headers=headers, timeout=10)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["count"] == len(body["results"])
        rows.extend(body["results"])
        cursor = body["next_cursor"]
        if cursor is None:
            return rows


async def reported(stack: Stack, headers: dict[str, str], wanted: dict[str, str]) -> None:
    """Wait until the report shows each dossier of `wanted` in its state."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        rows = {r["dossier_id"]: r["state"] for r in listed(stack, headers, limit=1000)}
        if all(rows.get(d) == s for d, s in wanted.items()):
            return
        assert asyncio.get_running_loop().time() < deadline, wanted
        await asyncio.sleep(0.3)


async def test_finance_filters_exports_and_totals_the_payments(
    stack: Stack, issuer: Issuer
) -> None:
    finance = issuer.headers("finance")
    paid = await pay_orders(stack, issuer, 4)
    run = uuid.uuid4().hex[:6]
    waiting = unpaid(run, 3)
    await submit(stack, waiting)
    await reported(
        stack,
        finance,
        {**dict.fromkeys(paid, "succeeded"), **{e["subject"]: "requested" for e in waiting}},
    )
    everything = listed(stack, finance, limit=3)
    assert len({r["dossier_id"] for r in everything}) == len(everything)
    # each row says what the payment's own lookup says
    for row in everything:
        one = httpx.get(f"{stack.url}/v1/payments/{row['dossier_id']}", headers=finance).json()
        assert (row["state"], row["amount_vnd"], row["txn_ref"]) == (
            one["state"],
            one["amount_vnd"],
            one["txn_ref"],
        )
    # the filters against a recount of the whole list
    today_ = today()
    cases: list[tuple[dict[str, Any], Callable[[dict[str, Any]], bool]]] = [
        ({"state": "requested"}, lambda r: r["state"] == "requested"),
        ({"agency": OTHER_AGENCY}, lambda r: r["agency_code"] == OTHER_AGENCY),
        (
            {"state": "succeeded", "amount_min": 100_000},
            lambda r: r["state"] == "succeeded" and r["amount_vnd"] >= 100_000,
        ),
        ({"gateway": "vnpay", "from_date": today_}, lambda r: r["created_at"][:10] >= today_),
        ({"reference": paid[0]}, lambda r: r["dossier_id"] == paid[0]),
    ]
    for params, keep in cases:
        assert listed(stack, finance, limit=2, **params) == [r for r in everything if keep(r)]
    assert {r["dossier_id"] for r in listed(stack, finance, state="requested")} >= {
        e["subject"] for e in waiting
    }

    # the CSV: UTF-8 with BOM, a header, the same rows
    csv_answer = httpx.get(
        f"{stack.url}/v1/payments.csv", params={"agency": OTHER_AGENCY}, headers=finance
    )
    assert csv_answer.status_code == 200
    assert csv_answer.headers["content-type"].startswith("text/csv")
    assert csv_answer.content.startswith(b"\xef\xbb\xbf")
    table = list(csv.DictReader(io.StringIO(csv_answer.content.decode("utf-8-sig"))))
    assert [(r["dossier_id"], r["state"], int(r["amount_vnd"])) for r in table] == [
        (r["dossier_id"], r["state"], r["amount_vnd"])
        for r in everything
        if r["agency_code"] == OTHER_AGENCY
    ]

    # today's totals count the payments paid today, by agency and gateway
    totals = httpx.get(f"{stack.url}/v1/payments/totals", headers=finance).json()
    assert totals["from_date"] == totals["to_date"] == today_
    mine = [t for t in totals["totals"] if t["agency_code"] == "000.00.12.H34"]
    paid_today = [r for r in everything if r["paid_at"] and r["paid_at"][:10] == today_]
    assert sum(t["paid_count"] for t in mine) == len(
        [r for r in paid_today if r["agency_code"] == "000.00.12.H34"]
    )
    assert sum(t["paid_vnd"] for t in mine) >= 4 * 150_000


async def test_finance_pages_stay_stable_while_payments_arrive(
    stack: Stack, issuer: Issuer
) -> None:
    finance = issuer.headers("finance")
    first = unpaid(uuid.uuid4().hex[:6], 5)
    await submit(stack, first)
    await reported(stack, finance, {e["subject"]: "requested" for e in first})
    before = {r["dossier_id"] for r in listed(stack, finance, limit=1000)}
    seen: list[str] = []
    cursor = None
    while True:
        params = {"limit": 3, **({"cursor": cursor} if cursor else {})}
        page = httpx.get(f"{stack.url}/v1/payments", params=params, headers=finance).json()
        seen.extend(r["dossier_id"] for r in page["results"])
        await submit(stack, unpaid(uuid.uuid4().hex[:6], 2))  # new payments meanwhile
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen))
    assert before <= set(seen)


def test_reports_need_a_finance_token_and_keep_to_its_agencies(
    stack: Stack, issuer: Issuer
) -> None:
    for path in ("/v1/payments", "/v1/payments.csv", "/v1/payments/totals"):
        assert httpx.get(f"{stack.url}{path}").status_code == 401
        refused = httpx.get(f"{stack.url}{path}", headers=issuer.headers("viewer"))
        assert refused.status_code == 403
        assert refused.headers["content-type"] == "application/problem+json"
    scoped = issuer.headers("finance", agencies=[OTHER_AGENCY])
    rows = listed(stack, scoped, limit=1000)
    assert rows and {r["agency_code"] for r in rows} == {OTHER_AGENCY}
    assert listed(stack, scoped, agency="000.00.12.H34") == []
    bad = httpx.get(
        f"{stack.url}/v1/payments", params={"state": "paid", "limit": 0}, headers=scoped
    )
    assert bad.status_code == 422
    assert bad.headers["content-type"] == "application/problem+json"
    assert {e["parameter"] for e in bad.json()["errors"]} == {"state", "limit"}


# --- refunds finance asks for (POST /v1/payments/{dossier_id}/refunds) ------------------------


def refund(
    stack: Stack, headers: dict[str, str], dossier_id: str, key: str | None, **body: Any
) -> httpx.Response:
    extra = {"Idempotency-Key": key} if key is not None else {}
    return httpx.post(
        f"{stack.url}/v1/payments/{dossier_id}/refunds",
        json=body,
        headers={**headers, **extra},
        timeout=30,
    )


async def state_of(stack: Stack, headers: dict[str, str], dossier_id: str, state: str) -> Any:
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        found = httpx.get(f"{stack.url}/v1/payments/{dossier_id}", headers=headers).json()
        if found["state"] == state:
            return found
        assert asyncio.get_running_loop().time() < deadline, found
        await asyncio.sleep(0.3)


async def test_finance_refunds_part_then_the_rest_never_more(stack: Stack, issuer: Issuer) -> None:
    finance = issuer.headers("finance", sub="finance-who-refunds")
    [dossier_id] = await pay_orders(stack, issuer, 1)
    assert refund(stack, finance, dossier_id, None, reason="overcharged").status_code == 400
    bad = refund(stack, finance, dossier_id, "k0", reason="because", amount_vnd=0)
    assert bad.status_code == 422 and bad.headers["content-type"] == "application/problem+json"

    # two keys at once: one refund under way, the other refused
    async with httpx.AsyncClient(timeout=30) as client:
        both = await asyncio.gather(
            *(
                client.post(
                    f"{stack.url}/v1/payments/{dossier_id}/refunds",
                    json={"amount_vnd": 50_000, "reason": "overcharged"},
                    headers={**finance, "Idempotency-Key": key},
                )
                for key in ("k1", "k2")
            )
        )
    assert sorted(r.status_code for r in both) == [202, 409], [r.text for r in both]
    first = next(r for r in both if r.status_code == 202).json()
    key = "k1" if both[0].status_code == 202 else "k2"
    assert (first["state"], first["amount_vnd"]) == ("refund_requested", 50_000)
    retried = {**finance, "X-Request-Id": uuid.uuid4().hex}  # another request id: no matter
    again = refund(stack, retried, dossier_id, key, amount_vnd=50_000, reason="overcharged")
    assert (again.status_code, again.json()) == (202, first)  # the same key: the same answer
    other = refund(stack, finance, dossier_id, key, amount_vnd=60_000, reason="overcharged")
    assert other.status_code == 422 and "Idempotency-Key" in other.json()["title"]

    done = await state_of(stack, finance, dossier_id, "partially_refunded")
    assert done["history"][-1]["amount_vnd"] == 50_000
    over = refund(stack, finance, dossier_id, "k3", amount_vnd=100_001, reason="overcharged")
    assert over.status_code == 422 and "100000 VND left" in over.json()["detail"]
    rest = refund(stack, finance, dossier_id, "k4", reason="dossier_withdrawn")
    assert rest.status_code == 202 and rest.json()["amount_vnd"] == 100_000
    await state_of(stack, finance, dossier_id, "refunded")
    nothing = refund(stack, finance, dossier_id, "k5", reason="other")
    assert nothing.status_code == 409

    orders = httpx.get(f"{stack.sandbox}/sandbox/orders").json()
    bank_side = next(o for o in orders.values() if o["dossier_id"] == dossier_id)
    assert (bank_side["refunded_vnd"], bank_side["refunds"]) == (150_000, 2)
    # the report shows it; each answer is audited
    await reported(stack, finance, {dossier_id: "refunded"})
    [row] = listed(stack, finance, reference=dossier_id)
    assert row["refunded_vnd"] == 150_000
    records = await read_all(stack.broker.bootstrap, AUDIT_EVENTS, idle=1.0)
    refunds = [
        event
        for event in (orjson.loads(r.value) for r in records)
        if event["type"] == "audit.refund" and event["data"]["target"] == dossier_id
    ]
    # exactly one event per refund asked (k1, k2, k3, k4, k5): the same key asked again is
    # that refund's event recorded again, with its id (readers count it once), not another
    by_id = {event["id"]: event["data"] for event in refunds}
    outcomes = Counter(data["outcome"] for data in by_id.values())
    assert outcomes == {"succeeded": 2, "denied": 3}, refunds
    once = audit_event_id(
        Operator("finance-who-refunds", frozenset()),
        AuditAction.REFUND,
        dossier_id,
        "succeeded",
        refund_id_for(dossier_id, key),
    )
    assert [event["id"] for event in refunds].count(once) == 2 and len(refunds) == 6
    trail = await recent_audit_events(stack.broker.bootstrap, action=AuditAction.REFUND)
    assert len([e for e in trail.events if e.subject == dossier_id]) == 5  # `motcua audit`
    assert all(data["actor"] == "finance-who-refunds" for data in by_id.values())


async def test_a_refund_the_bank_refuses_is_refund_failed(stack: Stack, issuer: Issuer) -> None:
    finance = issuer.headers("finance")
    [dossier_id] = await pay_orders(stack, issuer, 1)
    refusing = {**SANDBOX_CONFIG, "refuse_refunds": 1.0}
    assert httpx.post(f"{stack.sandbox}/sandbox/config", json=refusing).status_code == 200
    try:
        asked = refund(stack, finance, dossier_id, "r1", amount_vnd=20_000, reason="other")
        assert asked.status_code == 202
        failed = await state_of(stack, finance, dossier_id, "refund_failed")
    finally:
        httpx.post(f"{stack.sandbox}/sandbox/config", json=SANDBOX_CONFIG)
    assert failed["history"][-1]["reason"] == "gateway_refused"
    events = [
        orjson.loads(r.value)
        for r in await read_all(stack.broker.bootstrap, "payment.events", idle=1.0)
    ]
    [gone_wrong] = [
        e for e in events if e["type"] == "payment.refund_failed" and e["subject"] == dossier_id
    ]
    assert gone_wrong["data"]["refund_amount_vnd"] == 20_000
    scoped = issuer.headers("finance", agencies=[OTHER_AGENCY])
    assert refund(stack, scoped, dossier_id, "r2", reason="other").status_code == 404


async def test_a_paid_dossier_withdrawn_owes_its_fee_back(stack: Stack, issuer: Issuer) -> None:
    finance = issuer.headers("finance")
    [by_hand] = await pay_orders(stack, issuer, 1)
    [by_itself] = await pay_orders(stack, issuer, 1, agency=AUTO_AGENCY)
    now = datetime.now(VIETNAM_TZ).isoformat(timespec="seconds")
    await submit(
        stack,
        [
            factories.envelope("dossier.withdrawn", by_hand, {"withdrawn_at": now}, time=now),
            factories.envelope(
                "dossier.rejected",
                by_itself,
                {"agency_code": AUTO_AGENCY, "reason": "incomplete"},
                time=now,
            ),
        ],
    )
    owed = await state_of(stack, finance, by_hand, "refund_required")
    assert owed["history"][-1]["reason"] == "dossier_withdrawn"
    await state_of(stack, finance, by_itself, "refunded")  # the agency's setting: by itself
    await asyncio.sleep(1.5)  # a sweep at least: the other one waits for finance
    assert (await state_of(stack, finance, by_hand, "refund_required"))["state"]
    asked = refund(stack, finance, by_hand, "w1", reason="dossier_withdrawn")
    assert asked.status_code == 202 and asked.json()["amount_vnd"] == 150_000
    await state_of(stack, finance, by_hand, "refunded")
    orders = httpx.get(f"{stack.sandbox}/sandbox/orders").json()
    refunded = {o["dossier_id"]: o["refunded_vnd"] for o in orders.values()}
    assert (refunded[by_hand], refunded[by_itself]) == (150_000, 150_000)
    events = [
        orjson.loads(r.value)
        for r in await read_all(stack.broker.bootstrap, "payment.events", idle=1.0)
    ]
    owed_events = [
        e["data"]["reason"]
        for e in events
        if e["type"] == "payment.refund_required" and e["subject"] in (by_hand, by_itself)
    ]
    assert sorted(owed_events) == ["dossier_rejected", "dossier_withdrawn"]


# --- receipts: numbered per agency and year without gaps, across a SIGKILL ---------------------


async def receipts_seen(stack: Stack, dossiers: set[str]) -> dict[str, set[bytes]]:
    """The receipt events of `dossiers` on payment.events, by event id (each copy's bytes)."""
    found: dict[str, set[bytes]] = defaultdict(set)
    for r in await read_all(stack.broker.bootstrap, "payment.events", idle=0.5):
        event = orjson.loads(r.value)
        if event["type"] == "payment.receipt_issued" and event["subject"] in dossiers:
            found[event["id"]].add(r.value)
    return found


async def test_receipt_numbers_have_no_gaps_across_a_sigkill(stack: Stack, issuer: Issuer) -> None:
    run = uuid.uuid4().hex[:6]
    agencies = [f"000.00.{50 + i}.H34" for i in range(6)]
    now = datetime.now(VIETNAM_TZ).isoformat(timespec="seconds")
    requests: list[dict[str, Any]] = [
        {
            "dossier_id": f"{agencies[i % 6]}-{run}-{i:05d}",
            "agency_code": agencies[i % 6],
            "amount_vnd": 150_000,
            "paid_at": now,
            "txn_ref": f"R{run}{i:05d}",
            "gateway": "vnpay",
        }
        for i in range(1200)
    ]
    dossiers = {r["dossier_id"] for r in requests}
    producer = AIOKafkaProducer(bootstrap_servers=stack.broker.bootstrap, acks="all")
    await producer.start()

    async def ask(batch: list[dict[str, Any]]) -> None:
        sent = [
            await producer.send(
                "payments.receipt-requests", orjson.dumps(r), key=r["agency_code"].encode()
            )
            for r in batch
        ]
        await asyncio.gather(*sent)

    port = free_port()
    second_env = {**stack.env, "PAYMENTS_PORT": str(port)}
    try:
        # a second payments process shares the receipts' partitions, then dies mid-stream
        with process(["services.cli", "run", "payments"], second_env, "payments-receipts") as p:
            wait_http(f"http://127.0.0.1:{port}/readyz", proc=p, timeout=120)
            # its own report file (another one on the same disk), built from payment.events
            other = replace(stack, url=f"http://127.0.0.1:{port}")
            finance = issuer.headers("finance")
            deadline = asyncio.get_running_loop().time() + 30
            while True:
                try:
                    theirs = listed(other, finance, limit=1000)
                except AssertionError:  # 503 while it reads the topic the first time
                    theirs = None
                if theirs == listed(stack, finance, limit=1000):
                    break
                assert asyncio.get_running_loop().time() < deadline, "reports differ"
                await asyncio.sleep(0.5)
            await ask(requests[:800])
            deadline = asyncio.get_running_loop().time() + 60
            while len(await receipts_seen(stack, dossiers)) < 50:
                assert asyncio.get_running_loop().time() < deadline
            os.killpg(p.pid, signal.SIGKILL)
        await ask(requests[800:])  # asked again too: the same numbers come back
        await ask(requests[:50])
    finally:
        await producer.stop()
    deadline = asyncio.get_running_loop().time() + 90  # the dead member's session runs out
    while len(seen := await receipts_seen(stack, dossiers)) < len(dossiers):
        assert asyncio.get_running_loop().time() < deadline, len(seen)
        await asyncio.sleep(1)
    numbers: dict[str, list[int]] = defaultdict(list)
    for event_id, copies in seen.items():
        assert len(copies) == 1, event_id  # a receipt issued again is the same bytes
        data = orjson.loads(next(iter(copies)))["data"]
        assert data["receipt_no"] == f"{data['year']}-{data['number']:07d}"
        numbers[data["agency_code"]].append(data["number"])
    assert set(numbers) == set(agencies)
    for agency, given in numbers.items():
        assert sorted(given) == list(range(1, 201)), agency  # 200 each, none skipped nor twice
