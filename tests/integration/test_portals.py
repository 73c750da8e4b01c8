"""The portals service end to end (CONTRACT section 9): the real broker, a real portals process
(SIGKILLed on purpose once), the portal sandbox over loopback HTTP verifying every signature,
with a short retry schedule (`PORTALS_RETRY_SECONDS`)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest

from services.common.kafka import ensure_topics
from services.common.topics import AUDIT_EVENTS, PORTALS_CALLBACKS, declared_topics, dlq
from services.dev.embedded import Broker, free_port, terminate_group
from tests.conftest import OTHER_KEY, PORTAL_KEY, service_env
from tests.support.factories import envelope, submitted
from tests.support.kafka import produce, read_all
from tests.support.operators import Issuer
from tests.support.processes import LOG_DIR, LOGS, motcua, process, until, wait_http

pytestmark = pytest.mark.integration

# 1 + 3 attempts: the waits are short enough for a test and long enough to SIGKILL between.
RETRY_SECONDS = "1,3,3"
ATTEMPTS = 4


def auth(key: str = PORTAL_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Stack:
    def __init__(self, env: dict[str, str], port: int, sandbox: str, bootstrap: str) -> None:
        self.env = env
        self.url = f"http://127.0.0.1:{port}"
        self.sandbox = sandbox
        self.bootstrap = bootstrap
        self.worker: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        path = LOG_DIR / "portals.log"
        with path.open("ab") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "services.cli", "run", "portals"],
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        LOGS[self.worker.pid] = path
        wait_http(f"{self.url}/readyz", timeout=90, proc=self.worker)

    def kill(self) -> None:
        assert self.worker is not None
        os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.wait()

    def stop(self) -> None:
        if self.worker is not None:
            terminate_group(self.worker, timeout=10)

    def faults(self, **faults: Any) -> None:
        httpx.put(f"{self.sandbox}/v1/faults", json=faults, timeout=5).raise_for_status()

    def received(self, delivery_id: str) -> dict[str, Any] | None:
        answer = httpx.get(f"{self.sandbox}/v1/received/{delivery_id}", timeout=5)
        return answer.json() if answer.status_code == 200 else None

    def deliveries(self, status: str | None = None, key: str = PORTAL_KEY) -> list[dict[str, Any]]:
        params = {"status": status} if status else {}
        answer = httpx.get(f"{self.url}/v1/deliveries", params=params, headers=auth(key), timeout=5)
        answer.raise_for_status()
        deliveries: list[dict[str, Any]] = answer.json()["deliveries"]
        return deliveries

    def delivery(self, delivery_id: str) -> dict[str, Any] | None:
        return next((d for d in self.deliveries() if d["id"] == delivery_id), None)

    def send(self, *events: dict[str, Any]) -> None:
        by_topic: dict[str, list[tuple[bytes | None, bytes]]] = {}
        for event in events:
            topic = {"payment": "payment.events", "postal": "postal.events", "sms": "sms.events"}
            name = topic.get(event["type"].partition(".")[0], "dossier.events")
            by_topic.setdefault(name, []).append((event["subject"].encode(), orjson.dumps(event)))
        for name, records in by_topic.items():
            asyncio.run(produce(self.bootstrap, name, records))


@pytest.fixture(scope="module")
def stack(broker: Broker, redis_url: str, issuer: Issuer) -> Iterator[Stack]:
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    port, sandbox_port = free_port(), free_port()
    env = service_env(
        broker,
        redis_url,
        f"motcua-test-portals-{uuid.uuid4().hex[:10]}",
        PORTALS_PORT=str(port),
        PORTAL_SANDBOX_PORT=str(sandbox_port),
        MOTCUA_ENV="dev",
        PORTALS_RETRY_SECONDS=RETRY_SECONDS,
        PORTALS_TIMEOUT_SECONDS="2",
        MOTCUA_DATA_DIR=tempfile.mkdtemp(prefix="motcua-portals-test-"),
        MOTCUA_OIDC_ISSUER=issuer.url,
    )
    sandbox = f"http://127.0.0.1:{sandbox_port}"
    with process(["services.cli", "run", "portal-sandbox"], env, "portal-sandbox") as proc:
        wait_http(f"{sandbox}/healthz", timeout=30, proc=proc)
        s = Stack(env, port, sandbox, broker.bootstrap)
        s.start()
        try:
            answer = httpx.post(
                f"{sandbox}/v1/subscribe",
                json={"portals_url": s.url, "portal_key": PORTAL_KEY},
                timeout=15,
            )
            assert answer.status_code == 200, answer.text
            yield s
        finally:
            s.stop()


def dossier(tag: str) -> str:
    return f"000.00.12.H34-{tag}-{uuid.uuid4().hex[:6]}"


def now() -> str:
    return datetime.now(UTC).isoformat()


def payment(dossier_id: str, kind: str = "payment.succeeded") -> dict[str, Any]:
    return envelope(
        kind,
        dossier_id,
        {"amount_vnd": 150000},
        source="motcua/payments",
        event_id=f"pay-{uuid.uuid4().hex[:10]}",
        time=now(),
    )


def test_delivery_with_a_valid_signature_and_the_dossier_status(stack: Stack) -> None:
    stack.faults()
    d = dossier("sig")
    paid = payment(d)
    sms = envelope(
        "sms.sent",
        d,
        {"template": "payment_succeeded", "segments": 1, "provider": "primary"},
        source="motcua/sms",
        event_id=f"sms-{uuid.uuid4().hex[:10]}",
        time=now(),
    )
    stack.send(submitted(d), paid, sms)
    until(lambda: (stack.received(paid["id"]) or {}).get("accepted", False), "payment delivered")
    until(lambda: (stack.received(sms["id"]) or {}).get("accepted", False), "sms delivered")
    got = stack.received(paid["id"])
    assert got is not None
    assert [a["verified"] for a in got["attempts"]] == [True]
    assert orjson.loads(got["body"]) == paid  # the CloudEvent as it was published
    until(
        lambda: (stack.delivery(paid["id"]) or {}).get("status") == "delivered", "logged delivered"
    )
    logged = stack.delivery(paid["id"])
    assert logged == {
        "id": paid["id"],
        "type": "payment.succeeded",
        "dossier_id": d,
        "status": "delivered",
        "attempts": 1,
        "last_status_code": 200,
        "next_attempt_at": None,
    }
    status = httpx.get(f"{stack.url}/v1/dossiers/{d}", headers=auth(), timeout=5).json()
    assert set(status) == {
        "dossier_id",
        "status",
        "payment",
        "postal",
        "sms",
        "overdue",
        "updated_at",
    }
    assert status["status"] == "submitted"
    assert status["payment"]["state"] == "succeeded"
    assert status["payment"]["amount_vnd"] == 150000
    assert status["postal"] == []
    assert status["sms"] == [{"template": "payment_succeeded", "state": "sent", "at": sms["time"]}]
    assert status["overdue"] is False


def test_fails_twice_then_succeeds_on_the_third_attempt_with_the_same_id(stack: Stack) -> None:
    stack.faults(fail_next=2, fail_status=500)
    d = dossier("twice")
    paid = payment(d)
    stack.send(submitted(d), paid)
    until(
        lambda: (stack.received(paid["id"]) or {}).get("accepted", False),
        "delivered on the third attempt",
        timeout=60,
    )
    got = stack.received(paid["id"])
    assert got is not None
    # every attempt carried the same X-Motcua-Delivery: the sandbox keys what it got by it
    assert [a["answered"] for a in got["attempts"]] == [500, 500, 200]
    assert all(a["verified"] for a in got["attempts"])
    until(lambda: (stack.delivery(paid["id"]) or {}).get("status") == "delivered", "logged")
    assert (stack.delivery(paid["id"]) or {})["attempts"] == 3


def test_down_for_the_whole_schedule_is_failed_with_a_dead_letter(stack: Stack) -> None:
    stack.faults(down=True)
    d = dossier("down")
    paid = payment(d)
    stack.send(submitted(d), paid)
    until(
        lambda: (stack.delivery(paid["id"]) or {}).get("status") == "failed",
        "given up",
        timeout=90,
    )
    logged = stack.delivery(paid["id"])
    assert logged is not None
    assert logged["attempts"] == ATTEMPTS
    assert logged["last_status_code"] == 503
    assert logged["next_attempt_at"] is None
    assert [d["id"] for d in stack.deliveries("failed")].count(paid["id"]) == 1
    got = stack.received(paid["id"])
    assert got is not None and len(got["attempts"]) == ATTEMPTS
    letters = asyncio.run(read_all(stack.bootstrap, dlq(PORTALS_CALLBACKS), idle=2.0))
    mine = [r for r in letters if dict(r.headers).get("delivery_id") == paid["id"].encode()]
    assert len(mine) == 1
    headers = dict(mine[0].headers)
    assert headers["error_type"] == b"DeliveryGivenUp"
    assert headers["attempts"] == str(ATTEMPTS).encode()
    assert b"given up after 4 attempts" in headers["error"]
    assert orjson.loads(mine[0].value) == paid

    # redelivered by hand once the portal is back: a new series, the same delivery id
    stack.faults()
    answer = httpx.post(f"{stack.url}/v1/deliveries/{paid['id']}/redeliver", headers=auth())
    assert answer.status_code == 202
    until(lambda: (stack.delivery(paid["id"]) or {}).get("status") == "delivered", "redelivered")
    got = stack.received(paid["id"])
    assert got is not None and got["accepted"] and len(got["attempts"]) == ATTEMPTS + 1


@pytest.mark.chaos
def test_sigkill_mid_schedule_loses_no_retry(stack: Stack) -> None:
    stack.faults(down=True)
    d = dossier("kill")
    paid = payment(d)
    stack.send(submitted(d), paid)
    until(
        lambda: (stack.delivery(paid["id"]) or {}).get("attempts", 0) >= 1,
        "a first attempt failed",
    )
    stack.kill()
    stack.faults()  # the portal is back while the worker is dead
    stack.start()
    until(
        lambda: (stack.delivery(paid["id"]) or {}).get("status") == "delivered",
        "the pending retry made after the restart",
        timeout=90,
    )
    got = stack.received(paid["id"])
    assert got is not None and got["accepted"]
    assert got["attempts"][-1]["answered"] == 200
    assert len(got["attempts"]) >= 2


def test_another_portal_sees_404(stack: Stack) -> None:
    stack.faults()
    d = dossier("mine")
    paid = payment(d)
    stack.send(submitted(d), paid)
    until(lambda: (stack.delivery(paid["id"]) or {}).get("status") == "delivered", "delivered")
    own = httpx.get(f"{stack.url}/v1/dossiers/{d}", headers=auth(), timeout=5)
    assert own.status_code == 200
    other = httpx.get(f"{stack.url}/v1/dossiers/{d}", headers=auth(OTHER_KEY), timeout=5)
    assert other.status_code == 404
    assert other.headers["content-type"].startswith("application/problem+json")
    redeliver = httpx.post(
        f"{stack.url}/v1/deliveries/{paid['id']}/redeliver", headers=auth(OTHER_KEY), timeout=5
    )
    assert redeliver.status_code == 404
    assert paid["id"] not in {x["id"] for x in stack.deliveries(key=OTHER_KEY)}
    assert httpx.get(f"{stack.url}/v1/dossiers/{d}", timeout=5).status_code == 401
    assert httpx.get(f"{stack.url}/v1/deliveries", timeout=5).status_code == 401


def test_subscription_put_get_delete_and_url_rules(stack: Stack) -> None:
    url = f"{stack.url}/v1/subscription"
    refused = {
        "https://10.1.2.3/cb": "private",
        "https://169.254.169.254/latest/meta-data": "metadata",
        "https://[fe80::1]/cb": "link-local",
        "https://[fd12:3456::1]/cb": "unique-local",
        "http://93.184.216.34/cb": "loopback",  # http only to loopback in dev
        "ftp://portal.example/cb": "https",
        "https://user:pw@portal.example/cb": "credentials",
    }
    for target, named in refused.items():
        answer = httpx.put(
            url, json={"url": target, "types": ["payment.*"]}, headers=auth(OTHER_KEY)
        )
        assert answer.status_code == 422, target
        assert named in answer.json()["detail"], (target, answer.json())
    bad_types = httpx.put(
        url,
        json={"url": "http://127.0.0.1:9/cb", "types": ["dossier.received"]},
        headers=auth(OTHER_KEY),
    )
    assert bad_types.status_code == 422
    assert bad_types.json()["errors"][0]["pointer"] == "/types/0"

    first = httpx.put(
        url, json={"url": "http://127.0.0.1:9/cb", "types": ["payment.*"]}, headers=auth(OTHER_KEY)
    )
    assert first.status_code == 200
    second = httpx.put(
        url, json={"url": "http://localhost:9/cb", "types": ["sms.failed"]}, headers=auth(OTHER_KEY)
    )
    assert second.status_code == 200
    assert second.json()["secret"] != first.json()["secret"]
    shown = httpx.get(url, headers=auth(OTHER_KEY)).json()
    assert shown == {"url": "http://localhost:9/cb", "types": ["sms.failed"]}
    assert httpx.delete(url, headers=auth(OTHER_KEY)).status_code == 204
    assert httpx.get(url, headers=auth(OTHER_KEY)).status_code == 404
    assert (
        httpx.put(url, json={"url": "http://127.0.0.1:9/cb", "types": ["sms.*"]}).status_code == 401
    )


def subscription_changes(bootstrap: str, actor: str) -> list[dict[str, Any]]:
    """The `audit.subscription_change` events on `audit.events` whose actor is `actor`."""
    records = asyncio.run(read_all(bootstrap, AUDIT_EVENTS, idle=1.0))
    events = [orjson.loads(r.value) for r in records]
    return [
        e
        for e in events
        if e["type"] == "audit.subscription_change" and e["data"]["actor"] == actor
    ]


def test_an_admin_manages_any_portals_subscription_audited(stack: Stack, issuer: Issuer) -> None:
    """CONTRACT section 8: an admin lists, reads, puts and deletes the subscription of any
    portal; the secret of an admin's put signs the next delivery; each change is one
    `audit.subscription_change` (actor the token's `sub`), and a portal's own put is one too
    (actor its source)."""
    stack.faults()
    actor = f"subscriptions-admin-{uuid.uuid4().hex[:6]}"
    admin = issuer.headers("admin", sub=actor)
    base = f"{stack.url}/v1/admin/subscriptions"
    one = f"{base}/portal/test"  # the source's slash stays in the path
    target = f"{stack.sandbox}/callbacks/by-admin"
    body = {"url": target, "types": ["payment.*"]}
    for method, url, sent in [
        ("GET", base, None),
        ("GET", one, None),
        ("PUT", one, body),
        ("DELETE", one, None),
    ]:
        anonymous = httpx.request(method, url, json=sent, timeout=10)
        assert anonymous.status_code == 401, (method, url, anonymous.text)
        assert anonymous.headers["www-authenticate"].startswith("Bearer")
        portal = httpx.request(method, url, json=sent, headers=auth(), timeout=10)
        assert portal.status_code == 401, (method, url)  # a portal key is no operator's token
        for role in ("viewer", "finance"):
            refused = httpx.request(method, url, json=sent, headers=issuer.headers(role))
            assert refused.status_code == 403, (method, url, role, refused.text)
            assert refused.headers["content-type"] == "application/problem+json"
    own_before = len(subscription_changes(stack.bootstrap, "portal/test"))

    put = httpx.put(one, json=body, headers=admin, timeout=15)
    assert put.status_code == 200, put.text
    secret = put.json()["secret"]
    assert put.json() == {"url": target, "types": ["payment.*"], "secret": secret}
    shown = httpx.get(one, headers=admin, timeout=10).json()
    assert {k: shown[k] for k in ("source", "url", "types")} == {
        "source": "portal/test",
        "url": target,
        "types": ["payment.*"],
    }
    assert "secret" not in shown
    listed = httpx.get(base, headers=admin, timeout=10).json()["subscriptions"]
    assert [s for s in listed if s["source"] == "portal/test"] == [shown]
    assert all("secret" not in s for s in listed)
    assert secret not in httpx.get(base, headers=admin, timeout=10).text
    # the portal sees what the admin put
    own = httpx.get(f"{stack.url}/v1/subscription", headers=auth(), timeout=10)
    assert own.json() == {"url": target, "types": ["payment.*"]}

    # the secret the admin was given signs the next delivery (the portal knows only that one)
    httpx.put(f"{stack.sandbox}/v1/secrets", json={"secrets": [secret]}, timeout=5)
    d = dossier("admin")
    paid = payment(d)
    stack.send(submitted(d), paid)
    until(lambda: (stack.received(paid["id"]) or {}).get("accepted", False), "delivered")
    got = stack.received(paid["id"])
    assert got is not None and [a["verified"] for a in got["attempts"]] == [True]

    # not a portal's source: refused, nothing written
    for source in ("motcua/payments", "-bad"):
        refused = httpx.put(f"{base}/{source}", json=body, headers=admin, timeout=10)
        assert refused.status_code == 422, (source, refused.text)
    invalid = httpx.put(one, json={"url": "https://10.1.2.3/cb", "types": ["sms.*"]}, headers=admin)
    assert invalid.status_code == 422 and "private" in invalid.json()["detail"]

    assert httpx.delete(one, headers=admin, timeout=10).status_code == 204
    assert httpx.get(f"{stack.url}/v1/subscription", headers=auth()).status_code == 404
    assert httpx.get(one, headers=admin, timeout=10).status_code == 404
    assert all(
        s["source"] != "portal/test" for s in httpx.get(base, headers=admin).json()["subscriptions"]
    )

    changes = subscription_changes(stack.bootstrap, actor)
    assert len(changes) == 2, changes  # the put and the delete; no refusal is a change
    for event in changes:
        assert event["subject"] == "portal/test"
        assert event["data"]["target"] == "portal/test"
        assert event["data"]["roles"] == ["admin"]
        assert event["data"]["outcome"] == "succeeded"
        assert secret not in orjson.dumps(event).decode()
        assert "by-admin" not in orjson.dumps(event).decode()  # nor the URL

    # the portal subscribes itself again (the fixture's subscription): one event, its source
    answer = httpx.post(
        f"{stack.sandbox}/v1/subscribe",
        json={"portals_url": stack.url, "portal_key": PORTAL_KEY},
        timeout=15,
    )
    assert answer.status_code == 200, answer.text
    own_changes = subscription_changes(stack.bootstrap, "portal/test")
    assert len(own_changes) == own_before + 1
    assert own_changes[-1]["data"]["roles"] == []


def test_outside_dev_a_name_resolving_to_loopback_is_refused(redis_url: str) -> None:
    """With MOTCUA_ENV other than dev, `localhost` (a DNS name resolving to 127.0.0.1) and
    http are refused; the check is on the resolved address, not the name."""
    broker = Broker(port=free_port()).start()
    try:
        asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
        port = free_port()
        env = service_env(
            broker,
            redis_url,
            f"motcua-test-portals-{uuid.uuid4().hex[:10]}",
            PORTALS_PORT=str(port),
            MOTCUA_ENV="production",
            MOTCUA_DATA_DIR=tempfile.mkdtemp(prefix="motcua-portals-prod-"),
        )
        with motcua("portals", env, port, log_name="portals-production"):
            url = f"http://127.0.0.1:{port}/v1/subscription"
            for target, named in {
                "https://localhost/cb": "resolves to 127.0.0.1, a loopback address",
                "https://127.0.0.1/cb": "is a loopback address",
                "http://localhost/cb": "https",
            }.items():
                answer = httpx.put(url, json={"url": target, "types": ["sms.*"]}, headers=auth())
                assert answer.status_code == 422, target
                assert named in answer.json()["detail"], (target, answer.json())
    finally:
        broker.stop()
