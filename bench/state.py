"""State that stays small: two seed half-years through the whole stack, one after the other (the
second shifted by 52 weeks, so the same dossiers come again as new ones a year later), with every
worker that keeps per-dossier state running (metrics, postal, SMS, payments) beside intake, the
partner sandboxes (carrier, bank, two SMS gateways) and the dev OIDC issuer, on the embedded
broker (Tansu) and Redis.

    .venv/bin/python bench/state.py                  # F = 1.0: 2 x 1.2 million events
    .venv/bin/python bench/state.py --scale 0.02     # a quick look

The embedded broker keeps every topic in memory: at F = 1.0 it grows to about 17 GB by the end of
the second half-year, so run nothing else beside it on a 24 GiB machine (a test suite beside it
once made the kernel stop the broker before the restarts).

Every grace before retirement is set to `--grace` seconds (default 30), and the timers that keep
a dossier waiting on the wall clock (order expiry, SMS waits, the carrier's steps, every
`--carrier-step` seconds, default 1) are shortened too, so a dossier whose story is over leaves
each worker within the run, while the grace still outlasts a carrier's walk through an order
(at most about 11 s), as the real graces outlast the late reports they wait for. Settings a
service does not know are ignored. The retention of personal data runs in the replayed time
(`MOTCUA_PII_RETENTION_CLOCK=events`): the data keys of the first half-year, which intake,
postal and SMS each hold, are destroyed once the second is read.

Postal takes a `dossier.submitted` recorded longer than `POSTAL_HISTORY_AFTER_SECONDS` ago (by
default its grace), of a dossier it holds nothing of, for history read again (its dossier may have
been served and retired) and books nothing for it; on two shared cores postal trails intake by
minutes at F = 1.0, so the bench sets that window to a day while the grace stays short. The
sandboxes forget a finished order or message `--grace` seconds after its last change.

After each half-year (once the metrics answered every figure) the bench waits until
`motcua_states_live` of postal, SMS and payments stood still for the grace + 10 s (metrics'
moves while late partner reports come), then reads per worker its peak RSS (VmHWM), RSS and
`motcua_states_live`. The first half-year is the baseline of the
second: the goal is a peak RSS after the second within 10 % of the peak after the first, and at
most 300 MiB per worker. Then each worker in turn is SIGKILLed and started again on the same data
directory, and the time until its `/readyz` answers 200 is its restore time with that history
(goal: at most 10 s); the same after a SIGTERM, where the worker leaves its consumer groups instead
of waiting out their session, is its baseline. The metrics' figures of both half-years are read
again after the restarts (exact across the folds into rollups and across the restore). The run ends
with the raw aiokafka baseline of `bench/replay.py` (the same events, produced and consumed back on
the same broker) and the ratio of each half-year's end-to-end rate to it.

Postal counts are read from the period's start until tomorrow and the carrier books on the wall
clock, so the second half-year's postal figures (and the first's, read again) are twice the
target: both half-years' bookings fall on the same days.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
from rich.console import Console

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.replay import (
    KEY,
    SOURCE,
    Usage,
    print_baseline,
    print_processes,
    raw_baseline,
    replay_records,
    stack_env,
    usage,
)
from services.common.kafka import ensure_topics
from services.common.topics import declared_topics
from services.dev.embedded import Broker, EmbeddedRedis, free_port
from services.simulator.plan import Targets, targets
from services.simulator.report import caught_up
from services.simulator.shell import OperatorToken, ReplayResult, read_back, replay, table
from tests.support.operators import running_issuer
from tests.support.processes import process, wait_http
from tests.support.redis_keys import forget_run

YEAR = timedelta(weeks=52)  # a whole number of weeks: the same weekdays
WORKERS = ("metrics", "postal", "sms", "payments")
GOAL_GROWTH = 1.10  # peak RSS after the second half-year / after the first
GOAL_PEAK_MIB = 300.0
GOAL_RESTORE_SECONDS = 10.0


@dataclass(frozen=True)
class Runnable:
    name: str  # `motcua run <name>`
    port: str  # the key of its port in `ports`
    path: str  # what answers 200 once it is up

    @property
    def worker(self) -> bool:
        return self.name in WORKERS


RUNNABLES = [
    Runnable("vnpost-sandbox", "sandbox", "healthz"),
    Runnable("vnpay-sandbox", "vnpay", "healthz"),
    Runnable("sms-primary-sandbox", "sms_primary", "healthz"),
    Runnable("sms-secondary-sandbox", "sms_secondary", "healthz"),
    Runnable("intake", "intake", "readyz"),
    Runnable("metrics", "metrics", "readyz"),
    Runnable("postal", "postal", "readyz"),
    Runnable("sms", "sms", "readyz"),
    Runnable("payments", "payments", "readyz"),
]
BY_NAME = {r.name: r for r in RUNNABLES}


def state_env(
    base: Mapping[str, str],
    ports: Mapping[str, int],
    grace: float,
    step: float,
) -> dict[str, str]:
    """`stack_env` with SMS, payments and their sandboxes, every retirement grace `grace`, and
    the wall-clock waits of a dossier shortened to fit in the run."""
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    g = f"{grace:g}"
    return {
        **base,
        "PAYMENTS_PORT": str(ports["payments"]),
        "PAYMENTS_PUBLIC_URL": url["payments"],
        "PAYMENTS_RETURN_URL": f"{url['payments']}/v1/payments/return",
        "VNPAY_SANDBOX_PORT": str(ports["vnpay"]),
        "VNPAY_URL": url["vnpay"],
        "SMS_PORT": str(ports["sms"]),
        "SMS_PUBLIC_URL": url["sms"],
        "SMS_PRIMARY_SANDBOX_PORT": str(ports["sms_primary"]),
        "SMS_SECONDARY_SANDBOX_PORT": str(ports["sms_secondary"]),
        "SMS_PRIMARY_URL": url["sms_primary"],
        "SMS_SECONDARY_URL": url["sms_secondary"],
        # The carrier walks every order to its end within seconds, well within the grace: a
        # leg closes, so postal can retire the dossier (bench/replay.py keeps it still).
        "VNPOST_SANDBOX_STEP_SECONDS": f"{step:g}",
        # A callback waits for the webhook's acks=all publish: with 16 at once the carrier's
        # walk, not postal's CPU, set the pace of the retirements at F = 1.0 (about 265/s).
        "VNPOST_SANDBOX_CALLBACK_CONNECTIONS": "64",
        # The same for the SMS gateways' delivery reports: with 8 at once they fell hours
        # behind the messages at F = 1.0 (about 13 a second answered).
        "SMS_SANDBOX_REPORT_CONNECTIONS": "64",
        # no quiet hours: a message held until 7:00 would keep its record
        "SMS_QUIET_START": "00:00",
        "SMS_QUIET_END": "00:00",
        "SMS_CONTACT_WAIT_SECONDS": g,
        "SMS_OVERDUE_GRACE_SECONDS": g,
        # nobody pays in the replay: orders expire after `grace`, then the late query
        "PAYMENTS_ORDER_TTL_SECONDS": g,
        "PAYMENTS_QUERY_OFFSETS_SECONDS": "0",
        "PAYMENTS_EXPIRE_OFFSET_SECONDS": "1",
        "PAYMENTS_LATE_QUERY_OFFSETS_SECONDS": "1",
        "PAYMENTS_SWEEP_INTERVAL_SECONDS": "2",
        "PAYMENTS_RECONCILE_ENABLED": "false",
        # retirement
        "METRICS_RETIRE_AFTER_SECONDS": g,
        "METRICS_RETIRE_IDLE_AFTER_SECONDS": g,
        "METRICS_RETIRE_INTERVAL_SECONDS": "1",
        "POSTAL_RETIRE_AFTER_SECONDS": g,
        "POSTAL_HISTORY_AFTER_SECONDS": "86400",  # postal may trail intake by minutes
        # the sandboxes forget what is finished (the default keeps a day)
        "SANDBOX_RETAIN_SECONDS": g,
        "SANDBOX_RETAIN_MIN_SECONDS": g,
        "POSTAL_SCAN_INTERVAL_SECONDS": "2",
        "SMS_RETIRE_AFTER_SECONDS": g,
        "SMS_RETIRE_IDLE_SECONDS": g,
        "SMS_RETIRE_REPORT_WAIT_SECONDS": g,
        "PAYMENTS_RETIRE_AFTER_SECONDS": g,
        # The data keys follow the retention in the replayed history's time: closing moments
        # against the latest one read, every 20 s. The replay sends a half-year's dossiers in
        # no order of time, so that latest is near the half-year's end within its first
        # batches: the retention outlasts a half-year's closings (about 200 days from first to
        # last), so no key goes while its dossier is served, and stays under the 52 weeks
        # between the half-years, so every key of the first goes once the second is read.
        "MOTCUA_PII_RETENTION_CLOCK": "events",
        "MOTCUA_PII_RETENTION_DAYS": "280",
        "MOTCUA_PII_RETENTION_INTERVAL_SECONDS": "20",
    }


class Stack:
    """The stack's processes, each started (and started again) in its own process group."""

    def __init__(
        self, env: Mapping[str, str], ports: Mapping[str, int], exits: contextlib.ExitStack
    ) -> None:
        self.env, self.ports, self.exits = env, ports, exits
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def url(self, runnable: Runnable) -> str:
        return f"http://127.0.0.1:{self.ports[runnable.port]}"

    def start(self, runnable: Runnable) -> None:
        args = ["services.cli", "run", runnable.name]
        log = f"bench-state-{runnable.name}"
        self.procs[runnable.name] = self.exits.enter_context(process(args, self.env, log))

    def wait_up(self, runnable: Runnable, timeout: float = 120.0) -> None:
        proc = self.procs[runnable.name]
        wait_http(f"{self.url(runnable)}/{runnable.path}", timeout=timeout, proc=proc)

    def restart_seconds(self, runnable: Runnable, how: signal.Signals, timeout: float) -> float:
        """Stop the process (its whole group) with `how`, start it again once it exited, and
        time from the start until it is up."""
        old = self.procs[runnable.name]
        os.killpg(old.pid, how)
        old.wait(timeout)
        started = time.monotonic()
        self.start(runnable)
        self.wait_up(runnable, timeout)
        return time.monotonic() - started

    def states_live(self, runnable: Runnable) -> float | None:
        """`motcua_states_live` of the process (None while it does not answer)."""
        try:
            text = httpx.get(f"{self.url(runnable)}/metrics", timeout=10).text
        except httpx.HTTPError:
            return None
        found = [line for line in text.splitlines() if line.startswith("motcua_states_live{")]
        return sum(float(line.rsplit(" ", 1)[1]) for line in found) if found else None

    def usage(self) -> dict[str, Usage]:
        return {name: usage(proc.pid) for name, proc in self.procs.items()}


