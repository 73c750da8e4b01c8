"""Personal data sealed from intake on (CONTRACT section 10), against the real Tansu broker, the
real Redis and a real intake over HTTP: what lands on `dossier.events` holds no personal value,
`dossier.keys` holds the dossier's wrapped key, and the sealed fields open with it."""

from __future__ import annotations

import asyncio
import base64
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest

from services.common.events import decode_event
from services.common.sealing import Keks, WrappedKey, is_sealed, unseal_data
from services.common.settings import DEV_KEK
from services.dev.embedded import Broker, free_port
from tests.conftest import PORTAL_KEY, service_env
from tests.support.factories import envelope, submitted
from tests.support.kafka import read_all
from tests.support.operators import Issuer
from tests.support.processes import motcua
from tests.support.redis_keys import delete_namespace

pytestmark = pytest.mark.integration

KEKS = Keks.parse(DEV_KEK)


class Intake:
    def __init__(self, port: int) -> None:
        self.url = f"http://127.0.0.1:{port}"

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
        yield Intake(port)
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


def test_the_keys_of_closed_dossiers_are_destroyed_after_the_retention(
    broker: Broker, redis_url: str, namespace: str
) -> None:
    """With a retention of 0 days, a withdrawn dossier's key goes at the next round; an open
    dossier's stays."""
    port = free_port()
    env = service_env(
        broker,
        redis_url,
        namespace,
        INTAKE_PORT=str(port),
        MOTCUA_PII_RETENTION_DAYS="0",
        MOTCUA_PII_RETENTION_INTERVAL_SECONDS="0.5",
    )
    now = datetime.now(UTC).isoformat()
    closed, still_open = submitted(time=now), submitted(time=now)
    withdrawn = envelope(
        "dossier.withdrawn",
        closed["subject"],
        {
            "dossier_id": closed["subject"],
            "agency_code": "000.00.12.H34",
            "withdrawn_at": now,
        },
        time=now,
    )
    with motcua("intake", env, port, log_name="intake-retention"):
        intake = Intake(port)
        assert intake.post([closed, still_open, withdrawn]).json()["accepted"] == 3
        deadline = time.monotonic() + 60
        keys = asyncio.run(wrapped_keys(broker))
        while keys.get(closed["subject"]) is not None and time.monotonic() < deadline:
            time.sleep(0.3)
            keys = asyncio.run(wrapped_keys(broker))
    assert closed["subject"] in keys and keys[closed["subject"]] is None  # the tombstone
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
