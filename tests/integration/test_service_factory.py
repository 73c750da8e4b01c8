"""The common service factory against the real broker: poison messages go to the DLQ (CloudEvents
and an internal raw topic read by the same batch consumer), the worker keeps consuming, and
health, readiness and Prometheus are served on the worker's loop."""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import redis

from services.common.kafka import ensure_topics
from services.common.topics import declared_topics
from services.dev.embedded import Broker, free_port
from tests.conftest import service_env
from tests.support.kafka import produce, read_all
from tests.support.poison import assert_dead_letters, poison_mix
from tests.support.processes import process, wait_http

pytestmark = pytest.mark.integration


def wait_recorded(client: redis.Redis, key: str, want: set[str], timeout: float = 60) -> set[str]:
    deadline = time.monotonic() + timeout
    got: set[str] = set()
    while time.monotonic() < deadline:
        got = {v.decode() if isinstance(v, bytes) else v for v in client.lrange(key, 0, -1)}
        if want <= got:
            return got
        time.sleep(0.2)
    return got


async def test_poison_messages_are_dead_lettered_and_the_worker_keeps_going(
    broker: Broker, redis_url: str, namespace: str
) -> None:
    await ensure_topics(broker.bootstrap, declared_topics(4))
    port = free_port()
    env = service_env(broker, redis_url, namespace, METRICS_PORT=str(port))
    mix = poison_mix()
    with process(["tests.support.recorder"], env, "recorder") as recorder:
        wait_http(f"http://127.0.0.1:{port}/readyz", timeout=90, proc=recorder)
        await produce(broker.bootstrap, "dossier.events", mix.messages)

        client = redis.Redis.from_url(redis_url)
        recorded = wait_recorded(client, f"{namespace}:recorded", set(mix.good_ids))
        assert mix.good_ids <= recorded
        assert mix.failing_id not in recorded

        dead = await read_all(broker.bootstrap, "dossier.events.dlq", expect=3, timeout=30)
        assert_dead_letters(dead, mix)

        # Internal (non-CloudEvents) topics: a PoisonMessage is dead-lettered without retries.
        await produce(broker.bootstrap, "postal.callbacks", [(b"D-1", b"garbage"), (b"D-1", b"{}")])
        assert wait_recorded(client, f"{namespace}:raw", {"{}"}) == {"{}"}
        [raw_dead] = await read_all(broker.bootstrap, "postal.callbacks.dlq", expect=1, timeout=30)
        assert raw_dead.value == b"garbage"
        assert dict(raw_dead.headers)["attempts"] == b"1"
        assert dict(raw_dead.headers)["error_type"] == b"PoisonMessage"

        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/healthz").status_code == 200
        metrics = httpx.get(f"{base}/metrics").text
        assert 'motcua_dead_lettered_total{error_type="InvalidEvent"' in metrics
        assert "motcua_ready 1.0" in metrics  # what the MotcuaNotReady alert reads
        ready: Any = httpx.get(f"{base}/readyz").json()
        assert ready["status"] == "ready"
