"""Personal data sealed from intake on (CONTRACT section 10), against the real Tansu broker, the
real Redis and a real intake over HTTP: what lands on `dossier.events` holds no personal value,
`dossier.keys` holds the dossier's wrapped key, and the sealed fields open with it."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from services.common.coordination import Keys
from services.common.events import decode_event
from services.common.kafka import publish_once
from services.common.sealing import Keks, WrappedKey, is_sealed, new_data_key, unseal_data
from services.common.settings import DEV_KEK
from services.dev.embedded import Broker, free_port
from services.intake.ledger import EventLedger
from tests.conftest import PORTAL_KEY, service_env
from tests.support.factories import envelope, submitted
from tests.support.kafka import read_all
from tests.support.operators import Issuer
from tests.support.processes import motcua
from tests.support.redis_keys import delete_namespace

pytestmark = pytest.mark.integration

KEKS = Keks.parse(DEV_KEK)
DAY = timedelta(days=1)


class Intake:
    def __init__(self, port: int, namespace: str = "") -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.namespace = namespace

    def post(self, body: Any) -> httpx.Response:
        return httpx.post(
            f"{self.url}/v1/events",
            content=orjson.dumps(body),
            headers={"content-type": "application/json", "authorization": f"Bearer {PORTAL_KEY}"},
            timeout=30,
        )

    def personal_data(self, method: str, dossier_id: str, headers: dict[str, str]) -> Any:
        return httpx.request(
            method,
            f"{self.url}/v1/dossiers/{dossier_id}/personal-data",
            headers=headers,
            timeout=30,
        )


@pytest.fixture(scope="module")
def intake(broker: Broker, redis_url: str, issuer: Issuer) -> Iterator[Intake]:
    namespace = f"motcua-test-{uuid.uuid4().hex[:10]}"
    port = free_port()
    env = service_env(
        broker, redis_url, namespace, INTAKE_PORT=str(port), MOTCUA_OIDC_ISSUER=issuer.url
    )
    with motcua("intake", env, port):
        yield Intake(port, namespace)
    delete_namespace(redis_url, namespace)


async def wrapped_keys(broker: Broker) -> dict[str, bytes | None]:
    records = await read_all(broker.bootstrap, "dossier.keys", idle=1.0)
    latest: dict[str, bytes | None] = {}
    for record in records:
        latest[record.key.decode()] = record.value or None
    return latest


async def published(broker: Broker, ids: set[str]) -> list[Any]:
    records = await read_all(broker.bootstrap, "dossier.events", idle=1.0)
    return [r for r in records if decode_event(r.value).id in ids]


async def test_intake_seals_every_personal_field_with_the_dossiers_own_key(
    intake: Intake, broker: Broker
) -> None:
    event = submitted(postal={"mode": "return", "address": "12 Lê Lợi, Nha Trang"})
    event["data"]["applicant"]["email"] = "nguoidan42@gmail.com"
    later = envelope(
        "dossier.received",
        event["subject"],
        {
            "dossier_id": event["subject"],
            "agency_code": "000.00.12.H34",
            "received_at": "2019-03-04T09:00:00+07:00",
            "due_at": "2019-03-11T17:00:00+07:00",
            "receipt_no": "R-1",
        },
    )
    assert intake.post([event, later]).json() == {"accepted": 2, "duplicates": 0}
    # the same event again is the same bytes: a duplicate, not a conflict
    assert intake.post(event).json() == {"accepted": 0, "duplicates": 1}

    records = await published(broker, {event["id"], later["id"]})
    assert len(records) == 2
    raw = b"".join(r.value for r in records)
    for clear in ("Nguyễn Thị B", "0905123456", "nguoidan42@gmail.com", "Trần Phú", "Lê Lợi"):
        assert clear.encode() not in raw
        assert orjson.dumps(clear)[1:-1] not in raw

    sealed = next(decode_event(r.value) for r in records if r.value and b"submitted" in r.value)
    data = sealed.to_dict()["data"]
    assert all(is_sealed(data["applicant"][f]) for f in ("name", "phone", "email", "address"))
    assert is_sealed(data["postal"]["address"])

    keys = await wrapped_keys(broker)
    value = keys[event["subject"]]
    assert value is not None
    data_key = KEKS.unwrap(event["subject"], WrappedKey.decode(value))
    assert unseal_data(data, data_key) == event["data"] | {
        "applicant": event["data"]["applicant"],
        "postal": event["data"]["postal"],
    }


async def test_a_dossier_whose_key_another_replica_is_making_is_sealed_with_that_key(
    intake: Intake, broker: Broker, redis_url: str
) -> None:
    """Another replica holds the claim of making the dossier's key: intake claims the event,
    waits for that replica's key on `dossier.keys`, and publishes the event sealed with it."""
    event = submitted()
    dossier = event["subject"]
    keys = Keys(intake.namespace)
    redis = aioredis.from_url(redis_url)
    ledger_key = EventLedger(redis, keys, 60, 1.0, history=None).key(  # type: ignore[arg-type]
        event["source"], event["id"]
    )
    await redis.set(keys("intake", "data-key", dossier), "another replica", ex=60)
    data_key = new_data_key()
    async with httpx.AsyncClient(timeout=30) as client:
        posting = asyncio.create_task(
            client.post(
                f"{intake.url}/v1/events",
                content=orjson.dumps(event),
                headers={
                    "content-type": "application/json",
                    "authorization": f"Bearer {PORTAL_KEY}",
                },
            )
        )
        for _ in range(1000):  # until intake holds the event's claim: it is waiting for the key
            if await redis.exists(ledger_key) or posting.done():
                break
            await asyncio.sleep(0.01)
        assert not posting.done()
        wrapped = KEKS.wrap(dossier, data_key).encode()
        await publish_once(broker.bootstrap, [("dossier.keys", dossier.encode(), wrapped)])
        response = await posting
    await redis.aclose()
    assert response.json() == {"accepted": 1, "duplicates": 0}
    assert intake.post(event).json() == {"accepted": 0, "duplicates": 1}
    (record,) = await published(broker, {event["id"]})
    assert unseal_data(decode_event(record.value).to_dict()["data"], data_key) == event["data"]
    assert (await wrapped_keys(broker))[dossier] == wrapped  # intake wrote no key of its own


