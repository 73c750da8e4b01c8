"""Payments against the real broker, Redis and the VNPAY-style sandbox over loopback HTTP.

Every sandbox fault is on (duplicate, out-of-order, late success, wrong amount, forged signature,
missing IPN), orders expire after a few seconds, and the test plays the applicants' browsers:
it opens each payment URL (twice, like a double click) as soon as the order exists. A payment is
looked up as an operator with the role `finance`, a token of the dev issuer (CONTRACT section 8).
"""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from services.common.events import decode_event
from services.common.kafka import ensure_topics
from services.common.signing import vnpay_sign
from services.common.topics import declared_topics
from services.common.tz import VIETNAM_TZ
from services.dev.embedded import Broker, free_port
from services.payments.partner import JSONPAY_SIGNATURE, jsonpay_sign
from tests.conftest import PORTAL_KEY, service_env
from tests.support import factories
from tests.support.kafka import read_all
from tests.support.operators import Issuer
from tests.support.processes import ROOT, motcua, process, wait_http
from tests.support.prometheus import metric_total
from tests.support.redis_keys import delete_namespace

pytestmark = pytest.mark.integration

JSON_AGENCY = "000.00.99.H34"
SANDBOX_CONFIG: dict[str, Any] = {
    "outcomes": {"00": 0.6, "24": 0.15, "51": 0.15, "11": 0.1},
    "faults": {
        "duplicate": 0.12,
        "out_of_order": 0.12,
        "late_success": 0.12,
        "wrong_amount": 0.12,
        "forged": 0.12,
        "missing": 0.12,
    },
    "pay_delay_seconds": 0.3,
    "late_after_expiry_seconds": 2.5,
    "ipn_retry_seconds": 0.5,
    "seed": "integration",
}


class Stack:
    def __init__(
        self, broker: Broker, env: dict[str, str], port: int, sandbox_port: int, issuer: Issuer
    ) -> None:
        self.broker = broker
        self.env = env
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.sandbox = f"http://127.0.0.1:{sandbox_port}"
        self.issuer = issuer
        self.finance = issuer.headers("finance")  # what the payments are looked up with
        self.worker: subprocess.Popen[bytes] | None = None
        self.stack = ExitStack()

    def start_worker(self) -> None:
        self.worker = self.stack.enter_context(
            motcua("payments", self.env, self.port, log_name="payments")
        )

    def kill_worker(self) -> None:
        assert self.worker is not None
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait()

    async def submit(self, events: list[dict[str, Any]]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.broker.bootstrap, acks="all")
        await producer.start()
        try:
            for event in events:
                await producer.send_and_wait(
                    "dossier.events", orjson.dumps(event), key=event["subject"].encode()
                )
        finally:
            await producer.stop()

    def payment(self, dossier_id: str) -> dict[str, Any] | None:
        try:
            response = httpx.get(
                f"{self.url}/v1/payments/{dossier_id}", headers=self.finance, timeout=5
            )
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def orders(self) -> dict[str, Any]:
        orders: dict[str, Any] = httpx.get(f"{self.sandbox}/sandbox/orders", timeout=5).json()
        return orders


@pytest.fixture(scope="module")
def stack(broker: Broker, redis_url: str, issuer: Issuer) -> Iterator[Stack]:
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    port, sandbox_port = free_port(), free_port()
    env = service_env(
        broker,
        redis_url,
        f"motcua-test-{uuid.uuid4().hex[:10]}",
        PAYMENTS_PORT=str(port),
        VNPAY_SANDBOX_PORT=str(sandbox_port),
        VNPAY_URL=f"http://127.0.0.1:{sandbox_port}",
        JSONPAY_URL=f"http://127.0.0.1:{sandbox_port}/jsonpay",
        PAYMENTS_PUBLIC_URL=f"http://127.0.0.1:{port}",
        PAYMENTS_ORDER_TTL_SECONDS="6",
        PAYMENTS_QUERY_OFFSETS_SECONDS="-2,0.5",
        PAYMENTS_EXPIRE_OFFSET_SECONDS="1",
        PAYMENTS_LATE_QUERY_OFFSETS_SECONDS="3,10",
        PAYMENTS_SWEEP_INTERVAL_SECONDS="0.5",
        PAYMENTS_RECONCILE_ENABLED="false",
        PAYMENTS_GATEWAY_BY_AGENCY=json.dumps({JSON_AGENCY: "jsonpay"}),
        VNPAY_SANDBOX_CONFIG=json.dumps(SANDBOX_CONFIG),
        MOTCUA_OIDC_ISSUER=issuer.url,
    )
    s = Stack(broker, env, port, sandbox_port, issuer)
    with s.stack:
        s.stack.enter_context(process(["services.cli", "run", "vnpay-sandbox"], env, "vnpay"))
        wait_http(f"{s.sandbox}/healthz")
        s.start_worker()
        yield s


