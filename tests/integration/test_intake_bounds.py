"""Intake refuses, over real HTTP, what a consumer could not handle: a body that is not JSON by
its Content-Type (415, before the body is read) and events out of bounds (422); nothing of such a
request reaches `dossier.events`."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from services.common.events import decode_event
from services.dev.embedded import Broker, free_port
from tests.conftest import PORTAL_KEY, service_env
from tests.support.factories import submitted
from tests.support.kafka import read_all
from tests.support.processes import motcua

pytestmark = pytest.mark.integration


@pytest.fixture
def intake(broker: Broker, redis_url: str, namespace: str) -> Iterator[str]:
    port = free_port()
    env = service_env(broker, redis_url, namespace, INTAKE_PORT=str(port))
    with motcua("intake", env, port):
        yield f"http://127.0.0.1:{port}"


def post(url: str, body: Any, content_type: str | None, key: str | None = PORTAL_KEY) -> Any:
    headers = {} if key is None else {"authorization": f"Bearer {key}"}
    if content_type is not None:
        headers["content-type"] = content_type
    return httpx.post(f"{url}/v1/events", content=orjson.dumps(body), headers=headers, timeout=30)


async def published(broker: Broker, ids: set[str]) -> list[str]:
    records = await read_all(broker.bootstrap, "dossier.events", idle=1.5)
    return [event_id for r in records if (event_id := decode_event(r.value).id) in ids]


async def test_a_body_not_json_by_its_content_type_is_415(intake: str, broker: Broker) -> None:
    refused = [submitted(), submitted()]
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        response = post(intake, refused, content_type)
        assert response.status_code == 415, content_type
        assert response.headers["content-type"].startswith("application/problem+json")
        problem = response.json()
        assert problem["status"] == 415
        assert problem["expected"] == [
            "application/json",
            "application/cloudevents+json",
            "application/cloudevents-batch+json",
        ]
        assert "application/json" in problem["detail"]
    # authentication comes first: no key is 401 whatever the body
    assert post(intake, refused, "text/plain", key=None).status_code == 401

    accepted = [submitted()]
    response = post(intake, accepted, "application/cloudevents-batch+json; charset=utf-8")
    assert response.status_code == 202
    assert response.json() == {"accepted": 1, "duplicates": 0}

    ids = {e["id"] for e in refused + accepted}
    assert await published(broker, ids) == [accepted[0]["id"]]

    spec = httpx.get(f"{intake}/openapi.json").json()
    assert "415" in spec["paths"]["/v1/events"]["post"]["responses"]


async def test_events_a_consumer_could_not_handle_are_422(intake: str, broker: Broker) -> None:
    good = submitted()
    year_9999 = submitted(time="9999-12-31T23:59:59+07:00")
    long_id = submitted("D" * 10_000)
    response = post(intake, [good, year_9999, long_id], "application/json")
    assert response.status_code == 422
    problem = response.json()
    found = {(e["index"], e["pointer"]) for e in problem["errors"]}
    assert {(1, "/time"), (2, "/data/dossier_id")} <= found
    assert all(e["index"] in (1, 2) for e in problem["errors"])
    ids = {good["id"], year_9999["id"], long_id["id"]}
    assert await published(broker, ids) == []
