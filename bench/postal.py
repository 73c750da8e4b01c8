"""Postal throughput: carrier callbacks verified and made durable per second through
`POST /v1/webhooks/postal/vnpost` (signature check, Redis dedupe, Kafka acks=all), against a bare
endpoint (same FastAPI + uvicorn, answers without any work) in the same run; and orders booked
per second at the VNPost sandbox from `dossier.submitted` events.

    .venv/bin/python bench/postal.py                    # 20,000 callbacks, 2,000 orders
    .venv/bin/python bench/postal.py --callbacks 50000 --orders 5000 --concurrency 64

Starts its own Tansu broker, the postal service, the sandbox and the bare endpoint as separate
processes (Redis from REDIS_URL, else embedded). Also prints the postal process's CPU per order
booked and per callback, each until its consumer applied what came of it.

    .venv/bin/python bench/postal.py --cpu 0.1           # CPU per input event, in process
    .venv/bin/python bench/postal.py --cpu 0.1 --profile 25

`--cpu F` measures the CPU the postal worker spends per `dossier.events` record of the seed
half-year at scale F, in this process: every record decoded as the consumer does
(`decode_input`), handed to `PostalWorker.on_batch` in polls of `POSTAL_MAX_BATCH`, the changed
states encoded and the scan run every 100 polls; Kafka and the carrier are stand-ins that answer
at once (their cost is the broker's and the carrier's, not postal's). `--profile N` prints the N
top entries of a cProfile of the same run, by own time.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
from aiokafka import AIOKafkaProducer
from aiokafka.structs import ConsumerRecord, RecordMetadata, TopicPartition
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.replay import usage
from services.common import topics
from services.common.changelog import Changelog
from services.common.kafka import DurablePublisher, ensure_topics
from services.common.settings import Settings
from services.common.signing import SIGNATURE_HEADER, sign_body
from services.common.state import StateTable
from services.common.topics import TopicSpec, declared_topics
from services.dev.embedded import Broker, EmbeddedRedis, free_port
from services.postal.commands import BookOrder, CancelOrder, QueryOrder
from services.postal.inputs import CarrierCallback
from services.postal.partner import Carrier, CreatedOrder
from services.postal.settings import PostalSettings
from services.postal.shipments import decode_state, encode_state
from services.postal.worker import DossierStates, PostalShell, PostalWorker, decode_input
from services.simulator.lifecycle import replay_events
from services.simulator.plan import plan
from tests.support import factories
from tests.support.processes import process, wait_http
from tests.support.sealed import sealed

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
    events = await sealed(producer, events)  # as intake publishes them
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


# --- CPU per input event, in process ------------------------------------------------------------


# The service scans every 300 s; the seed replay brings it 1,700-5,000 events a second: a scan
# every 100 polls of 1,000 records is on the side of too many.
SCAN_EVERY_POLLS = 100


class _AckingPublisher(DurablePublisher):
    """Stands in for the broker: every message is acknowledged at once (partition 0, the next
    offset of its topic) and counted."""

    def __init__(self) -> None:
        super().__init__("unused:9092")
        self.sent: dict[str, int] = {}

    async def publish(
        self, messages: Sequence[tuple[str, bytes | None, bytes | None]], **options: Any
    ) -> list[RecordMetadata]:
        landed = []
        for topic, _, _ in messages:
            offset = self.sent.get(topic, 0)
            self.sent[topic] = offset + 1
            landed.append(RecordMetadata(topic, 0, TopicPartition(topic, 0), offset, -1, 0, 0))
        return landed


class _InstantCarrier:
    """Stands in for VNPost: books every order at once."""

    name = "vnpost"

    def __init__(self) -> None:
        self.booked = 0

    async def create(self, order: BookOrder) -> CreatedOrder:
        self.booked += 1
        return CreatedOrder(order_id=f"VNB{self.booked:09d}", at=datetime.now(UTC))

    async def cancel(self, order: CancelOrder) -> None:
        return None

    async def query(self, order: QueryOrder) -> list[CarrierCallback]:
        return []

    async def aclose(self) -> None:
        return None


def seed_records(scale: float, seed: int = 2019) -> list[ConsumerRecord[bytes, bytes]]:
    """The seed half-year's `dossier.events` at `scale`, as the consumer receives them."""
    stamp = int(time.time() * 1000)
    records: list[ConsumerRecord[bytes, bytes]] = []
    for events in replay_events(plan(scale, seed), seed):
        for event in events:
            key, value = event["subject"].encode(), orjson.dumps(event)
            records.append(
                ConsumerRecord(
                    topics.DOSSIER_EVENTS,
                    0,
                    len(records),
                    stamp,
                    0,
                    key,
                    value,
                    None,
                    len(key),
                    len(value),
                    [],
                )
            )
    return records


