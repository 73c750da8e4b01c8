"""SMS throughput and latency: messages accepted by the sandbox gateways per second at steady
state, against a raw aiokafka consume+decode of the same events in the same run; and p50/p99
from an event's append to `dossier.events` to the sandbox's acceptance at a fixed rate.

    .venv/bin/python bench/sms.py                     # defaults: 10,000 dossiers, 200 events/s
    .venv/bin/python bench/sms.py --dossiers 20000 --rate 200 --seconds 20

Starts its own Tansu broker, both sandbox gateways (no faults, no delivery reports) and the SMS
worker as separate processes (Redis from REDIS_URL, else embedded).
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.events import decode_event
from services.common.kafka import ensure_topics
from services.common.topics import declared_topics
from services.dev.embedded import Broker, EmbeddedRedis, free_port
from services.sms.decisions import idempotency_key
from tests.support.processes import process, wait_http
from tests.support.redis_keys import forget_run
from tests.support.sealed import sealed

SOURCE = "portal/bench"


def envelope(type_: str, dossier: str, event_id: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": SOURCE,
        "type": type_,
        "subject": dossier,
        "time": datetime.now(UTC).isoformat(),
        "datacontenttype": "application/json",
        "data": {"dossier_id": dossier, "agency_code": "000.00.12.H34", **data},
    }


def submitted(dossier: str, i: int) -> dict[str, Any]:
    return envelope(
        "dossier.submitted",
        dossier,
        f"{dossier}-s",
        {
            "procedure_code": "1.004227",
            "tier": "province",
            "sector": "construction",
            "channel": "online",
            "online_level": 4,
            "applicant": {"name": "Nguyễn Văn A", "phone": f"09{i % 100_000_000:08d}"},
            "fee": {"amount_vnd": 150000, "method": "online"},
            "postal": {"mode": "none"},
            "submitted_at": "2019-03-04T08:15:00+07:00",
        },
    )


def received(dossier: str, i: int) -> dict[str, Any]:
    return envelope(
        "dossier.received",
        dossier,
        f"{dossier}-r",
        {
            "received_at": "2019-03-04T08:20:00+07:00",
            "due_at": "2019-03-11T17:00:00+07:00",
            "receipt_no": f"H34.{i}",
        },
    )


async def produce(bootstrap: str, events: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        for event in await sealed(producer, events):
            await producer.send(
                "dossier.events", orjson.dumps(event), key=event["subject"].encode()
            )
        await producer.flush()
    finally:
        await producer.stop()


async def raw_consume(bootstrap: str, count: int) -> float:
    """Events per second through a bare aiokafka consumer decoding every envelope."""
    consumer = AIOKafkaConsumer(
        "dossier.events",
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=f"bench-raw-{uuid.uuid4().hex[:6]}",
    )
    await consumer.start()
    try:
        seen = 0
        started = None
        while seen < count:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batch.values():
                if started is None:
                    started = time.perf_counter()
                for record in records:
                    decode_event(record.value)
                    seen += 1
        assert started is not None
        return seen / (time.perf_counter() - started)
    finally:
        await consumer.stop()


def accepted(gateways: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for gateway in gateways:
        out.extend(httpx.get(f"{gateway}/v1/messages", timeout=60).json()["accepted"])
    return out


def count(gateways: list[str]) -> int:
    return sum(httpx.get(f"{g}/v1/stats", timeout=10).json()["accepted"] for g in gateways)


async def fixed_rate(bootstrap: str, events: list[dict[str, Any]], rate: float) -> dict[str, float]:
    """Send at `rate` per second; return each event's send time (time.time()) by id."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
    await producer.start()
    sent_at: dict[str, float] = {}
    try:
        events = await sealed(producer, events)  # as intake publishes them
        start = time.perf_counter()
        for n, event in enumerate(events):
            delay = start + n / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent_at[event["id"]] = time.time()
            await producer.send(
                "dossier.events", orjson.dumps(event), key=event["subject"].encode()
            )
        await producer.flush()
    finally:
        await producer.stop()
    return sent_at


Sample = tuple[float, int, float]  # (perf_counter, SMS accepted, worker CPU seconds)