@dataclass
class Restart:
    """A worker started again with the whole history behind it."""

    killed_seconds: float  # after SIGKILL: until /readyz answers 200
    stopped_seconds: float  # after SIGTERM (it left its consumer groups): the same
    after: After


@dataclass
class After:
    """What a worker holds once a half-year went through and the retirements settled."""

    usage: Usage
    states: float | None


# Whose live states the wait watches: metrics takes a late partner report of a retired dossier
# as a new state that retires again after its grace, so its count moves as long as SMS and
# carrier reports trickle in, and never stands still for long at F >= 0.2.
SETTLED_BY = frozenset({"postal", "sms", "payments"})


def settle(stack: Stack, grace: float, timeout: float) -> dict[str, float | None]:
    """Wait until the `motcua_states_live` of postal, SMS and payments did not change for
    `grace` + 10 s (a dossier retires `grace` after its last input; a carrier leg may still be
    walking), at most `timeout`; answer every worker's count."""
    workers = [r for r in RUNNABLES if r.worker]
    quiet = grace + 10.0
    last: dict[str, float | None] = {}
    since = deadline = time.monotonic()
    deadline += timeout
    while time.monotonic() < deadline:
        now = {r.name: stack.states_live(r) for r in workers}
        if {n: v for n, v in now.items() if n in SETTLED_BY} != {
            n: v for n, v in last.items() if n in SETTLED_BY
        }:
            since = time.monotonic()
        last = now
        if time.monotonic() - since >= quiet:
            break
        time.sleep(1.0)
    return last


