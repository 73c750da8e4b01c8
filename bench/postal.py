"""Postal throughput: carrier callbacks verified and made durable per second through
`POST /v1/webhooks/postal/vnpost` (signature check, Redis dedupe, Kafka acks=all), against a bare
endpoint (same FastAPI + uvicorn, answers without any work) in the same run; and orders booked
per second at the VNPost sandbox from `dossier.submitted` events.

    .venv/bin/python bench/postal.py                    # 20,000 callbacks, 2,000 orders
    .venv/bin/python bench/postal.py --callbacks 50000 --orders 5000 --concurrency 64

Starts its own Tansu broker, the postal service, the sandbox and the bare endpoint as separate
processes (Redis from REDIS_URL, else embedded).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
from aiokafka import AIOKafkaProducer
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.kafka import ensure_topics
from services.common.signing import SIGNATURE_HEADER, sign_body
from services.common.topics import declared_topics
from services.dev.embedded import Broker, EmbeddedRedis, free_port
from tests.support import factories
from tests.support.processes import process, wait_http

SECRET = "bench-vnpost-secret"


async def _bare_webhook(request: Request) -> JSONResponse:
    await request.body()
    return JSONResponse({"status": "accepted"})


def serve_bare(port: int) -> None:
    """The baseline: the same web stack, reading the body and answering, nothing else."""
    import uvicorn

    api = FastAPI()
    api.add_api_route("/v1/webhooks/postal/{carrier}", _bare_webhook, methods=["POST"])
    api.add_api_route("/healthz", _bare_webhook, methods=["GET"])
    uvicorn.run(api, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def callbacks(n: int, run: str) -> list[bytes]:
    base = datetime.now(UTC)
    return [
        orjson.dumps(
            {
                "order_id": f"VNB{i:09d}",
                "client_order_id": f"000.00.12.H34-{run}-{i % 5000:06d}:pickup",
                "status_code": 6,
                "status_time": (base + timedelta(microseconds=i)).isoformat(),
            }
        )
        for i in range(n)
    ]


async def post_all(url: str, bodies: list[bytes], concurrency: int) -> tuple[float, dict[int, int]]:
    """POST every body, signed, from `concurrency` keep-alive connections (aiohttp: a lighter
    client than httpx, so the load generator eats less of the 2 cores)."""
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    statuses: dict[int, int] = {}
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                headers = {
                    "content-type": "application/json",
                    SIGNATURE_HEADER: sign_body(body, SECRET),
                }
                async with session.post(url, data=body, headers=headers) as response:
                    await response.read()
                    statuses[response.status] = statuses.get(response.status, 0) + 1

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(bodies) / elapsed, statuses


def submitted(dossier_id: str) -> dict[str, Any]:
    """A pickup with the fee collected on delivery, filed now."""
    now = datetime.now(UTC).isoformat()
    return factories.submitted(
        dossier_id,
        source="portal/bench",
        event_id=f"{dossier_id}-submitted",
        time=now,
        submitted_at=now,
        fee={"amount_vnd": 50000, "method": "postal_cod"},
        postal={"mode": "pickup"},
    )


async def book_orders(bootstrap: str, sandbox_url: str, n: int, run: str) -> float:
    events = [submitted(f"000.00.12.H34-{run}-O{i:06d}") for i in range(n)]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=2)
    await producer.start()
    started = time.perf_counter()
    try:
        futures = [
            await producer.send("dossier.events", value=orjson.dumps(e), key=e["subject"].encode())
            for e in events
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    async with httpx.AsyncClient(timeout=10) as client:
        while True:
            orders = (await client.get(f"{sandbox_url}/sandbox/bookings")).json()["orders"]
            booked = sum(1 for d in orders if f"-{run}-O" in d)
            if booked >= n:
                break
            if time.perf_counter() - started > 600:
                raise TimeoutError(f"only {booked} of {n} orders booked")
            await asyncio.sleep(0.2)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--callbacks", type=int, default=20000)
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--serve-bare", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_bare:
        serve_bare(args.serve_bare)
        return

    run = uuid.uuid4().hex[:6]
    redis_server = EmbeddedRedis.ensure(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    broker = Broker(port=free_port()).start()
    postal_port, sandbox_port, bare_port = free_port(), free_port(), free_port()
    env = {
        "KAFKA_BOOTSTRAP": broker.bootstrap,
        "REDIS_URL": redis_server.url,
        "MOTCUA_REDIS_NAMESPACE": f"motcua-bench-{run}",
        "MOTCUA_TOPIC_PARTITIONS": "4",
        "MOTCUA_DATA_DIR": tempfile.mkdtemp(prefix="motcua-postal-bench-"),
        "MOTCUA_LOG_LEVEL": "ERROR",
        "POSTAL_PORT": str(postal_port),
        "VNPOST_SANDBOX_PORT": str(sandbox_port),
        "VNPOST_URL": f"http://127.0.0.1:{sandbox_port}",
        "POSTAL_PUBLIC_URL": f"http://127.0.0.1:{postal_port}",
        "VNPOST_SECRETS": SECRET,
        "VNPOST_SANDBOX_STEP_SECONDS": "3600",  # orders stay put: no callback traffic
    }
    try:
        asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
        with (
            process(["bench.postal", "--serve-bare", str(bare_port)], env, "bench-bare"),
            process(["services.cli", "run", "vnpost-sandbox"], env, "bench-vnpost-sandbox"),
            process(["services.cli", "run", "postal"], env, "bench-postal"),
        ):
            wait_http(f"http://127.0.0.1:{bare_port}/healthz")
            wait_http(f"http://127.0.0.1:{sandbox_port}/healthz")
            wait_http(f"http://127.0.0.1:{postal_port}/readyz", timeout=120)
            # orders first: the callback run leaves the agent a backlog that would compete
            order_rate = asyncio.run(
                book_orders(broker.bootstrap, f"http://127.0.0.1:{sandbox_port}", args.orders, run)
            )
            bodies = callbacks(args.callbacks, run)
            warm = callbacks(500, f"w{run}")
            asyncio.run(
                post_all(f"http://127.0.0.1:{bare_port}/v1/webhooks/postal/vnpost", warm, 16)
            )
            asyncio.run(
                post_all(f"http://127.0.0.1:{postal_port}/v1/webhooks/postal/vnpost", warm, 16)
            )
            bare_rate, bare_status = asyncio.run(
                post_all(
                    f"http://127.0.0.1:{bare_port}/v1/webhooks/postal/vnpost",
                    bodies,
                    args.concurrency,
                )
            )
            postal_rate, postal_status = asyncio.run(
                post_all(
                    f"http://127.0.0.1:{postal_port}/v1/webhooks/postal/vnpost",
                    bodies,
                    args.concurrency,
                )
            )
    finally:
        broker.stop()
    print(f"callbacks: {args.callbacks}, concurrency {args.concurrency}")
    print(f"bare endpoint          {bare_rate:9,.0f} /s   {bare_status}")
    print(f"postal webhook         {postal_rate:9,.0f} /s   {postal_status}")
    print(f"ratio webhook / bare   {postal_rate / bare_rate:9.3f}")
    print(
        f"orders booked          {order_rate:9,.0f} /s   ({args.orders} dossier.submitted, pickup)"
    )


if __name__ == "__main__":
    main()
