"""Helpers for the postal integration tests: the env, dossier events, reading `postal.events`."""

from __future__ import annotations

import asyncio
import itertools
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaProducer

from services.common.events import decode_event
from services.common.kafka import ensure_topics
from services.common.topics import declared_topics
from services.dev.embedded import Broker, free_port
from tests.conftest import service_env
from tests.support.factories import envelope, submitted
from tests.support.kafka import read_all
from tests.support.processes import process, wait_http
from tests.support.redis_keys import delete_namespace

SECRET = "test-vnpost-secret"
OLD_SECRET = "test-vnpost-old-secret"
_run = uuid.uuid4().hex[:6]
_n = itertools.count(1)


@dataclass
class Ports:
    postal: int = field(default_factory=free_port)
    sandbox: int = field(default_factory=free_port)

    @property
    def postal_url(self) -> str:
        return f"http://127.0.0.1:{self.postal}"

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.sandbox}"


def postal_env(
    broker: Broker, redis_url: str, namespace: str, ports: Ports, **extra: str
) -> dict[str, str]:
    """Fast timers: sandbox steps of 0.25 s, stale query after 2 s, give up after 8 s."""
    fast = {
        "POSTAL_PORT": str(ports.postal),
        "VNPOST_SANDBOX_PORT": str(ports.sandbox),
        "VNPOST_URL": ports.sandbox_url,
        "POSTAL_PUBLIC_URL": ports.postal_url,
        "VNPOST_SECRETS": f"{SECRET},{OLD_SECRET}",
        "MOTCUA_DATA_DIR": tempfile.mkdtemp(prefix="motcua-postal-test-"),
        "POSTAL_STALE_QUERY_AFTER_HOURS": str(2 / 3600),
        "POSTAL_STALE_GIVE_UP_AFTER_DAYS": str(8 / 86400),
        "POSTAL_SCAN_INTERVAL_SECONDS": "0.5",
        "POSTAL_REBOOK_AFTER_SECONDS": "1",
        "POSTAL_CARRIER_TIMEOUT_SECONDS": "0.5",
        "POSTAL_CARRIER_ATTEMPTS": "2",
        "POSTAL_CARRIER_RETRY_BASE_SECONDS": "0.05",
        "VNPOST_SANDBOX_STEP_SECONDS": "0.25",
        "VNPOST_SANDBOX_TOKEN_TTL_SECONDS": "3",
        "VNPOST_SANDBOX_TIMEOUT_SECONDS": "1",
        "VNPOST_SANDBOX_SEED": "7",
    }
    return service_env(broker, redis_url, namespace, **{**fast, **extra})


@dataclass
class Stack:
    ports: Ports
    broker: Broker

    @property
    def webhook(self) -> str:
        return f"{self.ports.postal_url}/v1/webhooks/postal/vnpost"


@contextmanager
def postal_stack(broker: Broker, redis_url: str, **extra: str) -> Iterator[Stack]:
    """The VNPost sandbox and the postal service (`postal_env`, with `extra` on top) on
    `broker`, in a Redis namespace of their own that is removed afterwards."""
    namespace = f"motcua-test-{uuid.uuid4().hex[:10]}"
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    ports = Ports()
    env = postal_env(broker, redis_url, namespace, ports, **extra)
    # both start at once (each spends seconds importing), then each is waited for
    with (
        process(["services.cli", "run", "vnpost-sandbox"], env, "vnpost-sandbox") as carrier,
        process(["services.cli", "run", "postal"], env, "postal") as postal,
    ):
        wait_http(f"{ports.sandbox_url}/healthz", proc=carrier)
        wait_http(f"{ports.postal_url}/readyz", proc=postal)
        yield Stack(ports, broker)
    delete_namespace(redis_url, namespace)


def now_iso() -> str:
    return datetime.now(UTC).astimezone().isoformat()


def dossier_id() -> str:
    return f"000.00.12.H34-{_run}-{next(_n):04d}"


ADDRESS = {"province": "Khánh Hòa", "district": "Nha Trang", "commune": "Lộc Thọ"}


def postal_submitted(
    did: str, mode: str, *, cod: bool = False, fee: int = 50_000, street: str = "1 Trần Phú"
) -> dict[str, Any]:
    address: dict[str, Any] = {**ADDRESS, "street": street}
    return submitted(
        did,
        event_id=f"{did}-submitted",
        applicant={"name": "Nguyễn Thị B", "phone": "0905123456", "address": address},
        fee={"amount_vnd": fee, "method": "postal_cod" if cod else "online"},
        postal={"mode": mode},
        submitted_at=now_iso(),
    )


def resolved(did: str, outcome: str = "approved") -> dict[str, Any]:
    return envelope(
        "dossier.resolved",
        did,
        {"resolved_at": now_iso(), "outcome": outcome},
        event_id=f"{did}-resolved",
        time=now_iso(),
    )


async def produce(bootstrap: str, events: list[dict[str, Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        for event in events:
            await producer.send_and_wait(
                "dossier.events", value=orjson.dumps(event), key=event["subject"].encode()
            )
    finally:
        await producer.stop()


@dataclass
class Seen:
    """`postal.events` by dossier and leg, one entry per distinct event id, in order."""

    by_leg: dict[tuple[str, str], list[dict[str, Any]]]

    def events(self, did: str, leg: str) -> list[dict[str, Any]]:
        return self.by_leg.get((did, leg), [])

    def types(self, did: str, leg: str) -> list[str]:
        return [e["type"] for e in self.events(did, leg)]


async def postal_events(bootstrap: str) -> Seen:
    records = await read_all(bootstrap, "postal.events", idle=0.5, timeout=10)
    by_leg: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    ids: set[str] = set()
    for record in records:
        event = decode_event(record.value)
        assert record.key == event.subject.encode()
        if event.id in ids:
            continue  # an at-least-once republish carries the same id
        ids.add(event.id)
        value = event.to_dict()
        by_leg[(event.subject, value["data"]["leg"])].append(value)
    for events in by_leg.values():
        events.sort(key=lambda e: int(e["id"].split(":")[-2]))
    return Seen(dict(by_leg))


def sandbox(url: str, path: str) -> Any:
    return httpx.get(f"{url}{path}", timeout=10).json()


def wait_until(check: Any, timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    result = check()
    while not result and time.monotonic() < deadline:
        time.sleep(interval)
        result = check()
    return result
