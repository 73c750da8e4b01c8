"""Everything breaks once while the portal simulator files dossiers, and nothing is lost or done
twice (issue 14, item 10).

The whole stack runs as `motcua dev` runs it (the broker, the services, the partner sandboxes,
the dev issuer; its supervisor restarts a child that dies), on ports of this test's own and a
Redis of its own; `motcua simulate` files dossiers through intake and opens some payment links.
While it runs: each worker (payments, postal, sms, metrics) is SIGKILLed once after it handled
some events, Redis is restarted empty, and the broker is stopped for 20 s (SIGSTOP, SIGCONT).
Then the stack drains, and the test counts at the sandboxes and on the topics: SMS per
(dossier, template), charges per order, carrier orders per (dossier, leg), copies per event
(source, id) on every topic, and what each accepted dossier should have caused and did not.
The figures go to `test-output/chaos-under-load.json` (docs/reliability.md shows a run's).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from services.common.topics import (
    DOSSIER_EVENTS,
    PAYMENT_EVENTS,
    POSTAL_EVENTS,
    SMS_EVENTS,
    dlq,
)
from services.dev.embedded import free_port
from services.sms.phones import MobileNumber, normalise_phone
from tests.integration.test_dev_stack import PORTS, child_running, descendants
from tests.support.kafka import read_all
from tests.support.processes import LOG_DIR, ROOT, log_tail, process, wait_http
from tests.support.prometheus import metric_total
from tests.support.redis_server import RestartableRedis
from tests.support.sealed import opened

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

WORKERS = ("payments", "postal", "sms", "metrics")
SERVICES = ("intake", *WORKERS)
SANDBOXES = ("vnpay-sandbox", "vnpost-sandbox", "sms-primary-sandbox", "sms-secondary-sandbox")
TOPICS = (DOSSIER_EVENTS, PAYMENT_EVENTS, POSTAL_EVENTS, SMS_EVENTS)
BROKER_STALL_SECONDS = 20.0
FIGURES = ROOT / "test-output" / "chaos-under-load.json"

# What the applicant is told about, by event type (CONTRACT section 5); a resolved dossier's
# message depends on whether the result comes by post.
TEMPLATES = {
    "dossier.received": "dossier_received",
    "dossier.supplement_requested": "supplement_requested",
    "dossier.rejected": "dossier_rejected",
    "dossier.withdrawn": "dossier_withdrawn",
    "dossier.apology_issued": "apology_issued",
    "dossier.result_returned": "survey_invite",
    "payment.requested": "payment_requested",
    "payment.succeeded": "payment_received",
    "postal.pickup_requested": "postal_pickup_booked",
    "postal.picked_up": "postal_picked_up",
    "postal.out_for_delivery": "postal_out_for_delivery",
    "postal.delivered": "postal_delivered",
}
RETURN_MODES = ("return", "pickup_and_return")
PICKUP_MODES = ("pickup", "pickup_and_return")


@dataclass
class Stack:
    dev: subprocess.Popen[bytes]
    ports: dict[str, int]
    broker_port: int
    redis: RestartableRedis
    env: dict[str, str]

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.ports[name]}"

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    def pid(self, name: str) -> int:
        """The pid of the process running `motcua run NAME` (the worker itself)."""
        return child_running(self.dev.pid, name)

    def broker_pid(self) -> int:
        listener = f"tcp://127.0.0.1:{self.broker_port}".encode()
        for pid in descendants(self.dev.pid):
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"broker" in args and listener in args:
                return pid
        raise LookupError("no broker among motcua dev's children")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """`motcua dev` (no simulator of its own) on free ports, with a Redis of this test's own."""
    own_redis = RestartableRedis().start()
    ports = {name: free_port() for name in PORTS.values()}
    broker_port = free_port()

    def url(name: str) -> str:
        return f"http://127.0.0.1:{ports[name]}"

    env = {k: v for k, v in os.environ.items() if k != "KAFKA_BOOTSTRAP"}
    env.update(
        {setting: str(ports[name]) for setting, name in PORTS.items()},
        REDIS_URL=own_redis.url,
        MOTCUA_DEV_LOG_DIR=str(LOG_DIR / "chaos-under-load"),
        VNPAY_URL=url("vnpay-sandbox"),
        JSONPAY_URL=f"{url('vnpay-sandbox')}/jsonpay",
        VNPOST_URL=url("vnpost-sandbox"),
        SMS_PRIMARY_URL=url("sms-primary-sandbox"),
        SMS_SECONDARY_URL=url("sms-secondary-sandbox"),
        PAYMENTS_PUBLIC_URL=url("payments"),
        PAYMENTS_RETURN_URL=f"{url('payments')}/v1/payments/return",
        POSTAL_PUBLIC_URL=url("postal"),
        SMS_PUBLIC_URL=url("sms"),
        MOTCUA_TOPIC_PARTITIONS="2",
        # the test runs at any hour: no quiet hours; the carrier walks its orders quickly
        SMS_QUIET_START="00:00",
        SMS_QUIET_END="00:00",
        VNPOST_SANDBOX_STEP_SECONDS="0.3",
        # most applicants who open the page pay; the bank sends a third of its IPNs twice
        VNPAY_SANDBOX_CONFIG=json.dumps(
            {"outcomes": {"00": 0.8, "51": 0.1, "24": 0.1}, "faults": {"duplicate": 0.3}}
        ),
    )
    command = ["services.cli", "dev", "--no-simulator", "--broker-port", str(broker_port)]
    try:
        with process(command, env, "chaos-under-load-dev") as dev:
            for name in SERVICES:
                wait_http(f"{url(name)}/readyz", timeout=180, proc=dev)
            yield Stack(dev, ports, broker_port, own_redis, env)
    finally:
        own_redis.stop()