def submitted(dossier_id: str, *, ahead: float = 0, **data: Any) -> dict[str, Any]:
    """A submission made now (`ahead` seconds from now): an order's window starts at its event
    time, and one that closed before the worker saw it opens no order."""
    at = datetime.now(VIETNAM_TZ) + timedelta(seconds=ahead)
    return factories.submitted(dossier_id, time=at.isoformat(timespec="seconds"), **data)


def dossiers(run: str, n: int, **data: Any) -> list[dict[str, Any]]:
    return [submitted(f"000.00.12.H34-{run}-{i:04d}", **data) for i in range(n)]


async def browse(stack: Stack, ids: list[str], timeout: float = 60) -> None:
    """The applicants: open each order's payment page (twice) as soon as the order exists."""
    pending = set(ids)
    deadline = asyncio.get_running_loop().time() + timeout
    async with httpx.AsyncClient(timeout=5) as client:
        while pending and asyncio.get_running_loop().time() < deadline:
            for dossier_id in sorted(pending):
                try:
                    r = await client.get(
                        f"{stack.url}/v1/payments/{dossier_id}", headers=stack.finance
                    )
                except httpx.HTTPError:
                    continue
                if r.status_code != 200:
                    continue
                url = r.json()["payment_url"]
                await asyncio.gather(client.get(url), client.get(url))
                pending.discard(dossier_id)
            await asyncio.sleep(0.3)
    assert not pending, f"no order for {sorted(pending)[:5]}"


def consistent(ledger_state: str | None, order: dict[str, Any]) -> bool:
    status = order["status"]
    if status == "pending":
        return False
    if status == "failed":
        return ledger_state in ("failed", "expired")
    if status == "refunded":
        return ledger_state == "refunded"
    return ledger_state == "succeeded"  # paid


async def settle(stack: Stack, ids: list[str], timeout: float = 60) -> dict[str, Any]:
    """Wait until the ledger agrees with what the sandbox did to every order."""
    deadline = asyncio.get_running_loop().time() + timeout
    by_dossier: dict[str, Any] = {}
    while asyncio.get_running_loop().time() < deadline:
        by_dossier = {o["dossier_id"]: o for o in stack.orders().values()}
        states = {d: (stack.payment(d) or {}).get("state") for d in ids}
        if all(d in by_dossier and consistent(states[d], by_dossier[d]) for d in ids):
            return by_dossier
        await asyncio.sleep(0.5)
    bad = {d: (stack.payment(d) or {}).get("state") for d in ids}
    raise AssertionError(
        f"not settled: {[(d, bad[d], by_dossier.get(d)) for d in ids if d not in by_dossier or not consistent(bad[d], by_dossier[d])][:3]}"  # noqa: E501
    )


