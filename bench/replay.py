"""The seed half-year end to end: `motcua replay` at scale F (default 1.0) against a stack this
script starts (Tansu, Redis, the dev OIDC issuer, vnpost-sandbox, postal, intake, metrics as
separate processes). The metrics are read with a viewer's token the dev issuer signs.

    .venv/bin/python bench/replay.py                 # F = 1.0, about 1.2 million events
    .venv/bin/python bench/replay.py --scale 0.1     # a quicker look
    .venv/bin/python bench/replay.py --tracing 0.01  # traced: 1 % of new traces sampled

Reports the wall time from the first event sent until the metrics answered every figure, events
per second end to end, and per service process the CPU seconds spent during the replay, the CPU
microseconds per input event (event sent to intake) and the peak RSS (from /proc: psutil is not
installed). Goal: 3,000 events/s end to end on 2 cores.

Figures differ by 2x or more between machines, so the same run ends with a baseline on the same
broker, once the services are stopped: the same events (the bytes the replay posts, keyed by
dossier) produced with a bare aiokafka producer to a fresh topic and consumed back (each decoded
as JSON), and the ratio of the end-to-end rate to the baseline's rate. Only that ratio and the
CPU per event compare across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import orjson
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.kafka import ensure_topics
from services.common.settings import hash_key
from services.common.topics import TopicSpec, declared_topics
from services.dev.embedded import Broker, EmbeddedRedis, free_port
from services.simulator.lifecycle import replay_events
from services.simulator.plan import plan
from services.simulator.shell import replay, table
from tests.support.operators import running_issuer
from tests.support.processes import process, wait_http
from tests.support.redis_keys import forget_run

KEY = "bench-replay-key"
SOURCE = "portal/bench-replay"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Usage:
    cpu_seconds: float
    peak_rss_mib: float
    rss_mib: float = 0.0


def group_pids(pgid: int) -> list[int]:
    """Every live process of a process group (a service and anything it forked)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # field 5 of stat, after pid and (comm)
            pids.append(int(entry.name))
    return pids


def usage(pid: int) -> Usage:
    """CPU (user + system), peak RSS (VmHWM) and RSS (VmRSS) of a process and its group."""
    cpu, peak, rss = 0.0, 0.0, 0.0
    for member in group_pids(os.getpgid(pid)) or [pid]:
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
            status = Path(f"/proc/{member}/status").read_text()
        except OSError:
            continue
        cpu += (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                peak += int(line.split()[1]) / 1024
            elif line.startswith("VmRSS:"):
                rss += int(line.split()[1]) / 1024
    return Usage(cpu, peak, rss)


@dataclass
class Baseline:
    """Raw aiokafka produce and consume of the replay's events on the same broker."""

    events: int
    produce_seconds: float  # sending, until every record is acknowledged (acks=all)
    consume_seconds: float  # reading them all back from the start of the topic
    cpu_seconds: float  # this process (producer and consumer), generating the events excluded
    broker_cpu_seconds: float

    @property
    def rate(self) -> float:
        return self.events / (self.produce_seconds + self.consume_seconds)


def replay_records(scale: float, seed: int, source: str) -> Iterator[tuple[bytes, bytes]]:
    """(key, value) of every event the replay sends: the dossier id and the event's JSON."""
    for dossier in replay_events(plan(scale, seed), seed, source):
        for event in dossier:
            yield event["subject"].encode(), orjson.dumps(event)


async def raw_baseline(
    bootstrap: str, records: Iterable[tuple[bytes, bytes]], partitions: int, broker_pid: int
) -> Baseline:
    """Produce `records` to a fresh topic (acks=all, as the services' publisher) and consume
    them back, timing both; the records are built outside the timed parts, a chunk at a time."""
    topic = f"bench.baseline.{uuid.uuid4().hex[:8]}"
    await ensure_topics(bootstrap, [TopicSpec(topic, partitions)])
    cpu_before, broker_before = _own_cpu(), usage(broker_pid).cpu_seconds
    producing, generating_cpu, events = 0.0, 0.0, 0
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap, acks="all", linger_ms=2, max_batch_size=1024 * 1024
    )
    await producer.start()
    try:
        pending = iter(records)
        while True:
            building = _own_cpu()
            chunk = list(itertools.islice(pending, 50_000))
            generating_cpu += _own_cpu() - building
            if not chunk:
                break
            sending = time.perf_counter()
            futures = [await producer.send(topic, value, key=key) for key, value in chunk]
            await asyncio.gather(*futures)
            producing += time.perf_counter() - sending
            events += len(chunk)
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=50,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    await consumer.start()
    try:
        seen, started = 0, time.perf_counter()
        while seen < events:
            batch = await consumer.getmany(timeout_ms=500, max_records=5000)
            for part in batch.values():
                for record in part:
                    orjson.loads(record.value or b"")
                    seen += 1
        consuming = time.perf_counter() - started
    finally:
        await consumer.stop()
    return Baseline(
        events=events,
        produce_seconds=producing,
        consume_seconds=consuming,
        cpu_seconds=max(_own_cpu() - cpu_before - generating_cpu, 0.0),
        broker_cpu_seconds=usage(broker_pid).cpu_seconds - broker_before,
    )


