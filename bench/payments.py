"""Payments throughput: IPN callbacks verified and made durable per second, against a bare FastAPI
endpoint that only returns 200 (same load generator, same run), and orders created per second.

    .venv/bin/python bench/payments.py --orders 3000 --concurrency 64

    .venv/bin/python bench/payments.py --reports 1000000

Starts its own Tansu broker and payments worker (Redis from REDIS_URL, else embedded). Orders:
`dossier.submitted` events are produced, and the clock stops when every `payment.requested` is on
`payment.events`. IPNs: one signed success IPN per order through `GET /v1/webhooks/payments/vnpay`
(signature check, Redis dedupe claim and order lookup, Kafka acks=all to `payments.callbacks`);
the requests per second are the webhook's answers, and "IPNs applied" counts until the worker
has published `payment.succeeded` for every order (the IPN's whole effect).

`--reports N`: the finance reports' SQLite file (`services/payments/report_store.py`) with N
payments over a year (60 agencies, two gateways, the states in realistic shares), then the time
of one page of `GET /v1/payments` (what the route runs in its thread: the query, the rows, the
cursor) for a mix of filters, first pages and pages deep in the history; the CSV export's rows
per second; daily totals of a month and of a year; and how fast the file is built from events
(`ReportStore.apply` on real `payment.events` bytes: what a rebuild from the topic costs).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import aiohttp
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from fastapi import FastAPI

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.kafka import ensure_topics
from services.common.signing import vnpay_sign
from services.common.topics import declared_topics
from services.common.tz import VIETNAM_TZ
from services.dev.embedded import Broker, EmbeddedRedis, free_port
from services.payments.domain import (
    Applied,
    Cause,
    GatewayAccount,
    PaymentState,
    apply,
    open_payment,
    order_for,
    txn_ref_for,
)
from services.payments.ledger import LedgerRecord, outgoing_event
from services.payments.report_store import ReportStore
from services.payments.reports import (
    ReportQuery,
    ReportRow,
    TotalsQuery,
    from_micros,
    micros,
    row_view,
)
from tests.support import factories
from tests.support.processes import process, wait_http
from tests.support.redis_keys import forget_run
from tests.support.sealed import sealed

bare = FastAPI()


@bare.get("/v1/webhooks/payments/{gateway}")
async def bare_ok(gateway: str) -> dict[str, str]:
    return {"RspCode": "00", "Message": "Confirm Success"}


def submitted(dossier_id: str) -> dict[str, Any]:
    # submitted now: an order's window starts at the event time, and a closed one opens no order
    now = datetime.now(VIETNAM_TZ).isoformat(timespec="seconds")
    return factories.submitted(
        dossier_id, source="portal/bench", event_id=f"bench-{dossier_id}", time=now
    )


def ipn_query(dossier_id: str, n: int) -> str:
    params = {
        "vnp_TmnCode": "MOTCUADEV",
        "vnp_Amount": "15000000",
        "vnp_BankCode": "NCB",
        "vnp_OrderInfo": f"Thanh toan le phi ho so {dossier_id}",
        "vnp_PayDate": "20240304082001",
        "vnp_TransactionNo": str(20_000_000 + n),
        "vnp_ResponseCode": "00",
        "vnp_TransactionStatus": "00",
        "vnp_TxnRef": txn_ref_for(dossier_id),
        "vnp_SecureHashType": "HmacSHA512",
    }
    params["vnp_SecureHash"] = vnpay_sign(params, "dev-vnpay-secret")
    return urlencode(params)


async def wait_for(
    bootstrap: str, kind: str, wanted: set[str], started: float, timeout: float = 600
) -> float:
    """Seconds from `started` until an event of type `kind` is on `payment.events` for every
    dossier in `wanted`."""
    consumer = AIOKafkaConsumer(
        "payment.events", bootstrap_servers=bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    seen: set[str] = set()
    try:
        while seen < wanted:
            batch = await consumer.getmany(timeout_ms=200)
            for records in batch.values():
                for r in records:
                    event = orjson.loads(r.value)
                    if event["type"] == kind and event["subject"] in wanted:
                        seen.add(event["subject"])
            if time.perf_counter() - started > timeout:
                raise TimeoutError(f"only {len(seen)} of {len(wanted)} {kind}")
    finally:
        await consumer.stop()
    return time.perf_counter() - started


async def orders_per_second(bootstrap: str, ids: list[str]) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()
    events = await sealed(producer, [submitted(d) for d in ids])  # as intake publishes them
    started = time.perf_counter()
    futures = [
        await producer.send("dossier.events", orjson.dumps(e), key=e["subject"].encode())
        for e in events
    ]
    await asyncio.gather(*futures)
    await producer.stop()
    return len(ids) / await wait_for(bootstrap, "payment.requested", set(ids), started)


async def fire(url: str, queries: list[str], concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    queue: asyncio.Queue[str] = asyncio.Queue()
    for q in queries:
        queue.put_nowait(q)

    # aiohttp as the load generator: httpx's client tops out near 200 requests/s on one core,
    # which would measure the generator instead of the server.
    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            q = queue.get_nowait()
            t0 = time.perf_counter()
            async with session.get(f"{url}/v1/webhooks/payments/vnpay?{q}") as response:
                body = await response.json()
            latencies.append(time.perf_counter() - t0)
            if response.status != 200 or body.get("RspCode") not in ("00", "02"):
                raise RuntimeError(f"unexpected answer {response.status}: {body}")

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(queries) / elapsed, latencies


def pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000 if len(values) > 1 else 0.0


async def main(args: argparse.Namespace) -> None:
    broker = Broker(port=free_port()).start()
    redis_server = EmbeddedRedis.ensure(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    port, bare_port = free_port(), free_port()
    run = uuid.uuid4().hex[:8]
    env = {
        "KAFKA_BOOTSTRAP": broker.bootstrap,
        "REDIS_URL": redis_server.url,
        "MOTCUA_REDIS_NAMESPACE": f"motcua-bench-{run}",
        "PAYMENTS_PORT": str(port),
        "PAYMENTS_ORDER_TTL_SECONDS": "86400",
        "PAYMENTS_RECONCILE_ENABLED": "false",
        "MOTCUA_LOG_LEVEL": "WARNING",
    }
    ids = [f"000.00.12.H34-{run}-{i:07d}" for i in range(args.orders)]
    try:
        await ensure_topics(broker.bootstrap, declared_topics(8))
        with (
            process(["services.cli", "run", "payments"], env, "bench-payments"),
            process(
                [
                    "uvicorn",
                    "bench.payments:bare",
                    "--port",
                    str(bare_port),
                    "--log-level",
                    "error",
                ],
                {},
                "bench-bare",
            ),
        ):
            wait_http(f"http://127.0.0.1:{port}/readyz", timeout=120)
            wait_http(f"http://127.0.0.1:{bare_port}/docs")
            orders = await orders_per_second(broker.bootstrap, ids)
            queries = [ipn_query(d, i) for i, d in enumerate(ids)]
            await fire(f"http://127.0.0.1:{bare_port}", queries[:200], args.concurrency)
            base, base_lat = await fire(f"http://127.0.0.1:{bare_port}", queries, args.concurrency)
            started = time.perf_counter()
            applied = asyncio.create_task(
                wait_for(broker.bootstrap, "payment.succeeded", set(ids), started)
            )
            ipn, ipn_lat = await fire(f"http://127.0.0.1:{port}", queries, args.concurrency)
            applied_rate = len(ids) / await applied
        print(f"orders created: {args.orders} in total, {orders:,.0f}/s")
        print(
            f"IPNs applied (every payment.succeeded published, from the first IPN): "
            f"{applied_rate:,.0f}/s"
        )
        print("| path | requests/s | ratio to bare | p50 ms | p99 ms |")
        print("|---|---|---|---|---|")
        for name, rate, lat in (
            ("bare FastAPI 200", base, base_lat),
            ("IPN verified + durable", ipn, ipn_lat),
        ):
            p50, p99 = pct(lat, 50), pct(lat, 99)
            print(f"| {name} | {rate:,.0f} | {rate / base:.3f} | {p50:.1f} | {p99:.1f} |")
    finally:
        broker.stop()
        forget_run(env)  # the keys this run left in a shared Redis
        redis_server.stop()


# --- finance reports -----------------------------------------------------------------------------

STATE_SHARES = (
    ("succeeded", 0.70),
    ("expired", 0.15),
    ("failed", 0.08),
    ("requested", 0.03),
    ("refunded", 0.02),
    ("refund_required", 0.02),
)
AMOUNTS = (10_000, 25_000, 50_000, 100_000, 150_000, 500_000, 1_000_000)


def report_rows(n: int, rng: random.Random) -> Iterator[list[ReportRow]]:
    """n payments over the year before 2026-11-01, oldest first, in chunks of 50,000."""
    agencies = [f"000.00.{i:02d}.H34" for i in range(60)]
    weights = [1 / (i + 1) for i in range(60)]  # a few large agencies, many small ones
    states = [s for s, _ in STATE_SHARES]
    shares = [w for _, w in STATE_SHARES]
    end = micros(datetime(2026, 11, 1, tzinfo=VIETNAM_TZ))
    start = end - 365 * 86_400_000_000
    step = (end - start) // n
    chunk: list[ReportRow] = []
    for i in range(n):
        created = start + i * step
        state = PaymentState(rng.choices(states, shares)[0])
        paid = state in (
            PaymentState.SUCCEEDED,
            PaymentState.REFUNDED,
            PaymentState.REFUND_REQUIRED,
        )
        settled = None if state == PaymentState.REQUESTED else created + 120_000_000
        amount = rng.choice(AMOUNTS)
        dossier_id = f"{rng.choices(agencies, weights)[0]}-{i:08d}"
        chunk.append(
            ReportRow(
                dossier_id=dossier_id,
                agency_code=dossier_id[:13],
                gateway="vnpay" if rng.random() < 0.8 else "jsonpay",
                txn_ref=txn_ref_for(dossier_id),
                amount_vnd=amount,
                currency="VND",
                state=state,
                version=1 if state == PaymentState.REQUESTED else 2,
                created_at=created,
                updated_at=settled or created,
                settled_at=settled,
                paid_at=settled if paid else None,
                refunded_vnd=amount if state == PaymentState.REFUNDED else 0,
            )
        )
        if len(chunk) == 50_000:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def timed(samples: list[float], call: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    found = call()
    samples.append(time.perf_counter() - t0)
    return found


def answer(store: ReportStore, query: ReportQuery) -> bytes:
    """What the list route does in its thread and after: the page, then its JSON body."""
    page = store.page(query)
    assert query.reference is None or page.rows, "a reference finds its payment"
    body = {"results": [row_view(r) for r in page.rows], "next_cursor": page.next_cursor}
    return orjson.dumps(body)


def report_scenarios(rng: random.Random, rows: list[ReportRow]) -> dict[str, list[ReportQuery]]:
    """Queries as finance staff ask them: first pages, and pages from a cursor deep in the
    history (a random payment's key), each with and without filters."""

    def deep() -> tuple[int, str]:
        row = rng.choice(rows)
        return row.created_at, row.dossier_id

    def day(offset: int) -> tuple[int, int]:
        first = micros(datetime(2026, 10, 31, tzinfo=VIETNAM_TZ)) - offset * 86_400_000_000
        return first, first + 86_400_000_000

    big, small = "000.00.00.H34", "000.00.41.H34"
    scenarios: dict[str, list[ReportQuery]] = defaultdict(list)
    for _ in range(60):
        after = deep()
        first, last = day(rng.randrange(300))
        scenarios["no filter"] += [ReportQuery(), ReportQuery(after=after)]
        scenarios["one agency"] += [
            ReportQuery(agencies=frozenset({big})),
            ReportQuery(agencies=frozenset({small}), after=after),
        ]
        scenarios["scope of 3 agencies"] += [
            ReportQuery(agencies=frozenset({big, small, "000.00.07.H34"}), after=after)
        ]
        scenarios["state refund_required"] += [
            ReportQuery(states=frozenset({"refund_required"})),
            ReportQuery(states=frozenset({"refund_required"}), after=after),
        ]
        scenarios["one day, one agency"] += [
            ReportQuery(agencies=frozenset({big}), created_from=first, created_to=last)
        ]
        scenarios["gateway + state + amount"] += [
            ReportQuery(
                gateways=frozenset({"jsonpay"}),
                states=frozenset({"succeeded"}),
                amount_min=500_000,
                after=after,
            )
        ]
        scenarios["reference"] += [ReportQuery(reference=rng.choice(rows).txn_ref)]
    return scenarios


def reports_bench(n: int) -> None:
    rng = random.Random(19)
    with tempfile.TemporaryDirectory(prefix="motcua-bench-reports-") as directory:
        store = ReportStore(Path(directory) / "reports.sqlite", "bench")
        started = time.perf_counter()
        sample: list[ReportRow] = []
        for chunk in report_rows(n, rng):
            store.put_rows(chunk)
            sample.extend(rng.sample(chunk, min(len(chunk), 200)))
        loaded = time.perf_counter() - started
        size = (Path(directory) / "reports.sqlite").stat().st_size
        print(f"loaded {n:,} payments in {loaded:.1f} s; file {size / 2**20:,.0f} MiB")

        everything: list[float] = []
        print("| query | pages | p50 ms | p99 ms | max ms |")
        print("|---|---|---|---|---|")
        for name, queries in report_scenarios(rng, sample).items():
            samples: list[float] = []
            for query in queries:
                timed(samples, partial(answer, store, query))
            everything += samples
            print(
                f"| {name} | {len(samples)} | {pct(samples, 50):.2f} | {pct(samples, 99):.2f} "
                f"| {max(samples) * 1000:.2f} |"
            )
        print(
            f"| **all pages** | {len(everything)} | {pct(everything, 50):.2f} "
            f"| {pct(everything, 99):.2f} | {max(everything) * 1000:.2f} |"
        )

        # The worst case: a filter no index orders, matching nothing, reads every row.
        worst: list[float] = []
        for _ in range(5):
            timed(worst, lambda: answer(store, ReportQuery(amount_min=2_000_000)))
        print(
            f"worst case, amount_min matching no payment (every row read): "
            f"p50 {pct(worst, 50):.0f} ms, max {max(worst) * 1000:.0f} ms"
        )

        agency = ReportQuery(agencies=frozenset({"000.00.00.H34"}))
        t0 = time.perf_counter()
        exported = sum(len(chunk) for chunk in store.rows(agency))
        csv_s = time.perf_counter() - t0
        print(
            f"CSV rows of the largest agency: {exported:,} in {csv_s:.1f} s "
            f"({exported / csv_s:,.0f} rows/s, query and rows only)"
        )
        for label, since in (("a month", "2026-10-01"), ("a year", "2025-11-01")):
            totals: list[float] = []
            by_day = TotalsQuery(since, "2026-10-31", None, frozenset())
            for _ in range(5):
                found = timed(totals, partial(store.totals, by_day))
            print(f"totals of {label}: {len(found):,} rows, p50 {pct(totals, 50):.0f} ms")
        store.close()

        rebuild = ReportStore(Path(directory) / "rebuild.sqlite", "bench")
        fresh = next(report_rows(20_000, rng))
        events = [(0, i, raw) for i, raw in enumerate(e for row in fresh for e in events_for(row))]
        t0 = time.perf_counter()
        for first in range(0, len(events), 2000):
            rebuild.apply(events[first : first + 2000])
        built = time.perf_counter() - t0
        print(
            f"built from events: {len(events):,} events in {built:.1f} s "
            f"({len(events) / built:,.0f} events/s)"
        )
        rebuild.close()


def events_for(row: ReportRow) -> list[bytes]:
    """The `payment.events` of a report row's payment, as the ledger publishes them."""
    at = from_micros(row.created_at)
    order = order_for(
        {
            "dossier_id": row.dossier_id,
            "agency_code": row.agency_code,
            "fee": {"amount_vnd": row.amount_vnd, "method": "online"},
        },
        account=GatewayAccount(row.gateway, "MOTCUA"),
        submitted_at=at,
    )
    assert order is not None
    payment = open_payment(order, "bench").payment
    cause = {
        PaymentState.SUCCEEDED: Cause.GATEWAY_SUCCESS,
        PaymentState.FAILED: Cause.GATEWAY_FAILURE,
        PaymentState.EXPIRED: Cause.EXPIRY,
    }.get(row.state)
    if cause is not None:
        moved = apply(payment, cause, at + timedelta(minutes=2), "bench-ref")
        assert isinstance(moved, Applied)
        payment = moved.payment
    record = LedgerRecord(payment=payment, agency_code=row.agency_code, payment_url="https://p")
    return [outgoing_event(record, v).to_json() for v in range(1, payment.version + 1)]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--orders", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--reports", type=int, default=0, help="run the reports bench instead")
    parsed = parser.parse_args()
    if parsed.reports:
        reports_bench(parsed.reports)
    else:
        asyncio.run(main(parsed))