async def payment_events(stack: Stack, ids: set[str]) -> dict[str, dict[str, set[str]]]:
    """dossier → event type → distinct event ids. Every copy of a dossier's `payment.requested`
    (one per publish: redeliveries and crashes publish it again) is the same bytes, so the SMS's
    short link and the event lead to one payment URL."""
    found: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    requested: dict[str, set[bytes]] = defaultdict(set)
    for record in await read_all(stack.broker.bootstrap, "payment.events", idle=2.0):
        event = decode_event(record.value)
        if event.subject in ids:
            found[event.subject][event.type].add(event.id)
            if event.type == "payment.requested":
                requested[event.subject].add(record.value)
                data = event.to_dict()["data"]
                assert data["amount_vnd"] > 0 and data["payment_url"].startswith("http")
                assert datetime.fromisoformat(data["expires_at"]).tzinfo is not None
                # the SMS carries the short link, which leads to the gateway's page
                short = httpx.get(data["short_url"], follow_redirects=False)
                assert short.status_code == 302
                assert short.headers["location"] == data["payment_url"]
    differing = {d: len(copies) for d, copies in requested.items() if len(copies) > 1}
    assert not differing, f"payment.requested differs between copies: {differing}"
    return found


def check_invariants(
    orders: dict[str, Any],
    events: dict[str, dict[str, set[str]]],
    ids: list[str],
    *,
    strict_late: bool = True,
) -> None:
    """With `strict_late`, every late payment found its order expired; after a kill, a worker
    that was down at the expiry may query first and find the payment in time: a plain success."""
    for dossier_id in ids:
        order, seen = orders[dossier_id], events[dossier_id]
        assert order["charges"] <= 1, dossier_id  # charged at most once
        assert len(seen["payment.requested"]) == 1, dossier_id  # one order per dossier
        if order["fault"] == "forged":
            assert "97" in order["replies"]
        if order["fault"] == "wrong_amount":
            assert "04" in order["replies"]
            assert len(seen["payment.callback_rejected"]) == 1
        if strict_late and order["fault"] == "late_success":
            assert order["refunds"] == 1, dossier_id  # every late success ends refunded
        # A refund happens only on the late path (paid after the order closed, whether the IPN
        # or a post-expiry query told); any other charge is one recorded success.
        if order["refunds"]:
            assert order["refunds"] == 1 and order["status"] == "refunded"
            assert len(seen["payment.expired"]) == 1
            assert len(seen["payment.refund_required"]) == 1
            assert len(seen["payment.refunded"]) == 1
            assert "payment.succeeded" not in seen
        elif order["charges"]:
            assert len(seen["payment.succeeded"]) == 1, (dossier_id, order)
            assert "payment.refunded" not in seen
        if not order["charges"]:
            assert "payment.succeeded" not in seen
            assert len(seen["payment.failed"]) + len(seen["payment.expired"]) == 1


async def test_orders_ipn_faults_and_the_ledger(stack: Stack) -> None:
    # The sandbox draws each order's fault from its txn_ref: this run id gives every fault to
    # at least four of the 50 orders, so the run exercises all of them every time.
    run = "a1b2c3"
    owing = dossiers(run, 50)
    free = submitted(f"000.00.12.H34-{run}-free", fee={"amount_vnd": 0, "method": "online"})
    counter = submitted(f"000.00.12.H34-{run}-ctr", fee={"amount_vnd": 5000, "method": "counter"})
    # Every event twice (redelivery), plus a poison message that must not stop the worker.
    await stack.submit([*owing, free, counter, *owing])
    ids = [e["subject"] for e in owing]
    await browse(stack, ids)
    orders = await settle(stack, ids)
    events = await payment_events(stack, {*ids, free["subject"], counter["subject"]})
    check_invariants(orders, events, ids)
    assert free["subject"] not in events and counter["subject"] not in events
    assert stack.payment(free["subject"]) is None
    # Each fault was actually exercised in this run.
    assert {o["fault"] for o in orders.values() if o["dossier_id"] in ids} >= {
        "duplicate",
        "out_of_order",
        "late_success",
        "wrong_amount",
        "forged",
        "missing",
    }
    view = stack.payment(ids[0])
    assert view is not None and view["history"][0]["state"] == "requested"
    assert view["version"] == len(view["history"])


