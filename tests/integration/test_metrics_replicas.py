"""Two metrics processes answer every query with the same figures, equal to the oracle, whichever
partitions each holds: before and after one of them is SIGKILLed, while the group rebalances, and
while closed dossiers retire into folds (a grace of one second here). Each worker holds the
dossiers of its own partitions, once between them; the survivor takes the dead one's share.

Real broker, two `motcua run metrics` on their own ports, the dev issuer's viewer token; the
expected figures are recounted from the events (`naive_summary`, via test_metrics' cases).
"""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
import time
from contextlib import ExitStack
from typing import Any

import httpx
import pytest

from services.common.events import CloudEvent
from services.common.kafka import ensure_topics
from services.common.topics import declared_topics
from services.dev.embedded import Broker, free_port
from tests.integration.test_metrics import domain, expected_cases, mismatches, produce
from tests.support.metrics_stream import stream
from tests.support.operators import Issuer
from tests.support.processes import motcua, until
from tests.support.prometheus import metric_total

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

DOSSIERS = 400


def env_for(broker: Broker, issuer: Issuer, port: int) -> dict[str, str]:
    return {
        "KAFKA_BOOTSTRAP": broker.bootstrap,
        "MOTCUA_TOPIC_PARTITIONS": "4",
        "METRICS_PORT": str(port),
        "METRICS_OVERDUE_CLOCK": "watermark",
        "METRICS_OVERDUE_INTERVAL_SECONDS": "0.5",
        "METRICS_RETIRE_AFTER_SECONDS": "1",
        "METRICS_RETIRE_IDLE_AFTER_SECONDS": "1",
        "METRICS_RETIRE_INTERVAL_SECONDS": "0.5",
        "MOTCUA_DATA_DIR": tempfile.mkdtemp(prefix="motcua-metrics-replica-"),
        "MOTCUA_OIDC_ISSUER": issuer.url,
        # snapshots of the states and the figures every few hundred records
        "MOTCUA_STATE_SNAPSHOT_MIN_RECORDS": "100",
        "METRICS_FIGURES_SNAPSHOT_CHECK_SECONDS": "0.5",
    }


def wait_both_match(
    ports: list[int], events: list[CloudEvent[Any]], headers: dict[str, str], seconds: float
) -> None:
    cases = expected_cases(domain(events))
    deadline = time.monotonic() + seconds
    while True:
        wrong = [w for port in ports for w in mismatches(port, cases, headers)]
        if not wrong:
            return
        if time.monotonic() > deadline:
            raise AssertionError("\n".join(wrong[:5]))
        time.sleep(0.5)


def url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def lifecycles() -> list[list[CloudEvent[Any]]]:
    return list(stream(DOSSIERS, seed=77))


def test_two_replicas_answer_the_same_figures_through_a_sigkill_and_retirement(
    broker: Broker, issuer: Issuer, lifecycles: list[list[CloudEvent[Any]]]
) -> None:
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    headers = issuer.headers("viewer")
    first_half = [e for lc in lifecycles[: DOSSIERS // 2] for e in lc]
    second_half = [e for lc in lifecycles[DOSSIERS // 2 :] for e in lc]
    ports = [free_port(), free_port()]
    with ExitStack() as stack:
        a = stack.enter_context(motcua("metrics", env_for(broker, issuer, ports[0]), ports[0],
                                       log_name="metrics-replica-a"))  # fmt: skip
        stack.enter_context(motcua("metrics", env_for(broker, issuer, ports[1]), ports[1],
                                   log_name="metrics-replica-b"))  # fmt: skip
        asyncio.run(produce(broker.bootstrap, first_half))
        wait_both_match(ports, first_half, headers, 90)

        # each worker holds (or retired) the dossiers of its partitions, once between them
        def shares() -> list[float]:
            return [
                metric_total(url(p), "motcua_states_retired_total", service="metrics")
                + metric_total(url(p), "motcua_states_live", service="metrics")
                for p in ports
            ]

        # (at least: a dossier.overdue coming back after its dossier retired starts it again)
        deadline = time.monotonic() + 20  # a retirement or rebalance between reads: read again
        # one reading for the check: a rebalance moves dossiers between the two meanwhile
        found = shares()
        while not (all(found) and sum(found) >= DOSSIERS // 2) and time.monotonic() < deadline:
            time.sleep(0.2)
            found = shares()
        assert all(found) and sum(found) >= DOSSIERS // 2, found

        # closed dossiers retired on both members' partitions, and both still answer it all
        def retired() -> float:
            return sum(metric_total(url(p), "motcua_states_retired_total") for p in ports)

        deadline = time.monotonic() + 30
        while retired() == 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert retired() > 0
        wait_both_match(ports, first_half, headers, 30)

        os.killpg(a.pid, signal.SIGKILL)
        a.wait()
        # while the group waits out the dead member and rebalances, the survivor answers the
        # same figures: they come from the changelog, not from the partitions it holds
        for _ in range(4):
            assert mismatches(ports[1], expected_cases(domain(first_half)), headers) == []
            time.sleep(1)
        asyncio.run(produce(broker.bootstrap, second_half))
        everything = first_half + second_half
        wait_both_match([ports[1]], everything, headers, 120)
        # the survivor, leading the group, wrote snapshots of its states and of the figures
        until(
            lambda: metric_total(url(ports[1]), "motcua_metrics_figures_snapshots_total") > 0,
            "a snapshot of the figures",
        )
        assert metric_total(url(ports[1]), "motcua_state_snapshots_total") > 0
        stack.enter_context(motcua("metrics", env_for(broker, issuer, ports[0]), ports[0],
                                   log_name="metrics-replica-a-restarted"))  # fmt: skip
        wait_both_match(ports, everything, headers, 90)
        # the restarted process read the latest snapshot and the changelog after it
        assert metric_total(url(ports[0]), "motcua_metrics_figures_from_snapshot") == 1
        info = [
            httpx.get(f"http://127.0.0.1:{p}/v1/metrics/info", headers=headers, timeout=10).json()
            for p in ports
        ]
        # the states held are the open dossiers, not every dossier seen
        assert all(0 <= i["dossiers_in_state"] < DOSSIERS for i in info), info