def accepted_by_intake(intake: str) -> float:
    return metric_total(intake, "motcua_intake_events_total", outcome="accepted")


def not_ready(stack: Stack) -> list[str]:
    """The services whose `/readyz` does not answer 200, and the sandboxes that do not answer."""
    services = [n for n in SERVICES if not answers(f"{stack.url(n)}/readyz")]
    return services + [n for n in SANDBOXES if not answers(f"{stack.url(n)}/healthz")]


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str | Callable[[], str]
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what() if callable(what) else what)
        time.sleep(0.2)


def answers(url: str, expect: int = 200) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == expect
    except httpx.HTTPError:
        return False


def kill_worker_mid_stream(stack: Stack, name: str, simulator: subprocess.Popen[bytes]) -> int:
    """SIGKILL the worker once it has handled events while more keep coming; wait until the
    supervisor has started another one. What it had handled when killed."""
    base, events = stack.url(name), "motcua_events_consumed_total"
    wait_until(lambda: metric_total(base, events) > 0, 60, f"{name} handled nothing")
    victim = stack.pid(name)
    handled = metric_total(base, events)
    assert simulator.poll() is None, "the simulator stopped before the kill"
    os.kill(victim, signal.SIGKILL)

    def replaced() -> bool:
        try:
            return stack.pid(name) != victim
        except LookupError:
            return False

    wait_until(replaced, 60, f"{name} was not restarted")
    return int(handled)


@dataclass
class Topics:
    """What is on the topics, by (source, id): copies, and one decoded envelope each."""

    copies: dict[str, Counter[tuple[str, str]]] = field(default_factory=dict)
    events: dict[str, dict[tuple[str, str], dict[str, Any]]] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)

    def of(self, topic: str) -> list[dict[str, Any]]:
        return list(self.events.get(topic, {}).values())

    def twice(self, topic: str) -> int:
        return sum(1 for n in self.copies.get(topic, Counter()).values() if n > 1)


async def read_topics(bootstrap: str, topics: tuple[str, ...]) -> Topics:
    found = Topics()

    async def one(topic: str) -> None:
        records = await read_all(bootstrap, topic, idle=1.0, timeout=30)
        copies: Counter[tuple[str, str]] = Counter()
        events: dict[tuple[str, str], dict[str, Any]] = {}
        envelopes = [orjson.loads(record.value) for record in records]
        if topic == DOSSIER_EVENTS:  # what the applicants are expected to hear is on clear data
            envelopes = await opened(bootstrap, envelopes)
        for envelope in envelopes:
            key = (envelope["source"], envelope["id"])
            copies[key] += 1
            events.setdefault(key, envelope)
        found.copies[topic], found.events[topic] = copies, events

    async def dead(topic: str) -> None:
        found.dead_letters[topic] = len(await read_all(bootstrap, dlq(topic), timeout=2))

    await asyncio.gather(*(one(t) for t in topics), *(dead(t) for t in topics))
    return found