async def test_forged_and_unknown_ipns_are_refused(stack: Stack) -> None:
    base = f"{stack.url}/v1/webhooks/payments/vnpay"
    forged = {"vnp_TxnRef": "X", "vnp_Amount": "100", "vnp_SecureHash": "00" * 64}
    r = httpx.get(base, params=forged)
    assert r.status_code == 200 and r.json() == {"RspCode": "97", "Message": "Invalid signature"}
    r = httpx.post(base, content=b"\xff\xfe", headers={"content-type": "text/plain"})
    assert r.status_code == 200 and r.json()["RspCode"] == "97"
    r = httpx.post(f"{stack.url}/v1/webhooks/payments/jsonpay", content=b'{"status":"paid"}')
    assert r.json()["RspCode"] == "97"
    metrics = httpx.get(f"{stack.url}/metrics").text
    assert "motcua_payments_callbacks_total" in metrics


async def test_second_gateway_chosen_per_agency(stack: Stack) -> None:
    run = uuid.uuid4().hex[:6]
    event = submitted(f"{JSON_AGENCY}-{run}-0001", agency_code=JSON_AGENCY)
    await stack.submit([event])
    await browse(stack, [event["subject"]])
    orders = await settle(stack, [event["subject"]])
    view = stack.payment(event["subject"])
    assert view is not None and view["gateway"] == "jsonpay"
    assert "/jsonpay/pay/" in view["payment_url"]
    assert orders[event["subject"]]["gateway"] == "jsonpay"


