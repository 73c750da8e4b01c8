"""Metrics benchmark: events/s consumed and aggregated by `motcua run metrics` against a raw
aiokafka consume+decode of the same events in the same run (ratio printed); summary query
p50/p99 with 1,000,000 dossiers in the store, with and without the operator's token check
(CONTRACT section 8); RSS and bytes of state.

    .venv/bin/python bench/metrics.py                       # 15,000 dossiers (~100k events)
    .venv/bin/python bench/metrics.py --dossiers 30000 --query-dossiers 1000000

Throughput: starts its own Tansu broker, pre-loads the four topics, times a raw consumer (decode
with `decode_event`, as the service does), then starts the worker as a process and times it from
its first counted event to the last (`motcua_events_consumed_total` on /metrics).
Query: the store in this process, filled with the contributions of 1,000,000 dossiers (distinct
lifecycles replicated over days and agencies), queried by summary with and without filters. Each
query is timed three ways, back to back: the store's summary alone; the summary behind
`OperatorAuth.check` (a viewer's RS256 token from a dev issuer this benchmark starts, verified
against its JWKS as the service does: header, signature, claims, role; the verifier built as the
service builds it, remembering a verified token), which is what the route does; the same with a
token scoped to 20 agencies; and with a verifier that verifies the signature on every call. Each
way runs first in turn and folds in the same new deltas every 25 queries (a live store); then
each check alone, as many times. The garbage collector is set as in the service (`run_service`).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import resource
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from starlette.requests import Request

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.auth import OperatorAuth, TokenVerifier
from services.common.events import CloudEvent, decode_event
from services.common.kafka import ensure_topics
from services.common.operators import Operator, Role
from services.common.service import GC_THRESHOLDS
from services.common.topics import declared_topics
from services.dev.embedded import Broker, free_port
from services.metrics.codec import encode_state
from services.metrics.domain import Cell, apply_all, contributions, event_from_envelope, new_state
from services.metrics.settings import MetricsSettings
from services.metrics.store import ColumnarStore
from tests.support.metrics_stream import stream
from tests.support.operators import running_issuer
from tests.support.processes import process, wait_http

TOPICS = ["dossier.events", "payment.events", "postal.events", "sms.events"]


async def preload(bootstrap: str, events: list[CloudEvent[Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=20)
    await producer.start()
    try:
        futures = [await producer.send(e.topic, value=e.to_json(), key=e.key) for e in events]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


async def raw_consume(bootstrap: str, total: int) -> float:
    consumer = AIOKafkaConsumer(
        *TOPICS, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
        enable_auto_commit=False, group_id=None,
    )  # fmt: skip
    await consumer.start()
    seen, started = 0, time.perf_counter()
    try:
        while seen < total:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for records in batch.values():
                for record in records:
                    decode_event(record.value or b"")
                    seen += 1
    finally:
        await consumer.stop()
    return total / (time.perf_counter() - started)


def consumed(port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("motcua_events_consumed_total{") and 'service="metrics"' in line:
            total += float(line.rsplit(" ", 1)[1])
    return total


def peak_rss_mib(pid: int) -> float:
    """The peak resident memory (VmHWM) of process `pid` so far, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def throughput(dossiers: int) -> dict[str, float]:
    events = [e for lifecycle in stream(dossiers, seed=7, agency_count=300) for e in lifecycle]
    total = len(events)
    broker = Broker(port=free_port()).start()
    try:
        asyncio.run(ensure_topics(broker.bootstrap, declared_topics(8)))
        asyncio.run(preload(broker.bootstrap, events))
        raw = asyncio.run(raw_consume(broker.bootstrap, total))
        port = free_port()
        env = {
            "KAFKA_BOOTSTRAP": broker.bootstrap,
            "METRICS_PORT": str(port),
            "METRICS_OVERDUE_CLOCK": "watermark",
            "MOTCUA_LOG_LEVEL": "WARNING",
            "MOTCUA_DATA_DIR": tempfile.mkdtemp(prefix="motcua-bench-metrics-"),
        }
        with (
            running_issuer() as issuer,  # the summary needs a viewer's token (CONTRACT 8)
            process(
                ["services.cli", "run", "metrics"],
                {**env, "MOTCUA_OIDC_ISSUER": issuer.url},
                "bench-metrics",
            ) as worker,
        ):
            wait_http(f"http://127.0.0.1:{port}/healthz", timeout=60)
            first = None
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                try:
                    count = consumed(port)
                except httpx.HTTPError:
                    count = 0
                now = time.perf_counter()
                if count and first is None:
                    first = (now, count)
                if count >= total:
                    break
                time.sleep(0.05)
            assert first is not None
            elapsed = time.perf_counter() - first[0]
            service = (total - first[1]) / elapsed
            received = httpx.get(
                f"http://127.0.0.1:{port}/v1/metrics/summary", headers=issuer.headers("viewer")
            ).json()
            peak_mib = peak_rss_mib(worker.pid)
    finally:
        broker.stop()
    return {
        "events": total,
        "raw": raw,
        "service": service,
        "received": received["dossiers"]["received"],
        "worker_peak_mib": peak_mib,
    }


