"""The plain-aiokafka `BatchConsumer` and the metrics changelog against the real broker.

- Poison messages (undecodable, invalid, a handler that keeps failing) go to `<topic>.dlq` with
  the CONTRACT headers and the worker keeps going; offsets are committed only after the
  handler's writes, so a restarted worker does not handle a batch twice.
- The metrics service restores its states from its own changelog: right after a SIGKILL and a
  restart, `/readyz` turns 200 with every figure already right (nothing left to re-read), one
  changelog record per dossier is the latest state, and redelivered events change nothing.
- A topic the consumer is told to hold (`held`) stays unread while the others are read, and is
  read once it is no longer held.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import tempfile
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import orjson
import pytest
import redis
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from services.common.consumer import BatchConsumer
from services.common.events import CloudEvent
from services.common.kafka import ensure_topics
from services.common.topics import METRICS_STATE_CHANGELOG, TopicSpec, declared_topics
from services.dev.embedded import Broker, free_port
from services.metrics.codec import decode_state
from tests.conftest import service_env
from tests.integration.test_metrics import domain as to_domain_events
from tests.integration.test_metrics import expected_cases, mismatches, produce, wait_match
from tests.integration.test_sms_service import ThreadRunner
from tests.support.factories import submitted
from tests.support.kafka import produce as produce_raw
from tests.support.kafka import read_all
from tests.support.metrics_stream import stream
from tests.support.operators import Issuer
from tests.support.poison import assert_dead_letters, poison_mix
from tests.support.processes import motcua, process, wait_http
from tests.support.prometheus import metric_total

pytestmark = pytest.mark.integration

INPUTS = ("dossier.events", "payment.events", "postal.events", "sms.events")


def recorded(client: redis.Redis, key: str) -> list[str]:
    return [v.decode() for v in client.lrange(key, 0, -1)]


def wait_recorded(client: redis.Redis, key: str, want: set[str], timeout: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout
    got: list[str] = []
    while time.monotonic() < deadline:
        got = recorded(client, key)
        if want <= set(got):
            return got
        time.sleep(0.2)
    return got


async def committed_lag(bootstrap: str, group: str, topics: Sequence[str]) -> int:
    """Records on `topics` past the group's committed offsets (all of them if none).

    The ends are counted from the records themselves (Tansu under-reports end offsets), and
    the commits read by a consumer of that group that never subscribes, so never joins."""
    ends: dict[TopicPartition, int] = {}
    for topic in topics:
        for record in await read_all(bootstrap, topic, timeout=30, idle=1):
            tp = TopicPartition(topic, record.partition)
            ends[tp] = max(ends.get(tp, 0), record.offset + 1)
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    await asyncio.sleep(0)
    try:
        lag = 0
        for tp, end in ends.items():
            lag += max(0, end - (await consumer.committed(tp) or 0))
    finally:
        await consumer.stop()
    return lag


def wait_committed(bootstrap: str, group: str, topics: Sequence[str], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (lag := asyncio.run(committed_lag(bootstrap, group, topics))) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.5)
    assert lag == 0, f"{lag} records not committed by {group}"


def test_poison_messages_go_to_the_dlq_and_offsets_are_committed_after_the_handler(
    broker: Broker, redis_url: str, namespace: str
) -> None:
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    port = free_port()
    env = service_env(broker, redis_url, namespace, METRICS_PORT=str(port))
    mix = poison_mix()
    client = redis.Redis.from_url(redis_url)
    key = f"{namespace}:recorded"
    with process(["tests.support.recorder", "batch-recorder"], env, "batch-recorder") as recorder:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=90, proc=recorder)
        asyncio.run(produce_raw(broker.bootstrap, "dossier.events", mix.messages))

        got = wait_recorded(client, key, set(mix.good_ids))
        assert mix.good_ids <= set(got)
        assert mix.failing_id not in got

        dead = asyncio.run(read_all(broker.bootstrap, "dossier.events.dlq", expect=3, timeout=30))
        assert_dead_letters(dead, mix)

        # keeps going after the poison
        later = submitted()
        asyncio.run(
            produce_raw(broker.bootstrap, "dossier.events", [(b"D-later", orjson.dumps(later))])
        )
        assert later["id"] in wait_recorded(client, key, {later["id"]})

        base = f"http://127.0.0.1:{port}"
        metrics = httpx.get(f"{base}/metrics").text
        assert (
            'motcua_dead_lettered_total{error_type="InvalidEvent",service="batch-recorder",'
            'topic="dossier.events"} 2.0' in metrics
        )
        assert (
            'motcua_events_consumed_total{service="batch-recorder",topic="dossier.events"} 3.0'
            in metrics
        )
        assert "motcua_handler_seconds_count" in metrics
        assert httpx.get(f"{base}/readyz").json()["status"] == "ready"
        wait_committed(broker.bootstrap, "motcua-batch-recorder", ["dossier.events"])
    before = recorded(client, key)

    # A new process in the same group starts from the committed offsets: nothing twice.
    with process(
        ["tests.support.recorder", "batch-recorder"], env, "batch-recorder-restarted"
    ) as recorder:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=90, proc=recorder)
        again = submitted()
        asyncio.run(
            produce_raw(broker.bootstrap, "dossier.events", [(b"D-again", orjson.dumps(again))])
        )
        after = wait_recorded(client, key, {again["id"]})
    assert after == [*before, again["id"]]
    assert len(dead) == 3  # and no second dead letter either
    assert len(asyncio.run(read_all(broker.bootstrap, "dossier.events.dlq", timeout=5))) == 3


def metrics_env(broker: Broker, port: int, issuer: Issuer) -> dict[str, str]:
    return {
        "MOTCUA_OIDC_ISSUER": issuer.url,
        "KAFKA_BOOTSTRAP": broker.bootstrap,
        "MOTCUA_TOPIC_PARTITIONS": "4",
        "METRICS_PORT": str(port),
        "METRICS_OVERDUE_CLOCK": "watermark",
        "METRICS_OVERDUE_INTERVAL_SECONDS": "0.5",
        "MOTCUA_DATA_DIR": tempfile.mkdtemp(prefix="motcua-metrics-changelog-test-"),
    }


def latest_states(bootstrap: str) -> dict[str, Any]:
    records = asyncio.run(read_all(bootstrap, METRICS_STATE_CHANGELOG, timeout=30, idle=2))
    latest: dict[str, bytes] = {}
    for record in records:
        latest[record.key.decode()] = record.value
    return {key: decode_state(key, value) for key, value in latest.items()}


@pytest.fixture
def own_broker() -> Iterator[Broker]:
    """A broker of this test's own: the figures must count its events only."""
    b = Broker(port=free_port()).start()
    yield b
    b.stop()