def expected_sms(topics: Topics) -> Counter[tuple[str, str]]:
    """How many messages per (dossier, template) the events on the topics call for, for
    applicants with a mobile number: one per event, so a second delivery attempt after a failed
    one (a second `postal.out_for_delivery`) is a second message."""
    submitted = {e["subject"]: e["data"] for e in topics.of(DOSSIER_EVENTS)
                 if e["type"] == "dossier.submitted"}  # fmt: skip
    wanted: Counter[tuple[str, str]] = Counter()
    for topic in (DOSSIER_EVENTS, PAYMENT_EVENTS, POSTAL_EVENTS):
        for event in topics.of(topic):
            data = submitted.get(event["subject"])
            if data is None or not reachable(data):
                continue
            if event["type"] == "dossier.resolved":
                by_post = data["postal"]["mode"] in RETURN_MODES
                template = "result_ready_by_post" if by_post else "result_ready_at_desk"
                wanted[(event["subject"], template)] += 1
            elif event["type"] in TEMPLATES:
                wanted[(event["subject"], TEMPLATES[event["type"]])] += 1
    return wanted


def reachable(submitted: dict[str, Any]) -> bool:
    return isinstance(normalise_phone(submitted["applicant"].get("phone")), MobileNumber)


def sms_accepted(stack: Stack) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Messages the two gateways accepted, per (dossier, template)."""
    sent: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for gateway in ("sms-primary-sandbox", "sms-secondary-sandbox"):
        answer = httpx.get(f"{stack.url(gateway)}/v1/messages", timeout=10).json()
        for message in answer["accepted"]:
            sent[(message["dossier_id"], message["template"])].append(
                {"gateway": gateway, **message}
            )
    return sent


def missing(
    wanted: Counter[tuple[str, str]], sent: dict[tuple[str, str], list[dict[str, Any]]]
) -> Counter[tuple[str, str]]:
    return Counter({pair: n - len(sent.get(pair, [])) for pair, n in wanted.items()
                    if n > len(sent.get(pair, []))})  # fmt: skip


def carrier_orders(stack: Stack) -> Counter[tuple[str, str]]:
    orders = httpx.get(f"{stack.url('vnpost-sandbox')}/sandbox/orders", timeout=10).json()
    return Counter((o["dossier_id"], o["leg"]) for o in orders)


def expected_legs(topics: Topics) -> set[tuple[str, str]]:
    """A pickup for every dossier filed with one, a return for every resolved one that asked
    for it (to an address a carrier can route)."""
    submitted = {e["subject"]: e["data"] for e in topics.of(DOSSIER_EVENTS)
                 if e["type"] == "dossier.submitted"}  # fmt: skip
    resolved = {e["subject"] for e in topics.of(DOSSIER_EVENTS) if e["type"] == "dossier.resolved"}
    legs: set[tuple[str, str]] = set()
    for dossier, data in submitted.items():
        address = data["applicant"].get("address")
        if not isinstance(address, dict):
            continue  # not routable: postal.failed invalid_address instead of a booking
        if data["postal"]["mode"] in PICKUP_MODES:
            legs.add((dossier, "pickup"))
        if data["postal"]["mode"] in RETURN_MODES and dossier in resolved:
            legs.add((dossier, "return"))
    return legs


def owing_online(topics: Topics) -> set[str]:
    return {
        e["subject"]
        for e in topics.of(DOSSIER_EVENTS)
        if e["type"] == "dossier.submitted"
        and e["data"]["fee"]["method"] == "online"
        and e["data"]["fee"]["amount_vnd"] > 0
    }


def holes(topics: Topics) -> list[str]:
    """Dossiers missing an event between two that arrived: the simulator numbers a dossier's
    events `<dossier>:<n>` and posts them in order, so only the last ones may not be there yet."""
    numbers: dict[str, set[int]] = defaultdict(set)
    for source, event_id in topics.events.get(DOSSIER_EVENTS, {}):
        if source == "portal/dev":
            dossier, _, n = event_id.rpartition(":")
            numbers[dossier].add(int(n))
    return [d for d, ns in numbers.items() if ns != set(range(1, max(ns) + 1))]


def simulator_sent(log: Path, offset: int) -> dict[str, int]:
    """What the simulator's last line (`simulator_stopped`) says, in its log from `offset` on
    (this run's part): `events` intake answered 202 for, of which `accepted` (the others were
    counted as duplicates)."""
    with log.open("rb") as text:
        text.seek(offset)
        lines = text.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        if "simulator_stopped" in line:
            said = json.loads(line)
            return {"events": int(said["events"]), "accepted": int(said["accepted"])}
    raise AssertionError("the simulator did not say what it sent:\n" + "\n".join(lines[-30:]))


@dataclass
class Sandboxes:
    """What the partners saw: the bank's orders, the carrier's orders per (dossier, leg), the
    messages the two SMS gateways accepted per (dossier, template)."""

    bank: dict[str, Any]
    booked: Counter[tuple[str, str]]
    sent: dict[tuple[str, str], list[dict[str, Any]]]


def read_sandboxes(stack: Stack) -> Sandboxes:
    bank = httpx.get(f"{stack.url('vnpay-sandbox')}/sandbox/orders", timeout=10).json()
    return Sandboxes(bank, carrier_orders(stack), sms_accepted(stack))


# the figures that are not 0 while the stack is still draining
DRAINING = (
    "payment_orders_missing",
    "charged_without_one_payment_succeeded",
    "carrier_orders_missing",
    "sms_missing",
)


def count(before: Topics, seen: Sandboxes, after: Topics) -> dict[str, Any]:
    """The figures: effects missing for the causes on the topics `before` the sandboxes were
    `seen`, effects beyond what the causes on the topics `after` call for."""
    owing, legs, messages = owing_online(before), expected_legs(before), expected_sms(before)
    orders: dict[str, set[str]] = defaultdict(set)
    succeeded: dict[str, set[str]] = defaultdict(set)
    for event in after.of(PAYMENT_EVENTS):
        if event["type"] == "payment.requested":
            orders[event["subject"]].add(event["id"])
        if event["type"] == "payment.succeeded":
            succeeded[event["subject"]].add(event["id"])
    charges: Counter[str] = Counter()
    for order in seen.bank.values():
        charges[order["dossier_id"]] += order["charges"]
    allowed = expected_sms(after)
    by_key = Counter(m["idempotency_key"] for copies in seen.sent.values() for m in copies)
    return {
        "dossiers": sum(1 for e in after.of(DOSSIER_EVENTS) if e["type"] == "dossier.submitted"),
        "portal_events_on_dossier_events": sum(
            1 for source, _ in after.events[DOSSIER_EVENTS] if source == "portal/dev"
        ),
        "dossiers_with_a_missing_event": len(holes(after)),
        "events_published_twice": {t: after.twice(t) for t in TOPICS},
        "copies_on_topics": {t: sum(after.copies[t].values()) for t in TOPICS},
        "dead_letters": after.dead_letters,
        "payment_orders_expected": len(owing),
        "payment_orders_missing": len(owing - set(orders)),
        "dossiers_with_two_payment_orders": sum(1 for ids in orders.values() if len(ids) > 1),
        "payment_pages_opened": len(seen.bank),
        "orders_charged": sum(1 for n in charges.values() if n),
        "double_charges": sum(1 for n in charges.values() if n > 1),
        "charged_without_one_payment_succeeded": sum(
            1 for d, n in charges.items() if n and len(succeeded[d]) != 1
        ),
        "carrier_orders_expected": len(legs),
        "carrier_orders_missing": len(legs - set(seen.booked)),
        "double_bookings": sum(1 for n in seen.booked.values() if n > 1),
        "sms_expected": sum(messages.values()),
        "sms_accepted": sum(len(copies) for copies in seen.sent.values()),
        "sms_missing": sum(missing(messages, seen.sent).values()),
        # more messages of a template for a dossier than events that call for it
        "sms_twice_per_dossier_and_template": sum(
            1 for pair, copies in seen.sent.items() if len(copies) > allowed[pair]
        ),
        # one message (one idempotency key) accepted more than once, at either gateway
        "sms_same_message_twice": sum(1 for n in by_key.values() if n > 1),
    }


def test_everything_breaks_once_under_load_and_nothing_is_lost_or_done_twice(
    stack: Stack,
) -> None:
    started = time.monotonic()
    sim_env = {**stack.env, "MOTCUA_LOG_JSON": "true"}
    simulate = [
        "services.cli",
        "simulate",
        "--rate",
        "3",
        "--day-seconds",
        "2",
        "--seed",
        "14",
        "--intake-url",
        stack.url("intake"),
        "--payments-url",
        stack.url("payments"),
        "--pay-share",
        "0.8",
    ]
    figures: dict[str, Any] = {}
    intake = stack.url("intake")
    log = LOG_DIR / "chaos-under-load-simulator.log"
    offset = log.stat().st_size if log.exists() else 0
    with process(simulate, sim_env, log.stem) as simulator:
        # each worker SIGKILLed once it has handled events while more keep coming
        figures["handled_before_kill"] = {
            name: kill_worker_mid_stream(stack, name, simulator) for name in WORKERS
        }
        # Redis restarted empty; intake restores its ledger from dossier.events
        figures["redis_keys_lost"] = redis.Redis.from_url(stack.redis.url).dbsize()
        stack.redis.restart_empty()
        wait_until(lambda: answers(f"{intake}/readyz"), 60, "intake not ready")
        # the broker stalls for 20 s
        broker = stack.broker_pid()
        os.kill(broker, signal.SIGSTOP)
        try:
            time.sleep(BROKER_STALL_SECONDS)  # the outage itself: its length is the scenario
        finally:
            os.kill(broker, signal.SIGCONT)
        # the portal's traffic flows again (30 more events accepted) and every service is ready
        # again (its consumers rejoined) while it does; then the portal stops
        resumed = accepted_by_intake(intake) + 30
        wait_until(lambda: accepted_by_intake(intake) >= resumed, 60, "intake accepts nothing")
        wait_until(lambda: not not_ready(stack), 90, lambda: f"not ready: {not_ready(stack)}")
        simulator.send_signal(signal.SIGTERM)
        assert simulator.wait(timeout=60) == 0, log_tail(simulator)
    sent = simulator_sent(log, offset)
    figures["faults_done_after_seconds"] = round(time.monotonic() - started, 1)

    # Drained: what the events on the topics call for is at the sandboxes. Read the topics,
    # then the sandboxes, then the topics again: an effect is missing if its cause was on the
    # topics before the sandboxes were read, and is one too many if no cause was there after.
    before = asyncio.run(read_topics(stack.bootstrap, TOPICS))
    deadline = time.monotonic() + 90
    while True:
        seen = read_sandboxes(stack)
        after = asyncio.run(read_topics(stack.bootstrap, TOPICS))
        counts = count(before, seen, after)
        if time.monotonic() > deadline or not any(counts[name] for name in DRAINING):
            break
        before = after
        time.sleep(1.0)
    figures["drained_after_seconds"] = round(time.monotonic() - started, 1)
    figures |= counts
    figures["portal_events_answered_202"] = sent["events"]
    figures["portal_events_accepted"] = sent["accepted"]
    figures["duplicates_counted_by_intake"] = int(
        metric_total(intake, "motcua_intake_events_total", outcome="duplicate")
    )
    figures["intake_answers"] = {
        status: int(metric_total(intake, "motcua_intake_requests_total", status=status))
        for status in ("202", "503")
    }
    figures["not_ready"] = not_ready(stack)
    twice = [
        copies for pair, copies in seen.sent.items() if len(copies) > expected_sms(after)[pair]
    ]
    FIGURES.parent.mkdir(parents=True, exist_ok=True)
    details = {
        "sms_sent_twice": twice,
        "published_twice": {
            topic: [after.events[topic][key] for key, n in after.copies[topic].items() if n > 1]
            for topic in TOPICS
        },
    }
    FIGURES.write_text(json.dumps({**figures, "details": details}, indent=2) + "\n")

    # every event intake answered 202 for is on the topic, once
    assert figures["dossiers"] > 0 and sent["events"] > 0
    assert sent["events"] <= figures["portal_events_on_dossier_events"], figures
    assert figures["dossiers_with_a_missing_event"] == 0, figures
    assert figures["events_published_twice"] == dict.fromkeys(TOPICS, 0), figures
    assert figures["dead_letters"] == dict.fromkeys(TOPICS, 0), figures
    assert figures["payment_orders_expected"] > 0 and figures["orders_charged"] > 0, figures
    assert figures["payment_orders_missing"] == 0, figures
    assert figures["dossiers_with_two_payment_orders"] == 0, figures
    assert figures["double_charges"] == 0, figures
    assert figures["charged_without_one_payment_succeeded"] == 0, figures
    assert figures["carrier_orders_expected"] > 0, figures
    assert figures["carrier_orders_missing"] == 0, figures
    assert figures["double_bookings"] == 0, figures
    assert figures["sms_expected"] > 0, figures
    assert figures["sms_missing"] == 0, figures
    assert figures["sms_twice_per_dossier_and_template"] == 0, f"{twice} (see {FIGURES})"
    assert figures["sms_same_message_twice"] == 0, figures
    assert figures["not_ready"] == [], figures
