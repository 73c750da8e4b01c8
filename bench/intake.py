"""Intake throughput: events accepted per second through `POST /v1/events`, against a raw
aiokafka producer sending the same envelopes to the same broker in the same run.

    make bench-intake            # or: .venv/bin/python bench/intake.py --events 100000

Starts its own Tansu broker and intake process (Redis from REDIS_URL, else embedded).
`--tracing off,0.01,1` runs intake once per tracing mode, in turn, on the same broker; the
CPU microseconds intake spends per event compare modes better than rates on a busy machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiokafka import AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.kafka import ensure_topics
from services.common.settings import hash_key
from services.common.topics import declared_topics
from services.dev.embedded import Broker, EmbeddedRedis, free_port
from tests.support.processes import process, wait_http
from tests.support.redis_keys import forget_run

KEY = "bench-portal-key"


def make_events(n: int, run: str) -> list[dict[str, Any]]:
    events = []
    for i in range(n):
        dossier = f"000.00.12.H34-{run}-{i:07d}"
        events.append(
            {
                "specversion": "1.0",
                "id": f"{run}-{i}",
                "source": "portal/bench",
                "type": "dossier.submitted",
                "subject": dossier,
                "time": "2019-03-04T08:15:00+07:00",
                "datacontenttype": "application/json",
                "data": {
                    "dossier_id": dossier,
                    "agency_code": "000.00.12.H34",
                    "procedure_code": "1.004227",
                    "tier": "province",
                    "sector": "construction",
                    "channel": "online",
                    "online_level": 4,
                    "applicant": {"name": "Nguyễn Văn A", "phone": "0905123456"},
                    "fee": {"amount_vnd": 150000, "method": "online"},
                    "postal": {"mode": "none"},
                    "submitted_at": "2019-03-04T08:15:00+07:00",
                },
            }
        )
    return events


async def raw_producer(bootstrap: str, events: list[dict[str, Any]]) -> float:
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=2, max_batch_size=1024 * 1024
    )
    await producer.start()
    started = time.perf_counter()
    futures = [
        await producer.send("dossier.events", value=orjson.dumps(e), key=e["subject"].encode())
        for e in events
    ]
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - started
    await producer.stop()
    return len(events) / elapsed


async def through_intake(
    url: str, bodies: list[bytes], concurrency: int, per_body: int
) -> tuple[float, list[float]]:
    latencies: list[float] = []
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}

    # aiohttp as the load generator: httpx's client tops out near 200 requests/s on one core,
    # which would measure the generator instead of intake.
    async def worker(session: aiohttp.ClientSession) -> None:
        while not queue.empty():
            body = queue.get_nowait()
            t0 = time.perf_counter()
            async with session.post(f"{url}/v1/events", data=body, headers=headers) as response:
                answer = await response.json(content_type=None)
            latencies.append(time.perf_counter() - t0)
            if response.status != 202 or answer["accepted"] != per_body:
                raise RuntimeError(f"unexpected answer {response.status}: {answer}")

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return len(bodies) * per_body / elapsed, latencies


def pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] * 1000 if len(values) > 1 else 0.0


async def main(args: argparse.Namespace) -> None:
    broker = Broker(port=free_port()).start()
    redis_server = EmbeddedRedis.ensure(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    port = free_port()
    run = uuid.uuid4().hex[:8]
    portals = [
        {
            "source": "portal/bench",
            "key_sha256": hash_key(KEY),
            "rate_per_second": 1e9,
            "burst": 10**9,
        }
    ]
    env = {
        "KAFKA_BOOTSTRAP": broker.bootstrap,
        "REDIS_URL": redis_server.url,
        "MOTCUA_REDIS_NAMESPACE": f"motcua-bench-{run}",
        "INTAKE_PORT": str(port),
        "MOTCUA_PORTALS": orjson.dumps(portals).decode(),
        "MOTCUA_LOG_LEVEL": "WARNING",
    }
    modes = [m.strip() for m in args.tracing.split(",") if m.strip()]
    results: list[tuple[str, float, list[float], float, float, list[float], float]] = []
    traces = tempfile.mkdtemp(prefix="motcua-bench-traces-")
    try:
        await ensure_topics(broker.bootstrap, declared_topics(8))
        raw_rate = await raw_producer(broker.bootstrap, make_events(args.events, run + "r"))
        for n, mode in enumerate(modes):
            # one intake process per tracing mode, in the order given, on the same broker
            with process(
                ["services.cli", "run", "intake"], env | tracing_env(mode, traces), "bench-intake"
            ) as proc:
                wait_http(f"http://127.0.0.1:{port}/readyz")
                url = f"http://127.0.0.1:{port}"
                # Warm up intake's connections before measuring.
                warm = [orjson.dumps(e) for e in make_events(50, f"{run}w{n}")]
                await through_intake(url, warm, 4, 1)
                batch_events = make_events(args.events, f"{run}b{n}")
                bodies = [
                    orjson.dumps(batch_events[i : i + 500])
                    for i in range(0, len(batch_events), 500)
                ]
                cpu = cpu_seconds(proc.pid)
                batch_rate, batch_lat = await through_intake(url, bodies, args.concurrency, 500)
                batch_cpu = (cpu_seconds(proc.pid) - cpu) / args.events * 1e6
                singles = [orjson.dumps(e) for e in make_events(args.singles, f"{run}s{n}")]
                cpu = cpu_seconds(proc.pid)
                single_rate, single_lat = await through_intake(
                    url, singles, args.concurrency * 4, 1
                )
                single_cpu = (cpu_seconds(proc.pid) - cpu) / args.singles * 1e6
            results.append(
                (mode, batch_rate, batch_lat, batch_cpu, single_rate, single_lat, single_cpu)
            )
    finally:
        broker.stop()
        forget_run(env)  # the keys this run left in a shared Redis
        redis_server.stop()

    print(f"events: {args.events} in batches of 500, {args.singles} single; {os.cpu_count()} cores")
    print(f"{'path':<40}{'events/s':>12}{'ratio':>9}{'p50 ms':>10}{'p99 ms':>10}{'CPU µs/ev':>11}")
    print(f"{'raw aiokafka producer':<40}{raw_rate:>12,.0f}{1.0:>9.2f}")
    for mode, b_rate, b_lat, b_cpu, s_rate, s_lat, s_cpu in results:
        label = "" if modes == ["off"] else f", tracing {mode}"
        for path, rate, lat, cpu in (
            ("intake, batches of 500", b_rate, b_lat, b_cpu),
            ("intake, single events", s_rate, s_lat, s_cpu),
        ):
            print(
                f"{path + label:<40}{rate:>12,.0f}{rate / raw_rate:>9.3f}"
                f"{pct(lat, 50):>10.1f}{pct(lat, 99):>10.1f}{cpu:>11.0f}"
            )
    if len(modes) > 1:
        print(f"spans written to {traces}")


def cpu_seconds(pid: int) -> float:
    """User and system CPU of a process so far (/proc: no psutil here)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tracing_env(mode: str, traces: str) -> dict[str, str]:
    """`off`: no exporter (tracing not set up); a ratio: new traces sampled at that ratio, the
    spans written as JSON lines (`MOTCUA_TRACES_DIR`), as `motcua dev` does."""
    if mode == "off":
        return {"MOTCUA_TRACES_DIR": "", "OTEL_EXPORTER_OTLP_ENDPOINT": ""}
    return {
        "MOTCUA_TRACES_DIR": traces,
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": str(float(mode)),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--singles", type=int, default=3_000)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument(
        "--tracing",
        default="off",
        help="comma-separated: `off` or a sampling ratio each (e.g. off,0.01,1), run in turn",
    )
    asyncio.run(main(parser.parse_args()))