def fill(dossiers: int, distinct: int = 20_000) -> tuple[ColumnarStore, float, int]:
    """A store with the contributions of `dossiers` dossiers, from `distinct` real lifecycles
    shifted over ~half a year and over 300 agencies."""
    lifecycles = [
        [event_from_envelope(e.to_dict()) for e in lifecycle]
        for lifecycle in stream(distinct, seed=8, agency_count=300, span_days=10)
    ]
    store, rng = ColumnarStore(), random.Random(8)
    templates, state_bytes = [], 0
    for events in lifecycles:
        state, _ = apply_all(new_state(events[0].subject), events)
        templates.append(contributions(state))
        state_bytes += len(encode_state(state))
    started = time.perf_counter()
    for i in range(dossiers):
        shift = rng.randrange(0, 180) * 1440  # the lifecycle moved by whole days
        template = templates[i % distinct]
        store.apply(
            {
                (Cell(c.minute + shift, c.agency_code, c.tier, c.sector), name): value
                for (c, name), value in template.items()
            }
        )
    store.flush()
    return store, time.perf_counter() - started, state_bytes // distinct


def request_with(token: str) -> Request:
    """An HTTP request as the route gets it, carrying `Authorization: Bearer <token>`."""
    header = (b"authorization", f"Bearer {token}".encode())
    return Request({"type": "http", "method": "GET", "path": "/v1/metrics/summary",
                    "headers": [header], "query_string": b""})  # fmt: skip


def percentiles(timings: list[float]) -> dict[str, float]:
    timings = sorted(timings)
    return {
        "p50": statistics.median(timings),
        "p99": timings[int(len(timings) * 0.99) - 1],
        "max": timings[-1],
    }


