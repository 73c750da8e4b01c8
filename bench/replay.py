"""The seed half-year end to end: `motcua replay` at scale F (default 1.0) against a stack this
script starts (Tansu, Redis, the dev OIDC issuer, vnpost-sandbox, postal, intake, metrics as
separate processes). The metrics are read with a viewer's token the dev issuer signs.

    .venv/bin/python bench/replay.py                 # F = 1.0, about 1.2 million events
    .venv/bin/python bench/replay.py --scale 0.1     # a quicker look

Reports the wall time from the first event sent until the metrics answered every figure, events
per second end to end, and per service process the CPU seconds spent during the replay and the
peak RSS (from /proc: psutil is not installed). Goal: 3,000 events/s end to end on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import orjson
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common.kafka import ensure_topics
from services.common.settings import hash_key
from services.common.topics import declared_topics
from services.dev.embedded import Broker, EmbeddedRedis, free_port
from services.simulator.shell import replay, table
from tests.support.operators import running_issuer
from tests.support.processes import process, wait_http

KEY = "bench-replay-key"
SOURCE = "portal/bench-replay"
TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Usage:
    cpu_seconds: float
    peak_rss_mib: float


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
    """CPU (user + system) and peak RSS (VmHWM) of a process and its group."""
    cpu, peak = 0.0, 0.0
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
    return Usage(cpu, peak)


async def main(args: argparse.Namespace) -> int:
    console = Console()
    broker = Broker(port=free_port()).start()
    redis_server = EmbeddedRedis.ensure(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    run = uuid.uuid4().hex[:8]
    ports = {name: free_port() for name in ("intake", "metrics", "postal", "sandbox")}
    portals = [
        {"source": SOURCE, "key_sha256": hash_key(KEY), "rate_per_second": 1e9, "burst": 10**9}
    ]
    env = {
        "KAFKA_BOOTSTRAP": broker.bootstrap,
        "REDIS_URL": redis_server.url,
        "MOTCUA_REDIS_NAMESPACE": f"motcua-bench-replay-{run}",
        "MOTCUA_DATA_DIR": tempfile.mkdtemp(prefix="motcua-bench-replay-"),
        "MOTCUA_PORTALS": orjson.dumps(portals).decode(),
        "MOTCUA_LOG_LEVEL": "WARNING",
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
    services = [("vnpost-sandbox", "sandbox"), ("postal", "postal"), ("intake", "intake"),
                ("metrics", "metrics")]  # fmt: skip
    try:
        await ensure_topics(broker.bootstrap, declared_topics(int(args.partitions)))
        env["MOTCUA_TOPIC_PARTITIONS"] = str(args.partitions)
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
    finally:
        broker.stop()
        redis_server.stop()
    console.print(table(result))
    own = os.times()
    rate = result.sent.events / result.catch_up_seconds
    sending = result.sent.events / result.sending_seconds
    console.print(
        f"scale {args.scale}: {result.dossiers:,} dossiers, {result.sent.events:,} events; "
        f"sent in {result.sending_seconds:,.1f} s ({sending:,.0f} events/s); "
        f"first event to metrics caught up: {result.catch_up_seconds:,.1f} s "
        f"({'caught up' if result.caught_up else 'NOT caught up'}), {rate:,.0f} events/s end to end"
    )
    console.print(f"{'process':<18}{'CPU s':>10}{'peak RSS MiB':>14}")
    for name in procs:
        cpu = after[name].cpu_seconds - before[name].cpu_seconds
        console.print(f"{name:<18}{cpu:>10.1f}{after[name].peak_rss_mib:>14.0f}")
    console.print(f"{'replay (this)':<18}{own.user + own.system:>10.1f}{_own_peak():>14.0f}")
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
    raise SystemExit(asyncio.run(main(parser.parse_args())))