@pytest.mark.chaos
def test_metrics_restores_from_its_changelog_and_never_counts_twice(
    own_broker: Broker, issuer: Issuer
) -> None:
    broker = own_broker
    viewer = issuer.headers("viewer")
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    lifecycles = list(stream(300, seed=11))
    events: list[CloudEvent[Any]] = [event for lifecycle in lifecycles for event in lifecycle]
    port = free_port()
    env = metrics_env(broker, port, issuer)
    cases = expected_cases(to_domain_events(events))
    base = f"http://127.0.0.1:{port}"

    produced = [0]

    async def feed() -> None:  # the dossiers keep coming, a tenth at a time
        for start in range(0, len(lifecycles), 30):
            chunk = [e for lifecycle in lifecycles[start : start + 30] for e in lifecycle]
            await produce(broker.bootstrap, chunk)
            produced[0] += len(chunk)
            await asyncio.sleep(0.3)

    with motcua("metrics", env, port, log_name="metrics-changelog") as worker, ThreadRunner(feed):
        deadline = time.monotonic() + 60
        while (handled := metric_total(base, "motcua_events_consumed_total")) < len(events) / 5:
            assert time.monotonic() < deadline, f"the worker handled {handled} events"
            time.sleep(0.05)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
        # mid-stream: a fifth of the events handled, the rest still coming
        assert produced[0] < len(events), "every event was there before the kill"

    with motcua("metrics", env, port, log_name="metrics-changelog-restarted") as worker:
        # what the killed worker handled but had not committed comes again: counted once
        wait_match(port, cases, viewer)
        # every offset committed means every changelog record was acknowledged before
        wait_committed(broker.bootstrap, "motcua-metrics", INPUTS)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()

    states = latest_states(broker.bootstrap)
    assert set(states) == {lifecycle[0].subject for lifecycle in lifecycles}
    for lifecycle in lifecycles:
        keys = {fact.key for fact in states[lifecycle[0].subject].facts}
        assert len(keys) == len(states[lifecycle[0].subject].facts)  # no fact twice

    redelivered = events[::7]
    with motcua("metrics", env, port, log_name="metrics-changelog-restored"):
        # ready means restored: the figures are right before anything is consumed again
        assert mismatches(port, cases, viewer) == []
        info = httpx.get(f"{base}/v1/metrics/info", headers=viewer).json()
        assert info["dossiers_in_state"] == len(lifecycles)
        asyncio.run(produce(broker.bootstrap, redelivered))
        wait_committed(broker.bootstrap, "motcua-metrics", INPUTS)
        assert mismatches(port, cases, viewer) == []