def steady_state(samples: list[Sample], total: int) -> tuple[Sample, Sample]:
    """The first and last (time, accepted) samples of the 20 %..80 % window, widened to the
    samples just outside it when fewer than two fall inside (a backlog drained that fast)."""
    lo, hi = 0.2 * total, 0.8 * total
    inside = [i for i, (_, n, _) in enumerate(samples) if lo <= n <= hi]
    if len(inside) >= 2:
        return samples[inside[0]], samples[inside[-1]]
    before = [i for i, (_, n, _) in enumerate(samples) if n < lo]
    after = [i for i, (_, n, _) in enumerate(samples) if n > hi]
    first = before[-1] if before else 0
    last = after[0] if after else len(samples) - 1
    return samples[first], samples[last]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc (0 where there is no /proc)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    """The machine is shared: every figure is printed with how busy it was."""
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dossiers", type=int, default=10000)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()

    broker = Broker(port=free_port()).start()
    redis_server = EmbeddedRedis.ensure(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    sms_port, p1, p2 = free_port(), free_port(), free_port()
    env = {
        "KAFKA_BOOTSTRAP": broker.bootstrap,
        "REDIS_URL": redis_server.url,
        "MOTCUA_REDIS_NAMESPACE": f"bench-sms-{uuid.uuid4().hex[:8]}",
        "MOTCUA_TOPIC_PARTITIONS": "4",
        "MOTCUA_DATA_DIR": tempfile.mkdtemp(prefix="motcua-bench-sms-"),
        "MOTCUA_LOG_LEVEL": "WARNING",
        "SMS_PORT": str(sms_port),
        "SMS_PUBLIC_URL": f"http://127.0.0.1:{sms_port}",
        "SMS_PRIMARY_URL": f"http://127.0.0.1:{p1}",
        "SMS_SECONDARY_URL": f"http://127.0.0.1:{p2}",
        "SMS_PRIMARY_SANDBOX_PORT": str(p1),
        "SMS_SECONDARY_SANDBOX_PORT": str(p2),
        "SMS_QUIET_START": "00:00",
        "SMS_QUIET_END": "00:00",
        "SMS_GLOBAL_RATE": "100000",
        "SMS_GLOBAL_BURST": "100000",
        "SMS_SANDBOX_REPORTS": "false",
    }
    gateways = [f"http://127.0.0.1:{p1}", f"http://127.0.0.1:{p2}"]
    try:
        asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
        run = uuid.uuid4().hex[:6]
        dossiers = [f"000.00.12.H34-{run}-{i:07d}" for i in range(args.dossiers)]
        latency_n = int(args.rate * args.seconds)
        latency_dossiers = [f"000.00.12.H34-{run}-L{i:06d}" for i in range(latency_n)]
        load = [e for i, d in enumerate(dossiers) for e in (submitted(d, i), received(d, i))]
        contacts = [submitted(d, 50_000_000 + i) for i, d in enumerate(latency_dossiers)]
        print(f"producing {len(load)} events for {args.dossiers} SMS ...", flush=True)
        asyncio.run(produce(broker.bootstrap, load))

        raw_rate = asyncio.run(raw_consume(broker.bootstrap, len(load)))
        print(f"raw aiokafka consume+decode: {raw_rate:,.0f} events/s", flush=True)

        with (
            process(["services.cli", "run", "sms-primary-sandbox"], env, "bench-sms-primary"),
            process(["services.cli", "run", "sms-secondary-sandbox"], env, "bench-sms-second"),
            process(["services.cli", "run", "sms"], env, "bench-sms") as worker,
        ):
            for gateway in gateways:
                wait_http(f"{gateway}/healthz", timeout=30)
            wait_http(f"http://127.0.0.1:{sms_port}/readyz", timeout=120)
            # Throughput: the backlog drains; steady state is 20 %..80 % of the messages.
            samples: list[Sample] = []
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                n = count(gateways)
                samples.append((time.perf_counter(), n, cpu_seconds(worker.pid)))
                if n >= args.dossiers:
                    break
                time.sleep(0.1)  # the batched worker drains 5,000 SMS in a few seconds
            (t0, n0, cpu0), (t1, n1, cpu1) = steady_state(samples, args.dossiers)
            sms_rate = (n1 - n0) / (t1 - t0) if t1 > t0 else float("nan")
            print(f"sms accepted at steady state: {sms_rate:,.0f} SMS/s", flush=True)
            # The whole drain, from /readyz: also the consuming done before the first send.
            (t_ready, _, cpu_ready), (t_end, n_end, cpu_end) = samples[0], samples[-1]
            print(
                f"whole drain from ready: {n_end} SMS in {t_end - t_ready:.2f} s "
                f"({n_end / (t_end - t_ready):,.0f} SMS/s), worker CPU "
                f"{(cpu_end - cpu_ready) / max(n_end, 1) * 1000:.2f} ms per SMS",
                flush=True,
            )
            if n1 > n0:
                per_sms = (cpu1 - cpu0) / (n1 - n0) * 1000
                print(f"worker CPU at steady state: {per_sms:.2f} ms per SMS", flush=True)
            print(f"load average (1, 5, 15 min): {load_average()}", flush=True)
            if os.environ.get("BENCH_SMS_METRICS"):
                text = httpx.get(f"http://127.0.0.1:{sms_port}/metrics").text
                print("\n".join(x for x in text.splitlines() if "_sum" in x or "_count" in x))
            print(f"ratio to raw consume+decode (2 events per SMS): {2 * sms_rate / raw_rate:.3f}")
            records = accepted(gateways)
            refs = [r["reference"] for r in records]
            print(f"accepted {len(refs)}, duplicates {len(refs) - len(set(refs))}", flush=True)

            # Latency at a fixed rate: phone numbers first, then dossier.received at `rate`.
            asyncio.run(produce(broker.bootstrap, contacts))
            time.sleep(3)
            events = [received(d, i) for i, d in enumerate(latency_dossiers)]
            sent_at = asyncio.run(fixed_rate(broker.bootstrap, events, args.rate))
            keys = {idempotency_key(SOURCE, e["id"], "dossier_received"): e["id"] for e in events}
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and count(gateways) < args.dossiers + latency_n:
                time.sleep(0.5)
            at = {r["reference"]: r["accepted_at"] for r in accepted(gateways)}
            latencies = sorted((at[k] - sent_at[eid]) * 1000 for k, eid in keys.items() if k in at)
            p50 = statistics.median(latencies)
            p99 = latencies[int(0.99 * (len(latencies) - 1))]
            print(
                f"latency at {args.rate:.0f} events/s over {len(latencies)}/{latency_n} SMS: "
                f"p50 {p50:.1f} ms, p99 {p99:.1f} ms",
                flush=True,
            )
            print(f"load average (1, 5, 15 min): {load_average()}", flush=True)
    finally:
        broker.stop()
        forget_run(env)  # the keys this run left in a shared Redis
        redis_server.stop()


if __name__ == "__main__":
    main()
