"""Intake against the real Tansu broker and the real Redis, over real HTTP (CONTRACT section 4)."""

from __future__ import annotations

import copy
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from services.common.events import decode_event
from services.dev.embedded import Broker, free_port
from tests.conftest import OTHER_KEY, PORTAL_KEY, portals_env, service_env
from tests.support.factories import envelope, submitted
from tests.support.kafka import read_all
from tests.support.processes import motcua
from tests.support.redis_keys import delete_namespace

pytestmark = pytest.mark.integration


class Intake:
    def __init__(self, port: int, topic_owner: Broker) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.broker = topic_owner

    def post(self, body: Any, key: str | None = PORTAL_KEY, **kw: Any) -> httpx.Response:
        headers = {"content-type": "application/json"}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        content = body if isinstance(body, bytes) else orjson.dumps(body)
        return httpx.post(
            f"{self.url}/v1/events", content=content, headers=headers, timeout=30, **kw
        )


@pytest.fixture(scope="module")
def intake(broker: Broker, redis_url: str) -> Iterator[Intake]:
    """One intake for the module's tests (each posts events of its own ids)."""
    namespace = f"motcua-test-{uuid.uuid4().hex[:10]}"
    port = free_port()
    env = service_env(broker, redis_url, namespace, INTAKE_PORT=str(port))
    with motcua("intake", env, port):
        yield Intake(port, broker)
    delete_namespace(redis_url, namespace)


async def dossier_records(broker: Broker, ids: set[str]) -> list[Any]:
    records = await read_all(broker.bootstrap, "dossier.events", idle=1.5)
    return [r for r in records if decode_event(r.value).id in ids]


async def test_events_arrive_on_dossier_events_keyed_by_dossier_id(intake: Intake) -> None:
    batch = [submitted(), submitted(), submitted()]
    response = intake.post(batch)
    assert response.status_code == 202
    assert response.json() == {"accepted": 3, "duplicates": 0}

    records = await dossier_records(intake.broker, {e["id"] for e in batch})
    assert len(records) == 3
    for record in records:
        event = decode_event(record.value)
        assert record.key == event.subject.encode()
        assert event.type == "dossier.submitted"
    assert {decode_event(r.value).to_dict()["data"]["dossier_id"] for r in records} == {
        e["subject"] for e in batch
    }


async def test_resend_is_a_duplicate_and_changed_content_is_409(intake: Intake) -> None:
    event = submitted()
    assert intake.post(event).json() == {"accepted": 1, "duplicates": 0}
    # Same content, other key order and whitespace: still the same event.
    reordered = orjson.dumps(dict(reversed(list(event.items()))), option=orjson.OPT_INDENT_2)
    assert intake.post(reordered).json() == {"accepted": 0, "duplicates": 1}

    changed = copy.deepcopy(event)
    changed["data"]["fee"]["amount_vnd"] = 1
    response = intake.post(changed)
    assert response.status_code == 409
    assert response.headers["content-type"].startswith("application/problem+json")
    assert response.json()["errors"][0]["pointer"] == "/id"

    records = await dossier_records(intake.broker, {event["id"]})
    assert len(records) == 1


async def test_duplicates_within_one_batch_count_once(intake: Intake) -> None:
    event = submitted()
    response = intake.post([event, event, submitted()])
    assert response.json() == {"accepted": 2, "duplicates": 1}


async def test_invalid_batch_names_each_bad_event_and_publishes_nothing(intake: Intake) -> None:
    good = submitted()
    bad_tier = submitted(tier="galaxy")
    naive_time = submitted(submitted_at="2019-03-04T08:15:00")
    wrong_subject = submitted()
    wrong_subject["subject"] = "someone-else"
    unknown = envelope("dossier.teleported", "D-1", {})
    response = intake.post([good, bad_tier, naive_time, wrong_subject, unknown])

    assert response.status_code == 422
    assert response.headers["content-type"].startswith("application/problem+json")
    problem = response.json()
    assert problem["status"] == 422
    found = {(e["index"], e["pointer"]) for e in problem["errors"]}
    assert found == {(1, "/data/tier"), (2, "/data/submitted_at"), (3, "/subject"), (4, "/type")}
    assert await dossier_records(intake.broker, {good["id"]}) == []


