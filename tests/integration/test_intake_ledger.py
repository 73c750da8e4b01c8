"""Intake's duplicates stay duplicates when Redis loses its ledger or the broker stalls: the
real broker, the real Redis, intake over real HTTP (issue: nothing lost, nothing twice)."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest

from services.common.events import decode_event
from services.dev.embedded import Broker, free_port
from tests.conftest import service_env
from tests.integration.test_intake import Intake
from tests.support.factories import submitted
from tests.support.kafka import read_all
from tests.support.processes import motcua
from tests.support.redis_keys import delete_namespace

pytestmark = [pytest.mark.integration, pytest.mark.chaos]


def forget_everything(redis_url: str, namespace: str) -> int:
    """What Redis restarting empty does to intake: every key of this run's namespace gone (the
    other tests' namespaces on the shared Redis are left alone)."""
    return delete_namespace(redis_url, namespace)


async def copies_on_the_topic(broker: Broker, ids: set[str]) -> Counter[str]:
    records = await read_all(broker.bootstrap, "dossier.events", idle=1.5)
    return Counter(
        event.id for event in (decode_event(r.value) for r in records) if event.id in ids
    )


@pytest.fixture
def own_intake(redis_url: str, namespace: str) -> Iterator[tuple[Intake, Broker]]:
    broker = Broker(port=free_port()).start()
    port = free_port()
    env = service_env(
        broker, redis_url, namespace, INTAKE_PORT=str(port), INTAKE_PUBLISH_TIMEOUT_SECONDS="2"
    )
    try:
        with motcua("intake", env, port, log_name="intake-ledger"):
            yield Intake(port, broker), broker
    finally:
        broker.stop()


async def test_a_resend_after_redis_lost_everything_is_counted_as_duplicates(
    own_intake: tuple[Intake, Broker], redis_url: str, namespace: str
) -> None:
    intake, broker = own_intake
    batch = [submitted() for _ in range(40)]
    assert intake.post(batch).json() == {"accepted": 40, "duplicates": 0}

    assert forget_everything(redis_url, namespace) >= 40
    ready = httpx.get(f"{intake.url}/readyz")
    resent = intake.post(batch)
    while resent.status_code == 503:  # restoring from dossier.events: the portal retries
        assert resent.headers["retry-after"]
        time.sleep(0.2)
        resent = intake.post(batch)
    assert resent.status_code == 202, resent.text
    assert resent.json() == {"accepted": 0, "duplicates": 40}
    assert ready.status_code in (200, 503)
    assert httpx.get(f"{intake.url}/readyz").status_code == 200

    copies = await copies_on_the_topic(broker, {e["id"] for e in batch})
    assert copies == Counter({e["id"]: 1 for e in batch})
    # new events after the restore are still published once
    fresh = [submitted() for _ in range(5)]
    assert intake.post(fresh).json() == {"accepted": 5, "duplicates": 0}


async def test_a_retry_after_a_broker_stall_publishes_each_event_once(
    own_intake: tuple[Intake, Broker],
) -> None:
    intake, broker = own_intake
    assert intake.post(submitted()).status_code == 202  # the producer is connected
    batch = [submitted() for _ in range(10)]
    assert broker.process is not None
    os.kill(broker.process.pid, signal.SIGSTOP)
    try:
        stalled = intake.post(batch)
    finally:
        os.kill(broker.process.pid, signal.SIGCONT)
    assert stalled.status_code == 503
    assert stalled.headers["retry-after"]

    retried = intake.post(batch)
    while retried.status_code == 503:  # the broker is back a moment later
        time.sleep(0.5)
        retried = intake.post(batch)
    assert retried.status_code == 202, retried.text
    counted = retried.json()
    assert counted["accepted"] + counted["duplicates"] == 10
    assert intake.post(batch).json() == {"accepted": 0, "duplicates": 10}
    copies = await copies_on_the_topic(broker, {e["id"] for e in batch})
    assert copies == Counter({e["id"]: 1 for e in batch})
