"""The SMS delivery-report webhook under a storm of copies, end to end: the real broker, the real
Redis, the service as a real process answering over loopback HTTP."""

from __future__ import annotations

import asyncio
import re
import tempfile
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import orjson
import pytest

from services.common.kafka import ensure_topics
from services.common.signing import SIGNATURE_HEADER, sign_body
from services.common.topics import declared_topics
from services.dev.embedded import Broker, free_port
from tests.conftest import service_env
from tests.support.kafka import read_all
from tests.support.processes import motcua
from tests.support.redis_keys import delete_namespace

pytestmark = pytest.mark.integration

SECRET = "test-sms-webhook-secret"
COPIES = 300


@dataclass(frozen=True)
class Sms:
    url: str
    pid: int


@pytest.fixture(scope="module")
def sms(broker: Broker, redis_url: str) -> Iterator[Sms]:
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    namespace = f"motcua-test-sms-webhook-{uuid.uuid4().hex[:10]}"
    port = free_port()
    env = service_env(
        broker,
        redis_url,
        namespace,
        SMS_PORT=str(port),
        SMS_SECRETS=SECRET,
        # no gateway is called here: nothing is sent
        SMS_PRIMARY_URL=f"http://127.0.0.1:{free_port()}",
        SMS_SECONDARY_URL=f"http://127.0.0.1:{free_port()}",
        MOTCUA_DATA_DIR=tempfile.mkdtemp(prefix="motcua-sms-webhook-"),
    )
    with motcua("sms", env, port, log_name="sms-webhook") as proc:
        yield Sms(f"http://127.0.0.1:{port}", proc.pid)
    delete_namespace(redis_url, namespace)


@pytest.fixture(scope="module")
def sms_url(sms: Sms) -> str:
    return sms.url


def report(event_id: str) -> bytes:
    return orjson.dumps(
        {
            "event_id": event_id,
            "message_id": "m-1",
            "reference": "sms:storm",
            "dossier_id": "000.00.12.H34-storm-0001",
            "status": "DELIVRD",
        }
    )


def test_300_concurrent_copies_of_one_report_are_accepted_once_and_written_once(
    broker: Broker, sms_url: str
) -> None:
    event_id = f"rep-{uuid.uuid4().hex}"
    body = report(event_id)
    headers = {"content-type": "application/json", SIGNATURE_HEADER: sign_body(body, SECRET)}

    async def storm() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=COPIES, max_keepalive_connections=COPIES)
        async with httpx.AsyncClient(limits=limits, timeout=60) as client:
            url = f"{sms_url}/v1/webhooks/sms/primary"
            return await asyncio.gather(
                *(client.post(url, content=body, headers=headers) for _ in range(COPIES))
            )

    answers = asyncio.run(storm())
    outcomes = Counter(
        r.json()["status"] if r.status_code == 200 else r.status_code for r in answers
    )
    assert outcomes["accepted"] == 1, outcomes
    assert set(outcomes) <= {"accepted", "duplicate", 503}, outcomes
    for answer in answers:
        if answer.status_code == 503:
            assert answer.headers.get("retry-after"), answer.headers
    again = httpx.post(f"{sms_url}/v1/webhooks/sms/primary", content=body, headers=headers)
    assert (again.status_code, again.json()) == (200, {"status": "duplicate"})

    records = asyncio.run(read_all(broker.bootstrap, "sms.callbacks", idle=2.0))
    written = [r for r in records if orjson.loads(r.value).get("event_id") == event_id]
    assert len(written) == 1
    assert written[0].key == b"000.00.12.H34-storm-0001"
    assert orjson.loads(written[0].value)["kind"] == "report"


def test_a_body_over_64_kib_is_413_declared_or_chunked(sms_url: str) -> None:
    url = f"{sms_url}/v1/webhooks/sms/primary"
    padding = b" " * (64 * 1024)
    body = report(f"rep-{uuid.uuid4().hex}")[:-1] + padding + b"}"
    headers = {"content-type": "application/json", SIGNATURE_HEADER: sign_body(body, SECRET)}

    declared = httpx.post(url, content=body, headers=headers, timeout=10)
    assert declared.status_code == 413

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(body), 4096):
            yield body[start : start + 4096]

    with httpx.Client(timeout=10) as client:
        request = client.build_request("POST", url, content=chunks(), headers=headers)
        assert "content-length" not in request.headers
        assert request.headers["transfer-encoding"] == "chunked"
        chunked = client.send(request)
    assert chunked.status_code == 413

    small = report(f"rep-{uuid.uuid4().hex}")
    signed = {"content-type": "application/json", SIGNATURE_HEADER: sign_body(small, SECRET)}
    accepted = httpx.post(url, content=small, headers=signed, timeout=10)
    assert (accepted.status_code, accepted.json()) == (200, {"status": "accepted"})


def rss_bytes(pid: int) -> int:
    """The resident memory of process `pid` (VmRSS)."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match is not None, status
    return int(match.group(1)) * 1024


HUGE = 64 * 1024 * 1024


def test_four_signed_64_mib_bodies_streamed_at_once_are_413_and_never_read(sms: Sms) -> None:
    """A signed header does not buy a bigger read: each streamed (chunked) body is refused as
    soon as it crosses 64 KiB, and what the client still sends is thrown away as it comes, so the
    worker's memory stays where it was."""
    url = f"{sms.url}/v1/webhooks/sms/primary"
    small = report(f"rep-{uuid.uuid4().hex}")
    warm = httpx.post(
        url,
        content=small,
        headers={"content-type": "application/json", SIGNATURE_HEADER: sign_body(small, SECRET)},
        timeout=10,
    )
    assert warm.status_code == 200
    before = rss_bytes(sms.pid)
    sent = [0, 0, 0, 0]

    async def huge(index: int) -> AsyncIterator[bytes]:
        chunk = b" " * (256 * 1024)
        yield small[:-1]
        while sent[index] < HUGE:
            sent[index] += len(chunk)
            yield chunk
        yield b"}"

    async def post(client: httpx.AsyncClient, index: int) -> int:
        # signed over a body it never sends in full: the signature is not what is checked first
        headers = {
            "content-type": "application/json",
            SIGNATURE_HEADER: sign_body(small, SECRET),
        }
        response = await client.post(url, content=huge(index), headers=headers)
        return response.status_code

    async def flood() -> list[int]:
        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(post(client, i) for i in range(4)))

    assert asyncio.run(flood()) == [413, 413, 413, 413]
    grown = rss_bytes(sms.pid) - before
    assert grown < 20 * 1024 * 1024, f"the worker grew by {grown / 2**20:.1f} MiB"
    assert sent == [HUGE] * 4  # the bodies were sent in full (thrown away as they came)