def test_malformed_json_and_oversized_bodies(intake: Intake) -> None:
    response = intake.post(b"{not json")
    assert response.status_code == 422
    assert response.json()["errors"][0]["detail"].startswith("malformed JSON")

    big = [submitted() for _ in range(1)]
    big[0]["data"]["padding"] = "x" * (1024 * 1024)
    assert intake.post(big).status_code == 413

    too_many = [submitted() for _ in range(501)]
    response = intake.post(too_many)
    assert response.status_code == 422
    assert "at most 500" in response.json()["detail"]


def test_keys_and_sources(intake: Intake) -> None:
    event = submitted()
    assert intake.post(event, key=None).status_code == 401
    assert intake.post(event, key="wrong").status_code == 401
    # The other portal's key is valid, but may publish only its own source.
    response = intake.post(event, key=OTHER_KEY)
    assert response.status_code == 403
    assert response.json()["errors"] == [
        {
            "index": 0,
            "pointer": "/source",
            "detail": "this key may publish only source 'portal/other'",
        }
    ]
    # A portal may not claim the overdue detection motcua does itself.
    overdue = envelope(
        "dossier.overdue",
        "D-9",
        {"due_at": "2019-03-04T17:00:00+07:00", "detected_at": "2019-03-05T08:00:00+07:00"},
    )
    assert intake.post(overdue).status_code == 422


def test_docs_openapi_health_metrics(intake: Intake) -> None:
    assert httpx.get(f"{intake.url}/docs").status_code == 200
    spec = httpx.get(f"{intake.url}/openapi.json").json()
    assert "/v1/events" in spec["paths"]
    assert httpx.get(f"{intake.url}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{intake.url}/readyz").status_code == 200
    intake.post(submitted())
    assert "motcua_intake_events_total" in httpx.get(f"{intake.url}/metrics").text


def test_rate_limit_answers_429_with_retry_after(
    broker: Broker, redis_url: str, namespace: str
) -> None:
    port = free_port()
    env = service_env(
        broker,
        redis_url,
        namespace,
        INTAKE_PORT=str(port),
        MOTCUA_PORTALS=portals_env(rate=1.0, burst=5),
    )
    with motcua("intake", env, port):
        client = Intake(port, broker)
        assert client.post([submitted() for _ in range(5)]).status_code == 202
        response = client.post([submitted() for _ in range(3)])
        assert response.status_code == 429
        assert int(response.headers["retry-after"]) >= 1


def test_dedupe_survives_an_intake_restart(broker: Broker, redis_url: str, namespace: str) -> None:
    port = free_port()
    env = service_env(broker, redis_url, namespace, INTAKE_PORT=str(port))
    event = submitted()
    with motcua("intake", env, port):
        assert Intake(port, broker).post(event).json() == {"accepted": 1, "duplicates": 0}
    with motcua("intake", env, port, log_name="intake-restarted"):
        assert Intake(port, broker).post(event).json() == {"accepted": 0, "duplicates": 1}


@pytest.mark.chaos
async def test_broker_down_is_503_and_a_retry_is_accepted_once(
    redis_url: str, namespace: str
) -> None:
    own_broker = Broker(port=free_port()).start()
    port = free_port()
    env = service_env(
        own_broker, redis_url, namespace, INTAKE_PORT=str(port), INTAKE_PUBLISH_TIMEOUT_SECONDS="3"
    )
    try:
        with motcua("intake", env, port, log_name="intake-broker-down"):
            client = Intake(port, own_broker)
            event = submitted()
            own_broker.stop()
            response = client.post(event)
            assert response.status_code == 503
            assert "nothing was accepted" in response.json()["detail"]

            own_broker.start()
            retried = client.post(event)
            assert retried.status_code == 202, retried.text
            assert retried.json() == {"accepted": 1, "duplicates": 0}
            assert client.post(event).json() == {"accepted": 0, "duplicates": 1}
            records = await dossier_records(own_broker, {event["id"]})
            assert len(records) == 1
    finally:
        own_broker.stop()
