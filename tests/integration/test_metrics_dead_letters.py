"""The operators' dead-letter endpoints of the metrics service (CONTRACT section 8) against the
real broker, `motcua run metrics` and tokens of the dev issuer: counts by error type without
copying, a replay that puts the dead letters back on their topic, and its audit event."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator

import httpx
import orjson
import pytest

from services.common.dlq import REPLAYED_HEADER
from services.common.kafka import ensure_topics
from services.common.topics import AUDIT_EVENTS, PAYMENT_CALLBACKS, declared_topics
from services.dev.embedded import Broker, free_port
from tests.support.kafka import produce, read_all
from tests.support.operators import Issuer
from tests.support.processes import motcua

# A topic the metrics service does not consume itself: the copies stay there to be read.
TOPIC = PAYMENT_CALLBACKS
PATH = f"/v1/admin/dead-letters/{TOPIC}"
ADMIN = "admin-of-the-test"


async def dead_letter(bootstrap: str, keys: range, error_type: str) -> None:
    await produce(
        bootstrap,
        f"{TOPIC}.dlq",
        [(f"D-{i}".encode(), f'{{"n": {i}}}'.encode()) for i in keys],
        headers=[("error_type", error_type.encode()), ("attempts", b"3")],
    )


@pytest.fixture(scope="module")
def metrics(broker: Broker, issuer: Issuer) -> Iterator[httpx.Client]:
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(2)))
    asyncio.run(dead_letter(broker.bootstrap, range(3), "InvalidEvent"))
    asyncio.run(dead_letter(broker.bootstrap, range(3, 5), "TimeoutError"))
    port = free_port()
    env = {
        "KAFKA_BOOTSTRAP": broker.bootstrap,
        "MOTCUA_TOPIC_PARTITIONS": "2",
        "METRICS_PORT": str(port),
        "MOTCUA_DATA_DIR": tempfile.mkdtemp(prefix="motcua-metrics-dlq-test-"),
        "MOTCUA_OIDC_ISSUER": issuer.url,
    }
    with (
        motcua("metrics", env, port, log_name="metrics-dead-letters"),
        httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
    ):
        yield client


def test_only_an_admin_sees_or_replays_dead_letters(metrics: httpx.Client, issuer: Issuer) -> None:
    for method, path in (("GET", PATH), ("POST", f"{PATH}/replay")):
        anonymous = metrics.request(method, path)
        assert anonymous.status_code == 401
        assert anonymous.headers["www-authenticate"].startswith("Bearer")
        for role in ("viewer", "finance"):
            refused = metrics.request(method, path, headers=issuer.headers(role))
            assert refused.status_code == 403
            assert refused.headers["content-type"] == "application/problem+json"


def test_an_unknown_topic_is_404(metrics: httpx.Client, issuer: Issuer) -> None:
    admin = issuer.headers("admin")
    for method, path in (
        ("GET", "/v1/admin/dead-letters/nothing.here"),
        ("POST", "/v1/admin/dead-letters/nothing.here/replay"),
        ("GET", f"/v1/admin/dead-letters/{AUDIT_EVENTS}"),
    ):
        response = metrics.request(method, path, headers=admin)
        assert response.status_code == 404, response.text
        assert response.headers["content-type"] == "application/problem+json"


def test_an_admin_counts_then_replays_and_the_replay_is_audited(
    metrics: httpx.Client, issuer: Issuer, broker: Broker
) -> None:
    admin = issuer.headers("admin", sub=ADMIN)
    expected = {"InvalidEvent": 3, "TimeoutError": 2}

    counted = metrics.get(PATH, headers=admin)
    assert counted.status_code == 200, counted.text
    assert counted.json() == {"topic": TOPIC, "dead_letters": 5, "by_error_type": expected}
    # counting copies nothing, and counts the same again
    assert metrics.get(PATH, headers=admin).json()["dead_letters"] == 5
    assert asyncio.run(read_all(broker.bootstrap, TOPIC, timeout=3.0)) == []

    replayed = metrics.post(f"{PATH}/replay", headers=admin)
    assert replayed.status_code == 200, replayed.text
    body = replayed.json()
    assert (body["dead_letters"], body["copied"], body["by_error_type"]) == (5, 5, expected)

    copies = asyncio.run(read_all(broker.bootstrap, TOPIC, expect=5))
    assert sorted((r.key, r.value) for r in copies) == [
        (f"D-{i}".encode(), f'{{"n": {i}}}'.encode()) for i in range(5)
    ]
    assert all(dict(r.headers)[REPLAYED_HEADER] == f"{TOPIC}.dlq".encode() for r in copies)

    # nothing is left to put back
    assert metrics.get(PATH, headers=admin).json()["dead_letters"] == 0

    audit = asyncio.run(read_all(broker.bootstrap, AUDIT_EVENTS, expect=1))
    assert len(audit) == 1
    event = orjson.loads(audit[0].value)
    assert event["type"] == "audit.dead_letter_replay"
    assert event["data"]["actor"] == ADMIN
    assert event["data"]["roles"] == ["admin"]
    assert event["data"]["action"] == "dead_letter_replay"
    assert event["data"]["target"] == TOPIC
    assert event["data"]["outcome"] == "succeeded"


def test_a_broker_away_is_503_with_retry_after(issuer: Issuer) -> None:
    own = Broker(port=free_port()).start()
    try:
        asyncio.run(ensure_topics(own.bootstrap, declared_topics(2)))
        port = free_port()
        env = {
            "KAFKA_BOOTSTRAP": own.bootstrap,
            "MOTCUA_TOPIC_PARTITIONS": "2",
            "METRICS_PORT": str(port),
            "MOTCUA_DATA_DIR": tempfile.mkdtemp(prefix="motcua-metrics-dlq-away-"),
            "MOTCUA_OIDC_ISSUER": issuer.url,
        }
        with (
            motcua("metrics", env, port, log_name="metrics-dead-letters-away"),
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client,
        ):
            own.stop()
            admin = issuer.headers("admin")
            for method, path in (("GET", PATH), ("POST", f"{PATH}/replay")):
                response = client.request(method, path, headers=admin)
                assert response.status_code == 503, response.text
                assert response.headers["retry-after"] == "5"
                assert response.headers["content-type"] == "application/problem+json"
    finally:
        own.stop()