def _own_cpu() -> float:
    own = os.times()
    return own.user + own.system


def stack_env(
    broker: Broker, redis_url: str, ports: Mapping[str, int], name: str
) -> dict[str, str]:
    """The environment every process of a bench stack shares: Kafka, Redis, a fresh namespace
    and data directory, the bench portal, and the ports of `ports` (intake, metrics, postal,
    sandbox)."""
    run = uuid.uuid4().hex[:8]
    portals = [
        {"source": SOURCE, "key_sha256": hash_key(KEY), "rate_per_second": 1e9, "burst": 10**9}
    ]
    return {
        "KAFKA_BOOTSTRAP": broker.bootstrap,
        "REDIS_URL": redis_url,
        "MOTCUA_REDIS_NAMESPACE": f"motcua-{name}-{run}",
        "MOTCUA_DATA_DIR": tempfile.mkdtemp(prefix=f"motcua-{name}-"),
        "MOTCUA_PORTALS": orjson.dumps(portals).decode(),
        "MOTCUA_LOG_LEVEL": "WARNING",
        # The replayed half-year closed years ago by its events' time: the retention of personal
        # data (a first run a minute after intake starts) would destroy the data keys of
        # dossiers whose return postal has yet to book.
        "MOTCUA_PII_RETENTION_DAYS": "36500",
        "INTAKE_PORT": str(ports["intake"]),
        "METRICS_PORT": str(ports["metrics"]),
        "METRICS_OVERDUE_CLOCK": "watermark",
        "POSTAL_PORT": str(ports["postal"]),
        "VNPOST_SANDBOX_PORT": str(ports["sandbox"]),
        "VNPOST_URL": f"http://127.0.0.1:{ports['sandbox']}",
        # The carrier walks its orders on its own clock (hours, days); within the replay's
        # minutes only the bookings, which the figures count, are on the clock.
        "VNPOST_SANDBOX_STEP_SECONDS": "3600",
        "POSTAL_PUBLIC_URL": f"http://127.0.0.1:{ports['postal']}",
    }


def print_processes(
    console: Console,
    before: Mapping[str, Usage],
    after: Mapping[str, Usage],
    events: int,
) -> None:
    """Per process: CPU seconds between `before` and `after`, CPU microseconds per input
    event, peak RSS."""
    console.print(f"{'process':<22}{'CPU s':>10}{'CPU µs/event':>14}{'peak RSS MiB':>14}")
    for name in after:
        cpu = after[name].cpu_seconds - before[name].cpu_seconds
        per_event = cpu * 1e6 / events if events else 0.0
        console.print(f"{name:<22}{cpu:>10.1f}{per_event:>14.0f}{after[name].peak_rss_mib:>14.0f}")


def print_baseline(
    console: Console, base: Baseline, rate: float, label: str = "end to end / baseline"
) -> None:
    console.print(
        f"baseline (raw aiokafka, same broker, fresh topic): {base.events:,} events produced in "
        f"{base.produce_seconds:,.1f} s and consumed in {base.consume_seconds:,.1f} s, "
        f"{base.rate:,.0f} events/s; CPU per event: this process "
        f"{base.cpu_seconds * 1e6 / base.events:,.0f} µs, broker "
        f"{base.broker_cpu_seconds * 1e6 / base.events:,.0f} µs"
    )
    console.print(f"{label}: {rate / base.rate:.3f}")