async def figures_exact(
    metrics_url: str, expect: Targets, issuer_url: str, shifts: list[timedelta]
) -> list[bool]:
    """Whether the metrics answer every figure of each half-year (by its shift) exactly."""
    token = OperatorToken(None, issuer_url)
    async with httpx.AsyncClient(timeout=httpx.Timeout(120.0)) as client:
        await token.renew(client)
        found = [await read_back(client, metrics_url, expect, token, s) for s in shifts]
    return [caught_up(checks) for checks in found]


def mib(value: float) -> str:
    return f"{value:,.0f}"


def print_workers(
    console: Console,
    first: Mapping[str, After],
    second: Mapping[str, After],
    restarts: Mapping[str, Restart],
) -> None:
    console.print(
        "per worker, MiB and seconds (peak = VmHWM of the process, the same through both "
        "half-years; live = motcua_states_live; KILL s: SIGKILL, started again, until /readyz "
        "answers 200, the restore time; TERM s: the same after a SIGTERM, the worker leaving its "
        "consumer groups; live and RSS after: once up after the SIGKILL)"
    )
    head = ("worker", "peak 1st", "peak 2nd", "2nd/1st", "RSS 1st", "RSS 2nd", "live 1st",
            "live 2nd", "KILL s", "TERM s", "live after", "RSS after", "goals")  # fmt: skip
    widths = (10, 10, 10, 9, 9, 9, 10, 10, 8, 8, 11, 11, 0)
    console.print(
        "".join(f"{h:>{w}}" if w else f"  {h}" for h, w in zip(head, widths, strict=True))
    )
    for name in WORKERS:
        a, b, restart = first[name], second[name], restarts[name]
        r = restart.after
        growth = b.usage.peak_rss_mib / a.usage.peak_rss_mib if a.usage.peak_rss_mib else 0.0
        missed = []
        if growth > GOAL_GROWTH:
            missed.append("peak grew > 10 %")
        if b.usage.peak_rss_mib > GOAL_PEAK_MIB:
            missed.append("peak > 300 MiB")
        if restart.killed_seconds > GOAL_RESTORE_SECONDS:
            missed.append("restore > 10 s")
        cells = (
            name,
            mib(a.usage.peak_rss_mib),
            mib(b.usage.peak_rss_mib),
            f"{growth:.2f}",
            mib(a.usage.rss_mib),
            mib(b.usage.rss_mib),
            _states(a.states),
            _states(b.states),
            f"{restart.killed_seconds:.1f}",
            f"{restart.stopped_seconds:.1f}",
            _states(r.states),
            mib(r.usage.rss_mib),
            ", ".join(missed) or "met",
        )
        console.print(
            "".join(f"{c:>{w}}" if w else f"  {c}" for c, w in zip(cells, widths, strict=True))
        )