async def timed_queries(
    store: ColumnarStore, checks: dict[str, tuple[OperatorAuth, str]], count: int
) -> dict[str, dict[str, float]]:
    """`count` summaries, each timed without a check and behind each (check, token)."""
    rng = random.Random(9)
    base = datetime(2019, 3, 1, tzinfo=UTC)
    timings: dict[str, list[float]] = {"no check": [], **{name: [] for name in checks}}
    requests = {name: request_with(token) for name, (_, token) in checks.items()}
    for i in range(count):
        start = base + timedelta(minutes=rng.randrange(0, 180 * 1440))
        end = start + timedelta(minutes=rng.randrange(1, 120 * 1440))
        filters: dict[str, str] = [
            {},
            {"tier": "district"},
            {"sector": "land"},
            {"agency_code": "000.01.07.H34"},
        ][i % 4]
        ways = ["no check", *checks]
        order = ways[i % len(ways) :] + ways[: i % len(ways)]  # each way first in turn
        for name in order:
            if i % 25 == 1:  # a live store: new deltas, folded in by the next summary of each way
                store.apply({(Cell(int(end.timestamp() // 60), "000.00.01.H34", "district",
                                   "land"), "received"): 1})  # fmt: skip
            began = time.perf_counter()
            scope = None
            if name != "no check":
                operator = await checks[name][0].check(requests[name], Role.VIEWER)
                assert isinstance(operator, Operator), operator
                scope = operator.scope
            store.summary(start, end, **filters, agencies=scope)
            timings[name].append((time.perf_counter() - began) * 1000)
    alone: dict[str, list[float]] = {name: [] for name in checks}
    for _ in range(count):
        for name, (auth, _) in checks.items():
            began = time.perf_counter()
            await auth.check(requests[name], Role.VIEWER)
            alone[name].append((time.perf_counter() - began) * 1000)
    return {
        **{name: percentiles(values) for name, values in timings.items()},
        **{f"{name}, check alone": percentiles(values) for name, values in alone.items()},
    }


def queries(store: ColumnarStore, count: int) -> dict[str, Any]:
    agencies = [f"000.{i // 100:02d}.{i % 100:02d}.H34" for i in range(0, 300, 15)]  # 20 of 300
    with running_issuer() as issuer:
        # as the service builds it (remembering verified tokens), and one verifying every time
        service = TokenVerifier(
            issuer.url, "motcua", remember_seconds=MetricsSettings().remember_token_seconds
        )
        every_time = TokenVerifier(issuer.url, "motcua")
        viewer, scoped = issuer.token("viewer"), issuer.token("viewer", agencies=agencies)
        for verifier in (service, every_time):
            verifier.verify(viewer)  # discovery and JWKS fetched once, as live
        checks = {
            "viewer token": (OperatorAuth(service), viewer),
            "scoped token": (OperatorAuth(service), scoped),
            "viewer token verified every time": (OperatorAuth(every_time), viewer),
        }
        gc.set_threshold(*GC_THRESHOLDS)  # the service process's collector, as `run_service`
        gc.freeze()
        timed = asyncio.run(timed_queries(store, checks, count))
    base = datetime(2019, 3, 1, tzinfo=UTC)
    began = time.perf_counter()
    store.breakdown("agency_code", base, base + timedelta(days=200))
    breakdown_ms = (time.perf_counter() - began) * 1000
    return {**timed, "breakdown_ms": breakdown_ms}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dossiers", type=int, default=15_000)
    parser.add_argument("--query-dossiers", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--skip-throughput", action="store_true")
    args = parser.parse_args()
    if not args.skip_throughput:
        t = throughput(args.dossiers)
        print(f"events {t['events']:,} ({t['received']:,} received dossiers counted)")
        print(f"raw aiokafka consume+decode: {t['raw']:,.0f} events/s")
        print(f"metrics consumed+aggregated: {t['service']:,.0f} events/s")
        print(f"ratio service/raw: {t['service'] / t['raw']:.2f}")
        print(f"metrics worker peak RSS (VmHWM): {t['worker_peak_mib']:,.0f} MiB")
    store, seconds, per_state = fill(args.query_dossiers)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"store filled with {args.query_dossiers:,} dossiers in {seconds:.1f} s")
    print(
        f"store arrays {store.nbytes / 2**20:,.0f} MiB; max RSS of this process {rss_mb:,.0f} MiB"
    )
    print(f"state record in the changelog: {per_state} bytes per dossier on average")
    q = queries(store, args.queries)
    ways = ("viewer token", "scoped token", "viewer token verified every time")
    for name in ("no check", *ways):
        t = q[name]
        print(
            f"summary, {name}: p50 {t['p50']:.2f} ms, p99 {t['p99']:.2f} ms, max {t['max']:.1f} ms"
        )
    for name in ways:
        added = q[name]["p99"] / q["no check"]["p99"] - 1
        check = q[f"{name}, check alone"]
        share = check["p99"] / q["no check"]["p99"]
        print(
            f"{name}: the check adds {added * 100:+.1f} % to the summary p99; alone it takes"
            f" p50 {check['p50']:.3f} ms, p99 {check['p99']:.3f} ms"
            f" ({share * 100:.1f} % of the summary p99)"
        )
    print(f"breakdown by agency (300 groups, 200 days): {q['breakdown_ms']:.1f} ms")


if __name__ == "__main__":
    main()
