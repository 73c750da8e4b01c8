"""A dossier whose story is over leaves postal (issue 15), against the real broker, Redis and the
VNPost sandbox over loopback HTTP: once its pickup is delivered and the grace has passed, its
state is tombstoned in the changelog and the live-states gauge drops; a restarted worker does not
restore it; and its late inputs book and publish nothing (`services/postal/domain.py`): its
`dossier.submitted` read again is ignored as `retired`, its `dossier.resolved` as `no_dossier`,
and a late carrier callback is alerted as `unknown_order`."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from services.common import topics
from services.common.kafka import ensure_topics
from services.common.signing import SIGNATURE_HEADER, sign_body
from services.common.topics import declared_topics
from services.dev.embedded import Broker
from tests.support.kafka import read_all
from tests.support.postal import (
    SECRET,
    Ports,
    dossier_id,
    postal_env,
    postal_events,
    postal_submitted,
    produce,
    resolved,
    sandbox,
    wait_until,
)
from tests.support.processes import motcua

pytestmark = pytest.mark.integration


def figures(ports: Ports) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample postal's `/metrics` shows, by name and labels."""
    text = httpx.get(f"{ports.postal_url}/metrics", timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def figure(ports: Ports, name: str, **labels: str) -> float:
    return figures(ports).get((name, tuple(sorted(labels.items()))), 0.0)


def live(ports: Ports) -> float:
    return figure(ports, "motcua_states_live", service="postal")


async def test_a_delivered_dossier_is_retired_and_its_late_inputs_book_nothing(
    broker: Broker, redis_url: str
) -> None:
    await ensure_topics(broker.bootstrap, declared_topics(4))
    ports = Ports()
    env = postal_env(
        broker,
        redis_url,
        f"motcua-test-{uuid.uuid4().hex[:10]}",
        ports,
        POSTAL_RETIRE_AFTER_SECONDS="2",
    )
    done, waiting = dossier_id(), dossier_id()
    done_submitted = postal_submitted(done, "pickup", street="1 Trần Phú [scenario:delivered]")
    with motcua("vnpost-sandbox", env, ports.sandbox, ready=False, log_name="vnpost-retire"):
        with motcua("postal", env, ports.postal, log_name="postal-retire"):
            # `waiting` asks for a return and is not resolved: its story goes on
            await produce(broker.bootstrap, [done_submitted, postal_submitted(waiting, "return")])
            assert wait_until(lambda: live(ports) == 2, 30, interval=0.2)

            def retired() -> bool:
                return figure(ports, "motcua_states_retired_total", service="postal") == 1

            assert wait_until(retired, 60, interval=0.2)
            assert live(ports) == 1
            seen = await postal_events(broker.bootstrap)
            assert seen.types(done, "pickup") == [
                "postal.pickup_requested",
                "postal.picked_up",
                "postal.delivered_to_agency",
            ]
            changelog = await read_all(broker.bootstrap, topics.POSTAL_STATE_CHANGELOG, idle=0.5)
            written = [r.value for r in changelog if r.key == done.encode()]
            assert written and all(written[:-1]) and not written[-1]  # states, then a tombstone
            assert [r.value for r in changelog if r.key == waiting.encode()][-1]
        orders = sandbox(ports.sandbox_url, "/sandbox/orders")
        order = next(o for o in orders if o["dossier_id"] == done)

        with motcua("postal", env, ports.postal, log_name="postal-retire-restarted"):
            assert live(ports) == 1  # restored: `waiting` only
            alerts_before = figure(ports, "motcua_postal_alerts_total", kind="unknown_order")
            # history read again (recorded an hour ago), a resent resolution, a late COD report
            an_hour_ago = int((time.time() - 3600) * 1000)
            await produce(broker.bootstrap, [resolved(done)])
            await _produce_at(broker.bootstrap, done_submitted, an_hour_ago)
            body = orjson.dumps(
                {
                    "order_id": order["order_id"],
                    "client_order_id": order["client_order_id"],
                    "status_code": 21,
                    "status_time": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime()),
                    "cod_amount": 50_000,
                }
            )
            headers = {
                "content-type": "application/json",
                SIGNATURE_HEADER: sign_body(body, SECRET),
            }
            answer = httpx.post(
                f"{ports.postal_url}/v1/webhooks/postal/vnpost", content=body, headers=headers
            )
            assert answer.status_code < 300

            def all_handled() -> bool:
                return (
                    figure(ports, "motcua_postal_ignored_total", reason="retired") == 1
                    and figure(ports, "motcua_postal_ignored_total", reason="no_dossier") == 1
                    and figure(ports, "motcua_postal_alerts_total", kind="unknown_order")
                    == alerts_before + 1
                )

            assert wait_until(all_handled, 30, interval=0.2)
            assert live(ports) == 1
            bookings = sandbox(ports.sandbox_url, "/sandbox/bookings")
            assert bookings["orders"][done] == 1 and bookings["create_requests"][done] == 1
            after = await postal_events(broker.bootstrap)
            assert after.types(done, "pickup") == seen.types(done, "pickup")


async def _produce_at(bootstrap: str, event: dict[str, Any], timestamp_ms: int) -> None:
    """`event` on `dossier.events` as if it had been written at `timestamp_ms`."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(
            topics.DOSSIER_EVENTS,
            value=orjson.dumps(event),
            key=event["subject"].encode(),
            timestamp_ms=timestamp_ms,
        )
    finally:
        await producer.stop()
