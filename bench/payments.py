"""Payments throughput: IPN callbacks verified and made durable per second, against a bare FastAPI
endpoint that only returns 200 (same load generator, same run), and orders created per second.

    .venv/bin/python bench/payments.py --orders 3000 --concurrency 64

Starts its own Tansu broker and payments worker (Redis from REDIS_URL, else embedded). Orders:
`dossier.submitted` events are produced, and the clock stops when every `payment.requested` is on
`payment.events`. IPNs: one signed success IPN per order through `GET /v1/webhooks/payments/vnpay`
(signature check, Redis dedupe claim and order lookup, Kafka acks=all to `payments.callbacks`);
the requests per second are the webhook's answers, and "IPNs applied" counts until the worker
has published `payment.succeeded` for every order (the IPN's whole effect).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from datetime import datetime
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
from services.payments.domain import txn_ref_for
from tests.support import factories
from tests.support.processes import process, wait_http
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
        redis_server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--orders", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=64)
    asyncio.run(main(parser.parse_args()))