@pytest.mark.chaos
def test_a_killed_worker_started_again_is_ready_before_its_old_session_ends(
    own_broker: Broker, issuer: Issuer
) -> None:
    """The dead member is dropped from its group by the worker that takes its place (its id
    kept under `MOTCUA_DATA_DIR`, `services/common/members.py`): with 20 s sessions the group
    would otherwise wait 20 s for it before it gives the new worker any partition (a join
    itself takes about half a session on the embedded broker)."""
    broker = own_broker
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    port = free_port()
    env = {**metrics_env(broker, port, issuer), "MOTCUA_CONSUMER_SESSION_TIMEOUT_SECONDS": "20"}
    with motcua("metrics", env, port, log_name="metrics-member") as worker:
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    killed_at = time.monotonic()
    with process(["services.cli", "run", "metrics"], env, "metrics-member-again") as proc:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=20, proc=proc)
        assert time.monotonic() - killed_at < 20, "the group waited out the dead member"


async def _consume_while_held(bootstrap: str) -> tuple[list[str], list[str]]:
    """Records of two topics read by one consumer that holds the first until told otherwise:
    what it handled while holding, and what it handled after."""
    held_topic, other = "held.inputs", "held.news"
    await ensure_topics(bootstrap, [TopicSpec(held_topic, 2), TopicSpec(other, 2)])
    handled: list[str] = []
    holding = True

    async def handler(items: Sequence[str]) -> None:
        handled.extend(items)

    consumer: BatchConsumer[str] = BatchConsumer(
        "held-test",
        bootstrap,
        [held_topic, other],
        handler,
        decode=lambda record: f"{record.topic}:{record.value.decode()}",
        held=lambda: (held_topic,) if holding else (),
        poll_seconds=0.1,
    )
    task = asyncio.create_task(consumer.run())
    try:
        deadline = time.monotonic() + 60
        while not consumer.ready and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert consumer.ready, "no partitions assigned within 60 s"
        await produce_raw(bootstrap, held_topic, [(f"d{i}".encode(), b"%d" % i) for i in range(20)])
        await produce_raw(bootstrap, other, [(f"d{i}".encode(), b"%d" % i) for i in range(20)])
        while len(handled) < 20 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # several polls more: none brings the held topic
        while_held = list(handled)
        holding = False
        while len(handled) < 40 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return while_held, handled[len(while_held) :]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_held_topic_waits_on_the_broker_while_the_others_are_read(broker: Broker) -> None:
    while_held, after = asyncio.run(_consume_while_held(broker.bootstrap))

    assert sorted(while_held) == sorted(f"held.news:{i}" for i in range(20))
    assert sorted(after) == sorted(f"held.inputs:{i}" for i in range(20))