async def main(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
    broker = Broker(port=free_port()).start()
    redis_server = EmbeddedRedis.ensure(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    ports = {name: free_port() for name in ("intake", "metrics", "postal", "sandbox")}
    env = stack_env(broker, redis_server.url, ports, "bench-replay")
    services = [("vnpost-sandbox", "sandbox"), ("postal", "postal"), ("intake", "intake"),
                ("metrics", "metrics")]  # fmt: skip
    try:
        await ensure_topics(broker.bootstrap, declared_topics(int(args.partitions)))
        env["MOTCUA_TOPIC_PARTITIONS"] = str(args.partitions)
        if args.tracing != "off":  # new traces sampled at the ratio, spans as JSON lines
            env["MOTCUA_TRACES_DIR"] = tempfile.mkdtemp(prefix="motcua-bench-traces-")
            env["OTEL_TRACES_SAMPLER"] = "parentbased_traceidratio"
            env["OTEL_TRACES_SAMPLER_ARG"] = str(float(args.tracing))
            console.print(f"tracing at {args.tracing}: spans in {env['MOTCUA_TRACES_DIR']}")
        procs = {}
        with (
            running_issuer() as issuer,
            process(["services.cli", "run", "vnpost-sandbox"], env, "bench-replay-sandbox") as p1,
            process(["services.cli", "run", "postal"], env, "bench-replay-postal") as p2,
            process(["services.cli", "run", "intake"], env, "bench-replay-intake") as p3,
            process(
                ["services.cli", "run", "metrics"],
                {**env, "MOTCUA_OIDC_ISSUER": issuer.url},
                "bench-replay-metrics",
            ) as p4,
        ):
            procs = {"vnpost-sandbox": p1.pid, "postal": p2.pid, "intake": p3.pid,
                     "metrics": p4.pid}  # fmt: skip
            for name, key in services:
                path = "healthz" if name == "vnpost-sandbox" else "readyz"
                wait_http(f"http://127.0.0.1:{ports[key]}/{path}", timeout=120)
            assert broker.process is not None
            procs["broker (tansu)"] = broker.process.pid
            before = {name: usage(pid) for name, pid in procs.items()}
            result = await replay(
                args.scale,
                args.seed,
                intake_url=f"http://127.0.0.1:{ports['intake']}",
                key=KEY,
                metrics_url=f"http://127.0.0.1:{ports['metrics']}",
                issuer_url=issuer.url,
                source=SOURCE,
                concurrency=args.concurrency,
                wait_seconds=args.wait,
                console=console,
            )
            after = {name: usage(pid) for name, pid in procs.items()}
        own_cpu, own_peak = _own_cpu(), _own_peak()
        console.print("baseline: the same events through a bare aiokafka producer and consumer…")
        base = await raw_baseline(
            broker.bootstrap,
            replay_records(args.scale, args.seed, SOURCE),
            int(args.partitions),
            procs["broker (tansu)"],
        )
    finally:
        broker.stop()
        forget_run(env)  # the keys this run left in a shared Redis
        redis_server.stop()
    console.print(table(result))
    rate = result.sent.events / result.catch_up_seconds
    sending = result.sent.events / result.sending_seconds
    console.print(
        f"scale {args.scale}: {result.dossiers:,} dossiers, {result.sent.events:,} events; "
        f"sent in {result.sending_seconds:,.1f} s ({sending:,.0f} events/s); "
        f"first event to metrics caught up: {result.catch_up_seconds:,.1f} s "
        f"({'caught up' if result.caught_up else 'NOT caught up'}), {rate:,.0f} events/s end to end"
    )
    print_processes(console, before, after, result.sent.events)
    per_event = own_cpu * 1e6 / result.sent.events
    console.print(f"{'replay (this)':<22}{own_cpu:>10.1f}{per_event:>14.0f}{own_peak:>14.0f}")
    print_baseline(console, base, rate)
    console.print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")
    return 0 if result.ok else 1


def _own_peak() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=2019)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--wait", type=float, default=3600.0)
    parser.add_argument(
        "--tracing", default="off", help="`off` (default) or the ratio of new traces sampled"
    )
    raise SystemExit(asyncio.run(main(parser.parse_args())))
