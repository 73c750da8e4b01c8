"""Portals throughput: callbacks delivered per second to a local receiver, against a bare aiohttp
client posting the same bodies to the same receiver in the same run; then the same with 30 % of
the receiver's answers failing, where every event must be delivered exactly once as the
receiver's dedupe on `X-Motcua-Delivery` sees it.

    .venv/bin/python bench/portals.py --events 20000

Starts its own Tansu broker and portals process (dev mode: loopback callbacks; a short retry
schedule), subscribes a receiver served by this script (aiohttp, verifying every signature),
publishes one `dossier.submitted` and one `payment.succeeded` per dossier, and counts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
from aiohttp import web
from aiokafka import AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.kafka import ensure_topics
from services.common.settings import hash_key
from services.common.signing import SIGNATURE_HEADER, SignatureRejected, sign_body, verify_body
from services.common.topics import declared_topics
from services.dev.embedded import Broker, EmbeddedRedis, free_port
from tests.support.processes import process, wait_http
from tests.support.redis_keys import forget_run

KEY = "bench-portal-key"
SOURCE = "portal/bench"
DELIVERY = "X-Motcua-Delivery"


class Receiver:
    """Counts deliveries by `X-Motcua-Delivery`; fails `fail_rate` of its answers (500)."""

    def __init__(self) -> None:
        self.secret = ""
        self.fail_rate = 0.0
        self.accepted: Counter[str] = Counter()  # 2xx answers per delivery id
        self.attempts = 0
        self.bad_signatures = 0
        self.done = asyncio.Event()
        self.expect = 0
        self.verify = True

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.attempts += 1
        if self.verify:
            try:
                verify_body(body, request.headers.get(SIGNATURE_HEADER), [self.secret])
            except SignatureRejected:
                self.bad_signatures += 1
                return web.Response(status=401)
        if random.random() < self.fail_rate:
            return web.Response(status=500)
        delivery = request.headers.get(DELIVERY, "")
        self.accepted[delivery] += 1
        if self.expect and len(self.accepted) >= self.expect:
            self.done.set()
        return web.Response(status=204)

    def reset(self, expect: int, fail_rate: float) -> None:
        self.accepted.clear()
        self.attempts = 0
        self.bad_signatures = 0
        self.done = asyncio.Event()
        self.expect = expect
        self.fail_rate = fail_rate


def events(n: int, run: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    submitted, paid = [], []
    for i in range(n):
        dossier = f"000.00.12.H34-{run}-{i:07d}"
        submitted.append(
            {
                "specversion": "1.0",
                "id": f"{run}-s-{i}",
                "source": SOURCE,
                "type": "dossier.submitted",
                "subject": dossier,
                "time": "2026-11-26T08:15:00+07:00",
                "datacontenttype": "application/json",
                "data": {"dossier_id": dossier, "agency_code": "000.00.12.H34"},
            }
        )
        paid.append(
            {
                "specversion": "1.0",
                "id": f"{run}-p-{i}",
                "source": "motcua/payments",
                "type": "payment.succeeded",
                "subject": dossier,
                "time": "2026-11-26T08:20:00+07:00",
                "datacontenttype": "application/json",
                "data": {"dossier_id": dossier, "amount_vnd": 150000},
            }
        )
    return submitted, paid


async def publish(bootstrap: str, topic: str, batch: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=2, max_batch_size=1024 * 1024
    )
    await producer.start()
    try:
        futures = [
            await producer.send(topic, value=orjson.dumps(e), key=e["subject"].encode())
            for e in batch
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def bare_client(url: str, bodies: list[bytes], secret: str, concurrency: int) -> float:
    """The same bodies, signed, posted by a bare aiohttp client: the ceiling of the receiver."""
    queue: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
    for i, body in enumerate(bodies):
        queue.put_nowait((i, body))

    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            i, body = queue.get_nowait()
            headers = {
                "Content-Type": "application/json",
                SIGNATURE_HEADER: sign_body(body, secret),
                DELIVERY: f"bare-{i}",
            }
            async with session.post(url, data=body, headers=headers) as response:
                await response.read()

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return len(bodies) / (time.perf_counter() - started)


async def through_portals(
    receiver: Receiver, bootstrap: str, n: int, run: str, fail_rate: float, timeout: float
) -> tuple[float, bool]:
    submitted, paid = events(n, run)
    await publish(bootstrap, "dossier.events", submitted)  # owners first, then the outcomes
    receiver.reset(n, fail_rate)
    started = time.perf_counter()
    await publish(bootstrap, "payment.events", paid)
    try:
        await asyncio.wait_for(receiver.done.wait(), timeout)
        finished = True
    except TimeoutError:
        finished = False
    return len(receiver.accepted) / (time.perf_counter() - started), finished


async def main(args: argparse.Namespace) -> None:
    broker = Broker(port=free_port()).start()
    redis_server = EmbeddedRedis.ensure(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    port, receiver_port = free_port(), free_port()
    run = uuid.uuid4().hex[:8]
    receiver = Receiver()
    app = web.Application()
    app.router.add_post("/callbacks", receiver.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", receiver_port).start()
    callback = f"http://127.0.0.1:{receiver_port}/callbacks"
    env = {
        "KAFKA_BOOTSTRAP": broker.bootstrap,
        "REDIS_URL": redis_server.url,
        "MOTCUA_REDIS_NAMESPACE": f"motcua-bench-{run}",
        "MOTCUA_TOPIC_PARTITIONS": str(args.partitions),
        "MOTCUA_DATA_DIR": tempfile.mkdtemp(prefix="motcua-bench-portals-"),
        "PORTALS_PORT": str(port),
        "MOTCUA_ENV": "dev",
        "PORTALS_RETRY_SECONDS": ",".join(["0.2"] * args.retries),
        "MOTCUA_PORTALS": orjson.dumps([{"source": SOURCE, "key_sha256": hash_key(KEY)}]).decode(),
        "MOTCUA_LOG_LEVEL": "WARNING",
        "PORTALS_PER_PORTAL_CONCURRENCY": str(args.per_portal),
    }
    try:
        await ensure_topics(broker.bootstrap, declared_topics(args.partitions))
        with process(["services.cli", "run", "portals"], env, "bench-portals"):
            url = f"http://127.0.0.1:{port}"
            wait_http(f"{url}/readyz", timeout=90)
            async with httpx.AsyncClient() as client:
                answer = await client.put(
                    f"{url}/v1/subscription",
                    json={"url": callback, "types": ["payment.*"]},
                    headers={"Authorization": f"Bearer {KEY}"},
                )
            answer.raise_for_status()
            receiver.secret = answer.json()["secret"]
            # warm up the connections and the worker
            await through_portals(receiver, broker.bootstrap, 200, run + "w", 0.0, 60)

            _, paid = events(args.events, run + "x")
            bodies = [orjson.dumps(e) for e in paid]
            receiver.reset(0, 0.0)
            bare = await bare_client(callback, bodies, receiver.secret, args.concurrency)

            rate, finished = await through_portals(
                receiver, broker.bootstrap, args.events, run + "a", 0.0, args.timeout
            )
            clean = (len(receiver.accepted), receiver.attempts, receiver.bad_signatures)
            failing, finished_failing = await through_portals(
                receiver, broker.bootstrap, args.events, run + "b", 0.3, args.timeout
            )
            await asyncio.sleep(2.0)  # anything sent again after its success shows up now
            delivered = len(receiver.accepted)
            twice = sum(1 for c in receiver.accepted.values() if c > 1)
            attempts, bad = receiver.attempts, receiver.bad_signatures
    finally:
        await runner.cleanup()
        broker.stop()
        forget_run(env)  # the keys this run left in a shared Redis
        redis_server.stop()

    print(f"events: {args.events} per run; {args.partitions} partitions; {os.cpu_count()} cores")
    print(f"{'path':<42}{'deliveries/s':>14}{'ratio':>8}")
    print(f"{'bare aiohttp client, same bodies':<42}{bare:>14,.0f}{1.0:>8.2f}")
    print(f"{'portals, every answer 2xx':<42}{rate:>14,.0f}{rate / bare:>8.3f}")
    print(f"{'portals, 30 % of answers 500':<42}{failing:>14,.0f}{failing / bare:>8.3f}")
    print(
        f"every answer 2xx: {clean[0]} of {args.events} delivered"
        f"{'' if finished else ' (timed out)'}, {clean[1]} attempts, {clean[2]} bad signatures"
    )
    print(
        f"30 % failing: {delivered} of {args.events} delivered"
        f"{'' if finished_failing else ' (timed out)'}, {attempts} attempts, "
        f"{twice} delivered more than once, {bad} bad signatures"
    )
    if delivered != args.events or twice or bad:
        raise SystemExit("not every event was delivered exactly once")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--retries", type=int, default=12, help="waits of 0.2 s before giving up")
    parser.add_argument("--timeout", type=float, default=300.0)
    parser.add_argument("--per-portal", type=int, default=64, help="PORTALS_PER_PORTAL_CONCURRENCY")
    asyncio.run(main(parser.parse_args()))