async def test_reconciliation_reports_exactly_the_injected_differences(
    stack: Stack, tmp_path: Path
) -> None:
    # Orders of its own paid today (about 18 of 30 succeed), so the statement has rows to
    # leave out whatever ran before: with a third omitted, none omitted is a 0.2 % chance.
    own = dossiers(uuid.uuid4().hex[:6], 30)
    ids = [e["subject"] for e in own]
    await stack.submit(own)
    await browse(stack, ids)
    await settle(stack, ids)
    config = {
        **SANDBOX_CONFIG,
        "statement_faults": {"omit": 0.3, "amount": 0.1, "status": 0.1},
        "extra_rows": 2,
    }
    httpx.post(f"{stack.sandbox}/sandbox/config", json=config).raise_for_status()
    day = datetime.now(VIETNAM_TZ).date().isoformat()
    injected = httpx.get(f"{stack.sandbox}/sandbox/statement-faults", params={"date": day}).json()
    kinds = {i["kind"] for i in injected}
    assert {"missing_in_ledger", "missing_in_statement"} <= kinds
    done = subprocess.run(
        [
            *(sys.executable, "-m", "services.cli", "reconcile", "--gateway", "vnpay"),
            *("--date", day, "--out", str(tmp_path)),
        ],
        env={**os.environ, **stack.env},
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    with (tmp_path / f"reconciliation-vnpay-{day}.csv").open() as f:
        reported = {(row["kind"], row["txn_ref"]) for row in csv.DictReader(f)}
    assert reported == {(i["kind"], i["txn_ref"]) for i in injected}
    summary = json.loads((tmp_path / f"reconciliation-vnpay-{day}.json").read_text())
    assert summary["differences"] == len(injected)
    records = await read_all(stack.broker.bootstrap, "payment.events", idle=2.0)
    mismatches = {
        decode_event(r.value).id
        for r in records
        if decode_event(r.value).type == "payment.reconciliation_mismatch"
        and f"/{day}/" in decode_event(r.value).id
    }
    assert len(mismatches) == len(injected)
    # With a statement file given, the same answer without asking the gateway.
    statement = tmp_path / "statement.csv"
    statement.write_text(
        httpx.get(f"{stack.sandbox}/merchant_webapi/statement", params={"date": day}).text
    )
    again = subprocess.run(
        [
            *(sys.executable, "-m", "services.cli", "reconcile", "--date", day),
            *("--statement", str(statement), "--out", str(tmp_path / "again")),
        ],
        env={**os.environ, **stack.env},
        cwd=ROOT,
        capture_output=True,
        timeout=60,
    )
    assert again.returncode == 0
    assert json.loads(again.stdout.decode().splitlines()[-1])["differences"] == len(injected)
    clean = {**SANDBOX_CONFIG}
    httpx.post(f"{stack.sandbox}/sandbox/config", json=clean).raise_for_status()


@pytest.mark.chaos
async def test_sigkill_mid_stream_loses_and_duplicates_nothing(stack: Stack) -> None:
    run = uuid.uuid4().hex[:6]
    # Submissions whose window closes while the worker is down open on arrival after the
    # restart; the ones opened before the kill are reused from their stored copies.
    owing = dossiers(run, 40)
    ids = [e["subject"] for e in owing]
    opened_before = metric_total(stack.url, "motcua_payments_orders_total")

    async def feed() -> None:  # the submissions keep coming, five at a time
        for start in range(0, len(owing), 5):
            await stack.submit(owing[start : start + 5])
            await asyncio.sleep(0.3)

    feeding = asyncio.create_task(feed())
    browsing = asyncio.create_task(browse(stack, ids, timeout=120))
    # mid-stream: orders being created, IPNs arriving for the first ones
    deadline = asyncio.get_running_loop().time() + 60
    while (
        await asyncio.to_thread(metric_total, stack.url, "motcua_payments_orders_total")
        - opened_before
        < 10
    ):
        assert asyncio.get_running_loop().time() < deadline, "no orders opened"
        await asyncio.sleep(0.1)
    stack.kill_worker()
    published = await read_all(stack.broker.bootstrap, "payment.events", idle=1.0)
    requested = (decode_event(r.value) for r in published)
    before_kill = {e.subject for e in requested if e.type == "payment.requested"} & set(ids)
    # killed mid-stream: ten orders or more made (the loop above), not every one published (an
    # order counts when it is made; its event goes out after its poll, so fewer may be out)
    assert len(before_kill) < len(ids), len(before_kill)
    await feeding
    stack.start_worker()
    await browsing
    orders = await settle(stack, ids, timeout=90)
    # every copy of a dossier's payment.requested (the redelivered ones too) is the same bytes
    events = await payment_events(stack, set(ids))
    check_invariants(orders, events, ids, strict_late=False)


# The orders below are paid by hand-made IPNs the sandbox never saw: after the reconciliation.


async def order_view(stack: Stack, dossier_id: str, timeout: float = 30) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        view = stack.payment(dossier_id)
        if view is not None:
            return view
        await asyncio.sleep(0.1)
    raise AssertionError(f"no order for {dossier_id}")


def signed_success_ipn(view: dict[str, Any], transaction_no: str) -> dict[str, str]:
    """The gateway's IPN for a paid order, signed with the dev secret (CONTRACT section 6)."""
    order = dict(parse_qsl(urlsplit(view["payment_url"]).query))
    params = {
        "vnp_TmnCode": order["vnp_TmnCode"],
        "vnp_Amount": str(view["amount_vnd"] * 100),
        "vnp_BankCode": "NCB",
        "vnp_OrderInfo": order["vnp_OrderInfo"],
        "vnp_PayDate": datetime.now(VIETNAM_TZ).strftime("%Y%m%d%H%M%S"),
        "vnp_TransactionNo": transaction_no,
        "vnp_ResponseCode": "00",
        "vnp_TransactionStatus": "00",
        "vnp_TxnRef": view["txn_ref"],
        "vnp_SecureHashType": "HmacSHA512",
    }
    params["vnp_SecureHash"] = vnpay_sign(params, "dev-vnpay-secret")
    return params


def signed_success_jsonpay(view: dict[str, Any], transaction_no: str) -> dict[str, Any]:
    """jsonpay's final status for a paid order, as its sandbox posts it: the JSON body signed
    with the dev secret in `X-Jsonpay-Signature` (HMAC-SHA256 of the raw bytes)."""
    body = orjson.dumps(
        {
            "merchant": "MOTCUAJSON",
            "order_ref": view["txn_ref"],
            "amount": view["amount_vnd"],
            "currency": "VND",
            "status": "paid",
            "transaction_id": transaction_no,
            "paid_at": datetime.now(VIETNAM_TZ).isoformat(timespec="seconds"),
        }
    )
    headers = {
        "content-type": "application/json",
        JSONPAY_SIGNATURE: jsonpay_sign(body, "dev-jsonpay-secret"),
    }
    return {"content": body, "headers": headers}


async def send_ipn(
    client: httpx.AsyncClient, stack: Stack, gateway: str, call: dict[str, Any]
) -> httpx.Response:
    """One copy of a gateway's IPN: vnpay's as a signed query (GET), jsonpay's as a signed POST."""
    url = f"{stack.url}/v1/webhooks/payments/{gateway}"
    if gateway == "vnpay":
        return await client.get(url, params=call)
    return await client.post(url, **call)


@pytest.mark.parametrize(
    ("gateway", "agency"), [("vnpay", "000.00.12.H34"), ("jsonpay", JSON_AGENCY)]
)
async def test_300_concurrent_copies_of_one_ipn_are_accepted_once(
    stack: Stack, gateway: str, agency: str
) -> None:
    event = submitted(f"{agency}-{uuid.uuid4().hex[:6]}-copies", agency_code=agency)
    dossier_id = event["subject"]
    await stack.submit([event])
    view = await order_view(stack, dossier_id)
    assert view["gateway"] == gateway
    transaction_no = str(uuid.uuid4().int % 10**8)
    if gateway == "vnpay":
        call: dict[str, Any] = signed_success_ipn(view, transaction_no)
    else:
        call = signed_success_jsonpay(view, transaction_no)
    limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        replies = await asyncio.gather(
            *(send_ipn(client, stack, gateway, call) for _ in range(300))
        )
    assert {r.status_code for r in replies} == {200}
    codes = Counter(r.json()["RspCode"] for r in replies)
    assert codes["00"] == 1, codes
    assert set(codes) <= {"00", "02", "99"}, codes
    written = [
        value
        for r in await read_all(stack.broker.bootstrap, "payments.callbacks", idle=2.0)
        if r.key == dossier_id.encode()
        and (value := orjson.loads(r.value))["kind"] == "notification"
        and value["notification"]["transaction_no"] == transaction_no
    ]
    assert len(written) == 1, written
    assert written[0]["via"] == "ipn"
    deadline = asyncio.get_running_loop().time() + 30
    while (stack.payment(dossier_id) or {}).get("state") != "succeeded":
        assert asyncio.get_running_loop().time() < deadline, stack.payment(dossier_id)
        await asyncio.sleep(0.2)


def forget_redis(stack: Stack) -> int:
    """Redis restarted empty, for this stack only: every key of its namespace deleted (other
    tests share this Redis)."""
    return delete_namespace(stack.env["REDIS_URL"], stack.env["MOTCUA_REDIS_NAMESPACE"])


async def callbacks_of(stack: Stack, dossier_id: str, transaction_no: str) -> list[Any]:
    return [
        value
        for r in await read_all(stack.broker.bootstrap, "payments.callbacks", idle=1.0)
        if r.key == dossier_id.encode()
        and (value := orjson.loads(r.value))["kind"] == "notification"
        and value["notification"]["transaction_no"] == transaction_no
    ]


async def state_of(stack: Stack, dossier_id: str, wanted: str, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (stack.payment(dossier_id) or {}).get("state") != wanted:
        assert asyncio.get_running_loop().time() < deadline, stack.payment(dossier_id)
        await asyncio.sleep(0.2)


async def test_with_redis_restarted_empty_a_valid_ipn_is_confirmed_once(stack: Stack) -> None:
    """Redis holds only copies: the webhook falls back to the ledger, never answers 01 for an
    order that exists, and a repeat after the payment is applied still answers 02."""
    event = submitted(f"000.00.12.H34-{uuid.uuid4().hex[:6]}-lost")
    dossier_id = event["subject"]
    await stack.submit([event])
    view = await order_view(stack, dossier_id)
    assert forget_redis(stack) > 0
    transaction_no = str(uuid.uuid4().int % 10**8)
    params = signed_success_ipn(view, transaction_no)
    url = f"{stack.url}/v1/webhooks/payments/vnpay"
    first = httpx.get(url, params=params)
    assert first.status_code == 200 and first.json() == {
        "RspCode": "00",
        "Message": "Confirm Success",
    }
    await state_of(stack, dossier_id, "succeeded")
    # The applicant's link works without the Redis copy too.
    link = httpx.get(f"{stack.url}/pay/{view['txn_ref']}", follow_redirects=False)
    assert link.status_code == 302 and link.headers["location"] == view["payment_url"]
    # Redis lost again (the claim of the first IPN with it): the repeat is still 02, from the
    # ledger, whose payment is succeeded now.
    forget_redis(stack)
    again = httpx.get(url, params=params)
    assert again.json() == {"RspCode": "02", "Message": "Order already confirmed"}
    events = await payment_events(stack, {dossier_id})
    assert len(events[dossier_id]["payment.succeeded"]) == 1
    assert len(events[dossier_id]["payment.requested"]) == 1
    assert (stack.payment(dossier_id) or {}).get("version") == 2  # confirmed once


async def test_identical_ipns_answer_00_once_and_02_after_whatever_the_timing(
    stack: Stack,
) -> None:
    run = uuid.uuid4().hex[:6]
    one, many = submitted(f"000.00.12.H34-{run}-twice"), submitted(f"000.00.12.H34-{run}-burst")
    await stack.submit([one, many])
    url = f"{stack.url}/v1/webhooks/payments/vnpay"
    # Two in quick succession, the second sent as soon as the first is answered.
    params = signed_success_ipn(await order_view(stack, one["subject"]), "71000001")
    async with httpx.AsyncClient(timeout=30) as client:
        codes = [(await client.get(url, params=params)).json()["RspCode"] for _ in range(2)]
    assert codes == ["00", "02"]
    # Ten at once: exactly one 00; the others wait for it to be durable and answer 02.
    params = signed_success_ipn(await order_view(stack, many["subject"]), "71000002")
    async with httpx.AsyncClient(timeout=30) as client:
        replies = await asyncio.gather(*(client.get(url, params=params) for _ in range(10)))
    burst = Counter(r.json()["RspCode"] for r in replies)
    assert burst["00"] == 1 and set(burst) <= {"00", "02", "99"}, burst
    assert len(await callbacks_of(stack, many["subject"], "71000002")) == 1
    await state_of(stack, many["subject"], "succeeded")


async def raw_exchange(port: int, head: bytes, parts: list[bytes]) -> tuple[int, dict[str, Any]]:
    """Send `head` and `parts` (and nothing more, the connection left open), read one reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head)
        for part in parts:
            writer.write(part)
        await writer.drain()
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        lines = raw.decode("latin-1").split("\r\n")
        headers = {
            name.strip().lower(): value.strip()
            for name, _, value in (line.partition(":") for line in lines[1:] if line)
        }
        body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
        return int(lines[0].split()[1]), orjson.loads(body)
    finally:
        writer.close()


async def test_an_ipn_body_over_64_kib_is_refused_before_it_is_read(stack: Stack) -> None:
    path = "/v1/webhooks/payments/vnpay"
    common = f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    form = "Content-Type: application/x-www-form-urlencoded\r\n"
    # Declared: 1 MiB announced, not one byte of it sent; the reply comes all the same.
    declared = f"{common}{form}Content-Length: {1024 * 1024}\r\n\r\n".encode()
    status, body = await raw_exchange(stack.port, declared, [])
    assert status == 200 and body["RspCode"] == "99", body
    # Chunked: 80 KiB sent in 8 KiB chunks, the last chunk never sent; refused at the cap.
    chunked = f"{common}{form}Transfer-Encoding: chunked\r\n\r\n".encode()
    chunk = b"vnp_x=" + b"a" * (8192 - 6)
    parts = [b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(10)]
    status, body = await raw_exchange(stack.port, chunked, parts)
    assert status == 200 and body["RspCode"] == "99", body
    metrics = httpx.get(f"{stack.url}/metrics").text
    assert (
        'motcua_webhook_calls_total{outcome="too_large",partner="vnpay",service="payments"}'
        in metrics
    )


# Operators' access to a payment (CONTRACT section 8): the role `finance`, within its agencies.

LOOKUP_FIELDS = {
    *("dossier_id", "state", "gateway", "txn_ref", "amount_vnd", "currency", "payment_url"),
    *("created_at", "expires_at", "version", "history"),
}
# What may change while a test reads one order several times (the sweeper expires it).
MOVING_FIELDS = {"state", "version", "history"}


async def test_a_payment_is_read_with_a_finance_token_only(stack: Stack) -> None:
    event = submitted(f"000.00.12.H34-{uuid.uuid4().hex[:6]}-lookup")
    dossier_id = event["subject"]
    await stack.submit([event])
    view = await order_view(stack, dossier_id)  # with the finance token
    url = f"{stack.url}/v1/payments/{dossier_id}"
    # No token, a portal key, a token that is not a JWT: 401 with the Bearer challenge.
    for headers in ({}, {"Authorization": f"Bearer {PORTAL_KEY}"}, {"Authorization": "Basic x"}):
        refused = httpx.get(url, headers=headers)
        assert refused.status_code == 401, (headers, refused.text)
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.json()["status"] == 401
    # A viewer reads metrics, not payments.
    viewer = httpx.get(url, headers=stack.issuer.headers("viewer"))
    assert viewer.status_code == 403
    assert viewer.headers["content-type"] == "application/problem+json"
    assert viewer.json()["status"] == 403 and "finance" in viewer.json()["detail"]
    # Finance and admin read the same view: the dossier's payment, its state and history.
    finance = httpx.get(url, headers=stack.issuer.headers("finance"))
    admin = httpx.get(url, headers=stack.issuer.headers("admin"))
    assert finance.status_code == admin.status_code == 200
    assert set(finance.json()) == set(admin.json()) == LOOKUP_FIELDS
    body = finance.json()
    assert body["dossier_id"] == dossier_id and body["gateway"] == "vnpay"
    assert body["amount_vnd"] == 150_000 and body["currency"] == "VND"
    assert body["history"][0]["state"] == "requested" and body["version"] == len(body["history"])
    stable = {k: v for k, v in body.items() if k not in MOVING_FIELDS}
    assert {k: v for k, v in admin.json().items() if k not in MOVING_FIELDS} == stable
    assert {k: v for k, v in view.items() if k not in MOVING_FIELDS} == stable
    # The applicant's link and return page, and the gateways' IPN, need no token.
    link = httpx.get(f"{stack.url}/pay/{body['txn_ref']}", follow_redirects=False)
    assert link.status_code == 302 and link.headers["location"] == body["payment_url"]
    assert httpx.get(f"{stack.url}/v1/payments/return").status_code == 200
    forged = {"vnp_TxnRef": "X", "vnp_Amount": "100", "vnp_SecureHash": "00" * 64}
    ipn = httpx.get(f"{stack.url}/v1/webhooks/payments/vnpay", params=forged)
    assert ipn.status_code == 200 and ipn.json()["RspCode"] == "97"


async def test_a_token_scoped_to_other_agencies_gets_404(stack: Stack) -> None:
    event = submitted(f"000.00.12.H34-{uuid.uuid4().hex[:6]}-scoped")
    dossier_id = event["subject"]
    await stack.submit([event])
    await order_view(stack, dossier_id)
    url = f"{stack.url}/v1/payments/{dossier_id}"
    elsewhere = stack.issuer.headers("finance", agencies=[JSON_AGENCY])
    hidden = httpx.get(url, headers=elsewhere)
    assert hidden.status_code == 404
    # The same answer as a dossier without any payment: nothing tells the two apart.
    unknown = httpx.get(f"{stack.url}/v1/payments/000.00.12.H34-none-0000", headers=elsewhere)
    assert unknown.status_code == 404 and hidden.json() == unknown.json()
    # Scoped to the dossier's agency (among others): found.
    own = stack.issuer.headers("finance", agencies=[JSON_AGENCY, "000.00.12.H34"])
    found = httpx.get(url, headers=own)
    assert found.status_code == 200 and found.json()["dossier_id"] == dossier_id
    # An admin's token sees every agency, whatever its claim says.
    admin = httpx.get(url, headers=stack.issuer.headers("admin", agencies=[JSON_AGENCY]))
    assert admin.status_code == 200 and admin.json()["dossier_id"] == dossier_id