async def drive_worker(
    records: list[ConsumerRecord[bytes, bytes]],
) -> tuple[float, int, int, dict[str, int]]:
    """Every record through the worker as its consumer would; (CPU seconds, orders booked,
    dossier states held at the end, records written per topic)."""
    postal = PostalSettings()
    publisher = _AckingPublisher()
    changelog = Changelog(
        "unused:9092",
        TopicSpec(topics.POSTAL_STATE_CHANGELOG, 1, compacted=True),
        publisher,
    )
    table = StateTable(
        changelog, encode=encode_state, decode=decode_state, cache_size=postal.state_cache_size
    )
    states = DossierStates(table, postal.config(), postal.rebook_after)
    carrier = _InstantCarrier()
    carriers: dict[str, Carrier] = {carrier.name: carrier}
    shell = PostalShell(publisher, carriers, postal.config(), postal.rebook_after)
    worker = PostalWorker(states, shell, publisher, postal)
    await worker.after_restore(frozenset())
    started = time.process_time()
    for n, first in enumerate(range(0, len(records), postal.max_batch), start=1):
        items = [decode_input(r) for r in records[first : first + postal.max_batch]]
        await worker.on_batch([item for item in items if item is not None])
        await table.save()
        if n % SCAN_EVERY_POLLS == 0:
            await worker.scan()
    await worker.scan()
    return time.process_time() - started, carrier.booked, len(states), publisher.sent


def cpu_per_event(scale: float, profile: int) -> None:
    Settings()  # the same settings load as the service, outside the measurement
    records = seed_records(scale)
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    cpu, booked, held, sent = asyncio.run(drive_worker(records))
    if profiler is not None:
        profiler.disable()
    print(
        f"scale {scale}: {len(records):,} dossier.events records, {booked:,} orders booked, "
        f"{held:,} dossier states held at the end"
    )
    print(f"postal worker CPU {cpu:.2f} s, {cpu / len(records) * 1e6:.1f} µs per input event")
    print("records written: " + ", ".join(f"{n:,} to {topic}" for topic, n in sorted(sent.items())))
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")
    if profiler is not None:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(profile)


def consumed_count(port: int, topic: str) -> float:
    """What postal's consumer handled of `topic` so far (its `/metrics`)."""
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "motcua_events_consumed_total" and sample.labels.get("topic") == topic
    )


def wait_consumed(port: int, topic: str, at_least: float, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while consumed_count(port, topic) < at_least:
        if time.monotonic() > deadline:
            raise TimeoutError(f"postal handled fewer than {at_least:.0f} records of {topic}")
        time.sleep(0.2)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--callbacks", type=int, default=20000)
    parser.add_argument("--orders", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--serve-bare", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--cpu", type=float, default=0.0, help="CPU per event at this scale")
    parser.add_argument("--profile", type=int, default=0, help="with --cpu: top N of a profile")
    args = parser.parse_args()
    if args.cpu:
        cpu_per_event(args.cpu, args.profile)
        return
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
            process(["services.cli", "run", "postal"], env, "bench-postal") as postal,
        ):
            wait_http(f"http://127.0.0.1:{bare_port}/healthz")
            wait_http(f"http://127.0.0.1:{sandbox_port}/healthz")
            wait_http(f"http://127.0.0.1:{postal_port}/readyz", timeout=120)
            # orders first: the callback run leaves the agent a backlog that would compete
            cpu_before = usage(postal.pid).cpu_seconds
            order_rate = asyncio.run(
                book_orders(broker.bootstrap, f"http://127.0.0.1:{sandbox_port}", args.orders, run)
            )
            # each booking's acceptance comes back as a callback: wait until it is applied
            wait_consumed(postal_port, "postal.callbacks", args.orders)
            order_cpu = usage(postal.pid).cpu_seconds - cpu_before
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
            wait_consumed(postal_port, "postal.callbacks", args.orders + len(warm))
            consumed = consumed_count(postal_port, "postal.callbacks")
            cpu_before = usage(postal.pid).cpu_seconds
            postal_rate, postal_status = asyncio.run(
                post_all(
                    f"http://127.0.0.1:{postal_port}/v1/webhooks/postal/vnpost",
                    bodies,
                    args.concurrency,
                )
            )
            wait_consumed(postal_port, "postal.callbacks", consumed + args.callbacks)
            callback_cpu = usage(postal.pid).cpu_seconds - cpu_before
    finally:
        broker.stop()
    print(f"callbacks: {args.callbacks}, concurrency {args.concurrency}")
    print(f"bare endpoint          {bare_rate:9,.0f} /s   {bare_status}")
    print(f"postal webhook         {postal_rate:9,.0f} /s   {postal_status}")
    print(f"ratio webhook / bare   {postal_rate / bare_rate:9.3f}")
    print(
        f"orders booked          {order_rate:9,.0f} /s   ({args.orders} dossier.submitted, pickup)"
    )
    print(
        f"postal CPU per order booked   {order_cpu / args.orders * 1e6:7,.0f} µs (its event, "
        "the booking call, the carrier's first callback served and applied)"
    )
    print(
        f"postal CPU per callback       {callback_cpu / args.callbacks * 1e6:7,.0f} µs "
        "(served by the webhook, then applied by the consumer)"
    )
    print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
