"""The portals' routes (services/portals/routes.py) with a fake resolver and a fake publisher:
a subscription URL is checked on every address its host resolves to."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import orjson
from fastapi import FastAPI
from fastapi.testclient import TestClient

from services.common.audit import AuditRecorder
from services.common.service import allow_every_method
from services.common.settings import Portal, hash_key
from services.common.topics import AUDIT_EVENTS, PORTAL_SUBSCRIPTIONS, TopicSpec
from services.portals import routes
from services.portals.book import SubscriptionBook
from services.portals.view import StatesView

KEY = "route-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
DNS = {
    "portal.example": ["93.184.216.34"],
    "internal.example": ["93.184.216.34", "10.20.30.40"],
    "metadata.example": ["169.254.169.254"],
    "v6.example": ["fd00::5"],
}


class Portals:
    def find(self, key_sha256: str) -> Portal | None:
        if key_sha256 == hash_key(KEY):
            return Portal(source="portal/a", key_sha256=key_sha256)
        return None


class Publisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None]] = []

    async def publish(
        self,
        messages: Sequence[tuple[str, bytes | None, bytes | None]],
        *,
        headers: Mapping[str, bytes] | None = None,
        partition: int | None = None,
    ) -> None:
        self.sent.extend(messages)


async def resolver(host: str, port: int) -> list[str]:
    return DNS.get(host, [])


def client(dev: bool = False) -> tuple[TestClient, Publisher]:
    api = FastAPI()
    allow_every_method(api)  # as create_service installs it for every service
    publisher = Publisher()
    routes.register(
        api,
        portals=Portals(),
        book=SubscriptionBook("127.0.0.1:1"),
        states=StatesView("127.0.0.1:1", TopicSpec("x", 1, compacted=True)),
        publisher=publisher,  # type: ignore[arg-type]
        audit=AuditRecorder(publisher, "motcua/portals"),
        dev=dev,
        resolver=resolver,
    )
    return TestClient(api), publisher


def put(c: TestClient, url: str) -> Any:
    return c.put("/v1/subscription", json={"url": url, "types": ["payment.*"]}, headers=AUTH)


def test_names_resolving_to_internal_addresses_are_refused() -> None:
    c, publisher = client()
    for url, named in {
        "https://internal.example/cb": "internal.example resolves to 10.20.30.40, a private",
        "https://metadata.example/cb": "the cloud metadata address",
        "https://v6.example/cb": "unique-local",
        "https://nowhere.example/cb": "does not resolve",
    }.items():
        answer = put(c, url)
        assert answer.status_code == 422, url
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert named in answer.json()["detail"]
        assert answer.json()["errors"][0]["pointer"] == "/url"
    assert publisher.sent == []


def test_a_public_name_is_subscribed_with_a_fresh_secret_each_time() -> None:
    c, publisher = client()
    first, second = put(c, "https://portal.example/cb"), put(c, "https://portal.example/cb")
    assert first.status_code == second.status_code == 200
    assert first.json()["secret"] != second.json()["secret"]
    # each put is written, then recorded as one audit event
    assert [topic for topic, _, _ in publisher.sent] == [PORTAL_SUBSCRIPTIONS, AUDIT_EVENTS] * 2
    assert c.get("/v1/subscription", headers=AUTH).json() == {
        "url": "https://portal.example/cb",
        "types": ["payment.*"],
    }
    assert c.delete("/v1/subscription", headers=AUTH).status_code == 204
    assert publisher.sent[-2] == (PORTAL_SUBSCRIPTIONS, b"portal/a", None)  # a tombstone
    audited = [orjson.loads(value or b"") for topic, _, value in publisher.sent[1::2]]
    assert [topic for topic, _, _ in publisher.sent[1::2]] == [AUDIT_EVENTS] * 3
    for event in audited:  # the portal's own changes: actor its source, no role, no secret
        assert event["type"] == "audit.subscription_change"
        assert {k: event["data"][k] for k in ("actor", "roles", "target", "outcome")} == {
            "actor": "portal/a",
            "roles": [],
            "target": "portal/a",
            "outcome": "succeeded",
        }
        assert first.json()["secret"] not in orjson.dumps(event).decode()
        assert "portal.example" not in orjson.dumps(event).decode()


def test_bad_bodies_and_keys() -> None:
    c, _ = client()
    assert c.put("/v1/subscription", content=b"{", headers=AUTH).status_code == 422
    assert put(c, "https://portal.example/cb").status_code == 200
    wrong = {"Authorization": "Bearer nope"}
    assert c.get("/v1/subscription", headers=wrong).status_code == 401
    assert c.get("/v1/deliveries?status=lost", headers=AUTH).status_code == 422
    assert c.get("/v1/deliveries?limit=0", headers=AUTH).status_code == 422
    assert c.get("/v1/deliveries", headers=AUTH).json() == {"deliveries": []}
    assert c.post("/v1/deliveries/ev-1/redeliver", headers=AUTH).status_code == 404
    assert c.get("/v1/dossiers/D-1", headers=AUTH).status_code == 404
    assert c.post("/v1/subscription", headers=AUTH).headers["allow"] == "DELETE, GET, PUT"
