"""Two portals processes in one group (CONTRACT section 11): each consumes part of the
partitions, and each answers every portal's dossiers and deliveries alike."""

from __future__ import annotations

import asyncio
import tempfile
import uuid
from contextlib import ExitStack
from datetime import UTC, datetime

import httpx
import orjson
import pytest

from services.common.kafka import ensure_topics
from services.common.topics import declared_topics
from services.dev.embedded import Broker, free_port
from tests.conftest import OTHER_KEY, PORTAL_KEY, service_env
from tests.support.factories import envelope, submitted
from tests.support.kafka import produce
from tests.support.processes import motcua, until

pytestmark = pytest.mark.integration


def test_every_process_answers_every_dossier(broker: Broker, redis_url: str) -> None:
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    ports = [free_port(), free_port()]
    base = service_env(
        broker,
        redis_url,
        f"motcua-test-portals-{uuid.uuid4().hex[:10]}",
        MOTCUA_ENV="dev",
        PORTALS_RETRY_SECONDS="3600",
    )
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    auth = {"Authorization": f"Bearer {PORTAL_KEY}"}
    with ExitStack() as stack:
        for n, port in enumerate(ports):
            env = {
                **base,
                "PORTALS_PORT": str(port),
                "MOTCUA_DATA_DIR": tempfile.mkdtemp(prefix=f"motcua-portals-{n}-"),
            }
            stack.enter_context(motcua("portals", env, port, log_name=f"portals-{n}"))
        # nothing answers on port 9: every delivery stays pending, retried in an hour
        answer = httpx.put(
            f"{urls[0]}/v1/subscription",
            json={"url": "http://127.0.0.1:9/callbacks", "types": ["payment.*"]},
            headers=auth,
        )
        assert answer.status_code == 200
        until(
            lambda: httpx.get(f"{urls[1]}/v1/subscription", headers=auth).status_code == 200,
            "the other process read the subscription",
        )
        now = datetime.now(UTC).isoformat()
        dossiers = [f"000.00.12.H34-REP-{i:03d}-{uuid.uuid4().hex[:4]}" for i in range(12)]
        events = [
            *(submitted(d) for d in dossiers),
            *(
                envelope(
                    "payment.requested", d, {"amount_vnd": 1000}, source="motcua/payments", time=now
                )
                for d in dossiers
            ),
        ]
        by_topic: dict[str, list[tuple[bytes | None, bytes]]] = {}
        for e in events:
            topic = "payment.events" if e["type"].startswith("payment.") else "dossier.events"
            by_topic.setdefault(topic, []).append((e["subject"].encode(), orjson.dumps(e)))
        for topic, records in by_topic.items():
            asyncio.run(produce(broker.bootstrap, topic, records))

        def everywhere() -> bool:
            for url in urls:
                for d in dossiers:
                    status = httpx.get(f"{url}/v1/dossiers/{d}", headers=auth, timeout=5)
                    if status.status_code != 200 or status.json()["payment"] is None:
                        return False
            return True

        until(everywhere, "both processes answer for every dossier", timeout=90)

        def logs() -> list[set[str]]:
            return [
                {
                    d["dossier_id"]
                    for d in httpx.get(f"{url}/v1/deliveries", headers=auth).json()["deliveries"]
                }
                for url in urls
            ]

        until(lambda: all(log == set(dossiers) for log in logs()), "both logs hold every delivery")
        other = {"Authorization": f"Bearer {OTHER_KEY}"}
        for url in urls:
            assert httpx.get(f"{url}/v1/dossiers/{dossiers[0]}", headers=other).status_code == 404
