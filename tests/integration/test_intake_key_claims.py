"""A dossier's data key whose write failed after it was handed to the broker (CONTRACT section
10): the portal's retry seals with that key if it landed, and writes that same key again at once
if it did not (so a write that lands later still is the same key); either way the dossier's
events open with its latest key on `dossier.keys`. An erasure deletes the claim that holds the
key. The real broker (stalled with SIGSTOP, or stopped and started empty), the real Redis, the
dev OIDC issuer, intake over HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import redis.asyncio as aioredis

from services.common.coordination import Keys
from services.common.events import decode_event
from services.common.kafka import DurablePublisher
from services.dev.embedded import Broker, free_port
from services.intake.ledger import EventLedger
from services.intake.personal import CLAIM_SECONDS, claimed_key
from tests.conftest import PORTAL_KEY, service_env
from tests.integration.test_intake import Intake
from tests.support.factories import submitted
from tests.support.kafka import read_all
from tests.support.operators import Issuer
from tests.support.processes import motcua
from tests.support.sealed import opened

pytestmark = [pytest.mark.integration, pytest.mark.chaos]

PUBLISH_TIMEOUT_SECONDS = 2


@pytest.fixture
def own_intake(redis_url: str, namespace: str, issuer: Issuer) -> Iterator[Intake]:
    broker = Broker(port=free_port()).start()
    port = free_port()
    env = service_env(
        broker,
        redis_url,
        namespace,
        INTAKE_PORT=str(port),
        INTAKE_PUBLISH_TIMEOUT_SECONDS=str(PUBLISH_TIMEOUT_SECONDS),
        MOTCUA_OIDC_ISSUER=issuer.url,
    )
    try:
        with motcua("intake", env, port, log_name="intake-key-claims"):
            intake = Intake(port, broker)
            assert intake.post(submitted()).status_code == 202  # the producer is connected
            yield intake
    finally:
        broker.stop()


async def post(client: httpx.AsyncClient, intake: Intake, event: dict[str, Any]) -> httpx.Response:
    return await client.post(
        f"{intake.url}/v1/events",
        content=orjson.dumps(event),
        headers={"content-type": "application/json", "authorization": f"Bearer {PORTAL_KEY}"},
    )


async def key_records(broker: Broker, dossier_id: str) -> list[Any]:
    records = await read_all(broker.bootstrap, "dossier.keys", idle=1.0)
    return [r for r in records if r.key == dossier_id.encode()]


async def published_data(broker: Broker, event_id: str) -> dict[str, Any]:
    records = await read_all(broker.bootstrap, "dossier.events", idle=1.0)
    (event,) = [e for e in (decode_event(r.value) for r in records) if e.id == event_id]
    return event.to_dict()


async def test_a_key_write_that_lands_after_it_failed_is_the_key_the_retry_seals_with(
    own_intake: Intake, redis_url: str, namespace: str
) -> None:
    broker = own_intake.broker
    assert broker.process is not None
    event = submitted()
    redis = aioredis.from_url(redis_url)
    ledger_key = EventLedger(redis, Keys(namespace), 60, 1.0, history=None).key(  # type: ignore[arg-type]
        event["source"], event["id"]
    )
    async with httpx.AsyncClient(timeout=30) as client:
        os.kill(broker.process.pid, signal.SIGSTOP)
        try:
            failed = await post(client, own_intake, event)  # the key write is not acknowledged
            failed_at_ms = int(time.time() * 1000)
            retrying = asyncio.create_task(post(client, own_intake, event))
            for _ in range(1000):  # until the retry holds the event's claim, past the key's
                if await redis.exists(ledger_key) or retrying.done():
                    break
                await asyncio.sleep(0.01)
        finally:
            os.kill(broker.process.pid, signal.SIGCONT)  # the key handed over lands now
        retried = await retrying
    await redis.aclose()
    assert failed.status_code == 503
    assert retried.status_code == 202, retried.text
    assert retried.json() == {"accepted": 1, "duplicates": 0}

    keys = await key_records(broker, event["subject"])
    assert len(keys) == 1, "a second key was made for the dossier"
    assert keys[0].timestamp < failed_at_ms  # the one the failed request sent
    sealed = await published_data(broker, event["id"])
    assert sealed["data"] != event["data"]
    (clear,) = await opened(broker.bootstrap, [sealed])
    assert clear["data"] == event["data"]


async def test_a_key_write_that_never_landed_is_made_again_by_the_retry_at_once(
    own_intake: Intake,
) -> None:
    broker = own_intake.broker
    event = submitted()
    async with httpx.AsyncClient(timeout=30) as client:
        broker.stop()  # the write is handed to a connection that is gone: it never lands
        failed = await post(client, own_intake, event)
        broker.start()  # empty
        started = time.monotonic()
        retried = await post(client, own_intake, event)
        took = time.monotonic() - started
    assert failed.status_code == 503
    assert retried.status_code == 202, retried.text
    assert retried.json() == {"accepted": 1, "duplicates": 0}
    assert took < CLAIM_SECONDS / 4  # not held up until the failed request's claim expires

    (key,) = await key_records(broker, event["subject"])
    assert key.value
    (clear,) = await opened(broker.bootstrap, [await published_data(broker, event["id"])])
    assert clear["data"] == event["data"]


async def failed_with_its_key_in_the_claim(
    client: httpx.AsyncClient, intake: Intake, event: dict[str, Any], claim_key: str, redis_url: str
) -> bytes:
    """Post `event` while the broker is gone (its key's write is handed to a connection that is
    gone), start the broker again empty; the wrapped key the uncertain claim holds."""
    intake.broker.stop()
    failed = await post(client, intake, event)
    intake.broker.start()
    assert failed.status_code == 503
    redis = aioredis.from_url(redis_url)
    try:
        held = await redis.get(claim_key)
    finally:
        await redis.aclose()
    assert isinstance(held, bytes), "the key claim was released"
    wrapped = claimed_key(held.decode())
    assert wrapped is not None, f"the uncertain claim holds no key: {held!r}"
    return wrapped


async def test_a_key_write_that_lands_after_the_retry_took_its_claim_over_is_the_same_key(
    own_intake: Intake, redis_url: str, namespace: str
) -> None:
    broker = own_intake.broker
    event = submitted()
    dossier_id = event["subject"]
    async with httpx.AsyncClient(timeout=30) as client:
        first = await failed_with_its_key_in_the_claim(
            client, own_intake, event, Keys(namespace)("intake", "data-key", dossier_id), redis_url
        )
        retried = await post(client, own_intake, event)
    assert retried.status_code == 202, retried.text
    assert [k.value for k in await key_records(broker, dossier_id)] == [first]

    # the first write lands now, after the take-over (held in a network's buffers until then)
    publisher = DurablePublisher(broker.bootstrap)
    try:
        await publisher.publish([("dossier.keys", dossier_id.encode(), first)])
    finally:
        await publisher.close()
    assert len(await key_records(broker, dossier_id)) == 2
    (clear,) = await opened(broker.bootstrap, [await published_data(broker, event["id"])])
    assert clear["data"] == event["data"]


async def test_an_erasure_deletes_the_key_claim_that_holds_a_copy_of_the_key(
    own_intake: Intake, redis_url: str, namespace: str, issuer: Issuer
) -> None:
    event = submitted()
    dossier_id = event["subject"]
    claim_key = Keys(namespace)("intake", "data-key", dossier_id)
    async with httpx.AsyncClient(timeout=30) as client:
        await failed_with_its_key_in_the_claim(client, own_intake, event, claim_key, redis_url)
        erased = await client.delete(
            f"{own_intake.url}/v1/dossiers/{dossier_id}/personal-data",
            headers=issuer.headers("admin"),
        )
        assert erased.status_code == 202, erased.text
        redis = aioredis.from_url(redis_url)
        try:
            assert not await redis.exists(claim_key)
        finally:
            await redis.aclose()
        retried = await post(client, own_intake, event)
    assert retried.status_code == 409, retried.text  # erased: not accepted again
    assert [k.value for k in await key_records(own_intake.broker, dossier_id)] == [None]