def _row(cells: tuple[str, ...], widths: tuple[int, ...]) -> str:
    """Right-aligned columns; a width of 0 is the last, free column."""
    return "".join(f"{c:>{w}}" if w else f"  {c}" for c, w in zip(cells, widths, strict=True))


def _states(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def print_rates(console: Console, results: list[ReplayResult]) -> list[float]:
    rates = []
    for number, result in enumerate(results, start=1):
        rate = result.sent.events / result.catch_up_seconds
        rates.append(rate)
        console.print(
            f"half-year {number}: {result.dossiers:,} dossiers, {result.sent.events:,} events; "
            f"first event to metrics caught up: {result.catch_up_seconds:,.1f} s "
            f"({'caught up' if result.caught_up else 'NOT caught up'}), "
            f"{rate:,.0f} events/s end to end"
        )
    console.print(f"end-to-end rate, second / first: {rates[1] / rates[0]:.3f}")
    return rates


async def main(args: argparse.Namespace) -> int:
    console = Console(soft_wrap=True)
    broker = Broker(port=free_port()).start()
    redis_server = EmbeddedRedis.ensure(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    ports = {r.port: free_port() for r in RUNNABLES}
    base = stack_env(broker, redis_server.url, ports, "bench-state")
    env = state_env(base, ports, args.grace, args.carrier_step)
    env["MOTCUA_TOPIC_PARTITIONS"] = str(args.partitions)
    expect_first = targets(args.scale)
    # both half-years' bookings are read together (see the module's docstring)
    expect_both = dataclasses.replace(
        expect_first, pickups=2 * expect_first.pickups, returns=2 * expect_first.returns
    )
    results: list[ReplayResult] = []
    cpu: list[tuple[dict[str, Usage], dict[str, Usage]]] = []
    after: list[dict[str, After]] = []
    restarts: dict[str, Restart] = {}
    exact: list[bool] = []
    try:
        await ensure_topics(broker.bootstrap, declared_topics(int(args.partitions)))
        with running_issuer() as issuer, contextlib.ExitStack() as exits:
            env["MOTCUA_OIDC_ISSUER"] = issuer.url
            stack = Stack(env, ports, exits)
            for runnable in RUNNABLES:
                stack.start(runnable)
            for runnable in RUNNABLES:
                stack.wait_up(runnable)
            assert broker.process is not None
            broker_pid = broker.process.pid
            metrics_url = stack.url(BY_NAME["metrics"])
            for number, (shift, expect) in enumerate(
                [(timedelta(0), expect_first), (YEAR, expect_both)], start=1
            ):
                console.print(f"half-year {number} (shifted by {shift.days} days)…")
                before = {**stack.usage(), "broker (tansu)": usage(broker_pid)}
                result = await replay(
                    args.scale,
                    args.seed,
                    intake_url=stack.url(BY_NAME["intake"]),
                    key=KEY,
                    metrics_url=metrics_url,
                    issuer_url=issuer.url,
                    source=SOURCE,
                    concurrency=args.concurrency,
                    wait_seconds=args.wait,
                    console=console,
                    shift=shift,
                    expect=expect,
                )
                results.append(result)
                cpu.append((before, {**stack.usage(), "broker (tansu)": usage(broker_pid)}))
                console.print(table(result))
                console.print("waiting for the retirements to settle…")
                states = settle(stack, args.grace, args.wait)
                now = stack.usage()
                after.append({name: After(now[name], states.get(name)) for name in WORKERS})
            for runnable in RUNNABLES:
                if runnable.worker:
                    console.print(f"SIGKILL and restart of {runnable.name}, then SIGTERM…")
                    killed = stack.restart_seconds(runnable, signal.SIGKILL, args.wait)
                    restored = After(stack.usage()[runnable.name], stack.states_live(runnable))
                    stopped = stack.restart_seconds(runnable, signal.SIGTERM, args.wait)
                    restarts[runnable.name] = Restart(killed, stopped, restored)
            exact = await figures_exact(metrics_url, expect_both, issuer.url, [timedelta(0), YEAR])
        console.print("baseline: the same events through a bare aiokafka producer and consumer…")
        raw = await raw_baseline(
            broker.bootstrap,
            replay_records(args.scale, args.seed, SOURCE),
            int(args.partitions),
            broker_pid,
        )
    finally:
        broker.stop()
        forget_run(env)  # the keys this run left in a shared Redis
        redis_server.stop()

    console.print(
        f"scale {args.scale}, grace {args.grace:g} s, carrier step {args.carrier_step:g} s"
    )
    rates = print_rates(console, results)
    for number, ((before, later), result) in enumerate(zip(cpu, results, strict=True), start=1):
        console.print(f"half-year {number}, per process (CPU during the replay, peak RSS so far):")
        print_processes(console, before, later, result.sent.events)
    print_workers(console, after[0], after[1], restarts)
    console.print(
        "figures of both half-years after the restarts: "
        + ", ".join(
            f"half-year {n}: {'exact' if ok else 'DIFFER'}" for n, ok in enumerate(exact, 1)
        )
    )
    print_baseline(console, raw, rates[0], "end to end / baseline, first half-year")
    console.print(f"end to end / baseline, second half-year: {rates[1] / raw.rate:.3f}")
    console.print(f"load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} cores")
    return 0 if all(r.ok for r in results) and all(exact) else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=2019)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--grace", type=float, default=30.0, help="seconds before retirement")
    parser.add_argument(
        "--carrier-step", type=float, default=1.0, help="seconds between a carrier's status codes"
    )
    parser.add_argument("--wait", type=float, default=3600.0)
    raise SystemExit(asyncio.run(main(parser.parse_args())))