async def test_an_event_refused_as_a_conflict_leaves_no_data_key_behind(
    intake: Intake, broker: Broker
) -> None:
    first = submitted()
    reused = submitted(event_id=first["id"])  # the same id for another (new) dossier
    assert intake.post(first).status_code == 202
    assert intake.post(reused).status_code == 409
    keys = await wrapped_keys(broker)
    assert keys[first["subject"]] is not None
    assert reused["subject"] not in keys


@pytest.mark.parametrize(
    ("clock", "days", "closed_at"),
    [
        ("wall", "0", timedelta(0)),
        # replayed time, ahead of every closing on the topic: only the history's own clock
        # can have moved the retention on
        ("events", "7", timedelta(days=1000)),
    ],
)
def test_the_keys_of_closed_dossiers_are_destroyed_after_the_retention(
    broker: Broker, redis_url: str, namespace: str, clock: str, days: str, closed_at: timedelta
) -> None:
    """A withdrawn dossier's key goes at the next round once "now" (the wall clock, or the
    latest closing read) is the retention past its closing; the key of a dossier closed 10 days
    later, and that of an open dossier, stay."""
    port = free_port()
    env = service_env(
        broker,
        redis_url,
        namespace,
        INTAKE_PORT=str(port),
        MOTCUA_PII_RETENTION_CLOCK=clock,
        MOTCUA_PII_RETENTION_DAYS=days,
        MOTCUA_PII_RETENTION_INTERVAL_SECONDS="0.5",
    )
    at = datetime.now(UTC) + closed_at
    closed, later, still_open = (submitted(time=at.isoformat()) for _ in range(3))

    def withdrawn(dossier: dict[str, Any], when: datetime) -> dict[str, Any]:
        data = {"dossier_id": dossier["subject"], "agency_code": "000.00.12.H34"}
        return envelope(
            "dossier.withdrawn",
            dossier["subject"],
            {**data, "withdrawn_at": when.isoformat()},
            time=when.isoformat(),
        )

    batch = [closed, later, still_open, withdrawn(closed, at), withdrawn(later, at + 10 * DAY)]
    with motcua("intake", env, port, log_name=f"intake-retention-{clock}"):
        intake = Intake(port)
        assert intake.post(batch).json()["accepted"] == 5
        deadline = time.monotonic() + 60
        keys = asyncio.run(wrapped_keys(broker))
        while keys.get(closed["subject"]) is not None and time.monotonic() < deadline:
            time.sleep(0.3)
            keys = asyncio.run(wrapped_keys(broker))
    assert closed["subject"] in keys and keys[closed["subject"]] is None  # the tombstone
    assert keys[later["subject"]] is not None
    assert keys[still_open["subject"]] is not None


def kek(kek_id: str, fill: bytes) -> str:
    return f"{kek_id}:{base64.b64encode(fill * 32).decode()}"


def test_kek_rotation_keeps_old_dossiers_readable_while_the_old_kek_is_listed(
    broker: Broker, redis_url: str, namespace: str, issuer: Issuer
) -> None:
    old, new = kek("2025", b"o"), kek("2026", b"n")
    admin = issuer.headers("admin")
    before, after = submitted(), submitted()
    port = free_port()

    def env(keks: str) -> dict[str, str]:
        return service_env(
            broker,
            redis_url,
            namespace,
            INTAKE_PORT=str(port),
            MOTCUA_OIDC_ISSUER=issuer.url,
            MOTCUA_KEK=keks,
        )

    with motcua("intake", env(old), port, log_name="intake-kek-old"):
        assert Intake(port).post(before).status_code == 202
    # rotated: the new KEK listed first wraps new keys, the old one still unwraps
    with motcua("intake", env(f"{new},{old}"), port, log_name="intake-kek-rotated"):
        intake = Intake(port)
        assert intake.post(after).status_code == 202
        held = intake.personal_data("GET", before["subject"], admin).json()
        assert held["personal_data"]["applicant.name"] == "Nguyễn Thị B"
    keys = asyncio.run(wrapped_keys(broker))
    wrapped_before, wrapped_after = keys[before["subject"]], keys[after["subject"]]
    assert wrapped_before is not None and wrapped_after is not None
    assert WrappedKey.decode(wrapped_before).kek_id == "2025"
    assert WrappedKey.decode(wrapped_after).kek_id == "2026"
    # the old KEK retired too early: its dossiers cannot be opened (said so, not a crash)
    with motcua("intake", env(new), port, log_name="intake-kek-new-only"):
        intake = Intake(port)
        unreadable = intake.personal_data("GET", before["subject"], admin)
        assert unreadable.status_code == 200
        assert set(unreadable.json()["personal_data"].values()) == {None}
        readable = intake.personal_data("GET", after["subject"], admin).json()
        assert readable["personal_data"]["applicant.phone"] == "0905123456"
