"""The pieces of batch sending against the real things: the claim-and-buckets script in the real
Redis, the batch endpoint of the provider protocol over loopback HTTP to the sandbox, and the
sender's stages on both."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime

import httpx
import pytest
import redis.asyncio as aioredis

from services.common.coordination import ClaimGate, Keys, Ticket, TokenBucket
from services.dev.embedded import free_port
from services.sms.attempts import Failure
from services.sms.partner import MAX_BATCH, Accepted, GatewayError, OutboundSms, SmsGateway
from services.sms.record import Pending
from services.sms.sender import Sender
from services.sms.settings import SmsSettings
from services.sms.settling import Settled
from tests.support.processes import process, wait_http
from tests.support.redis_keys import delete_namespace

pytestmark = pytest.mark.integration


async def test_one_round_trip_claims_and_takes_tokens_once_per_claim(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    ns = f"motcua-test-{uuid.uuid4().hex[:10]}"
    try:
        per_number = TokenBucket(client, f"{ns}:number", rate=1.0, burst=2.0)
        everyone = TokenBucket(client, f"{ns}:global", rate=1000.0, burst=1000.0)
        gate = ClaimGate(client, (per_number, everyone), claim_ttl_seconds=60, retake_prefix="p:")
        tickets = [Ticket(f"{ns}:claim:{i}", "p:primary", ("same-number", "all")) for i in range(3)]

        first = await gate.admit(tickets)
        assert [a.held for a in first] == ["", "", ""]  # claimed now
        # A burst of two for one number, the third waits about a second: delayed, not refused.
        assert [a.wait for a in first[:2]] == [0.0, 0.0]
        assert 0.9 <= first[2].wait <= 1.0

        await client.set(f"{ns}:claim:0", "s:secondary")
        await client.set(f"{ns}:claim:1", "f:send_failed")
        again = await gate.admit(tickets)
        assert [a.held for a in again] == ["s:secondary", "f:send_failed", "p:primary"]
        # Only the claim of unknown outcome is tried again, so only it takes a token.
        assert again[0].wait == again[1].wait == 0.0
        assert 1.9 <= again[2].wait <= 2.0
        assert await client.get(f"{ns}:claim:2") == b"p:primary"
        assert 0 < await client.ttl(f"{ns}:claim:2") <= 60
    finally:
        await client.aclose()
        delete_namespace(redis_url, ns)


@pytest.fixture(scope="module")
def sandbox() -> Iterator[str]:
    port = free_port()
    env = {
        "SMS_PRIMARY_SANDBOX_PORT": str(port),
        "SMS_SANDBOX_REPORTS": "false",
        "SMS_SANDBOX_HANG_SECONDS": "1.0",
    }
    with process(["services.cli", "run", "sms-primary-sandbox"], env, "sms-batch-sandbox"):
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", timeout=30)
        yield url


def batch(n: int, tag: str) -> list[tuple[OutboundSms, str]]:
    return [
        (
            OutboundSms(
                to=f"+8490512{i:04d}",
                text=f"Ho so {tag} {i}",
                sender="MOTCUA",
                reference=f"sms:{tag}:{i}",
                dossier_id=f"D-{tag}-{i}",
                template="dossier_received",
            ),
            f"sms:{tag}:{i}",
        )
        for i in range(n)
    ]


def faults(url: str, **values: object) -> None:
    body = {"reports": False, **values}
    httpx.put(f"{url}/v1/faults", json=body, timeout=5).raise_for_status()


async def test_a_batch_is_accepted_once_per_key_and_replayed_after(sandbox: str) -> None:
    faults(sandbox)
    gateway = SmsGateway("primary", sandbox, timeout=2.0)
    try:
        messages = batch(50, uuid.uuid4().hex[:6])
        first = await gateway.send_batch(messages)
        assert all(isinstance(o, Accepted) and not o.replayed for o in first)
        again = await gateway.send_batch(messages[10:20])
        assert all(isinstance(o, Accepted) and o.replayed for o in again)
        ids = [o.message_id for o in first if isinstance(o, Accepted)]
        assert [o.message_id for o in again if isinstance(o, Accepted)] == ids[10:20]
        accepted = httpx.get(f"{sandbox}/v1/messages", timeout=5).json()["accepted"]
        keys = {m["idempotency_key"] for m in accepted}
        assert {key for _, key in messages} <= keys
        with pytest.raises(ValueError):
            await gateway.send_batch(batch(MAX_BATCH + 1, "too-many"))
    finally:
        await gateway.aclose()


async def test_failures_are_per_message_or_for_the_whole_call(sandbox: str) -> None:
    gateway = SmsGateway("primary", sandbox, timeout=0.3)
    try:
        faults(sandbox, error_rate=1.0)  # each message refused, nothing accepted
        refused = await gateway.send_batch(batch(5, uuid.uuid4().hex[:6]))
        assert all(
            isinstance(o, GatewayError) and o.failure is Failure.UNAVAILABLE for o in refused
        )

        faults(sandbox, timeout_rate=1.0, hang_seconds=1.0)  # accepted, the answer too late
        tag = uuid.uuid4().hex[:6]
        hung = await gateway.send_batch(batch(5, tag))
        assert all(isinstance(o, GatewayError) and o.failure is Failure.AMBIGUOUS for o in hung)
        faults(sandbox)
        retried = await gateway.send_batch(batch(5, tag))  # the same keys: nothing sent twice
        assert all(isinstance(o, Accepted) and o.replayed for o in retried)

        bad = [(OutboundSms("", "", "", "", "", ""), "k")]  # can never be accepted
        [rejected] = await gateway.send_batch(bad)
        assert isinstance(rejected, GatewayError) and rejected.failure is Failure.REJECTED
    finally:
        faults(sandbox)
        await gateway.aclose()


async def test_a_dossiers_messages_go_one_at_a_time_in_order(
    sandbox: str, redis_url: str, namespace: str
) -> None:
    """Each message of a dossier waits until the one before it left the stages: three
    messages of one dossier settle in three batches, in the order submitted, beside a batch
    of other dossiers' messages that go together. A message done stays busy until its record
    learnt it."""
    faults(sandbox)
    client = aioredis.Redis.from_url(redis_url)
    gateway = SmsGateway("primary", sandbox, timeout=2.0)
    batches: list[list[str]] = []
    keys = [f"sms:{namespace}:{i}" for i in range(8)]
    everything = asyncio.Event()

    async def settle(news: Sequence[Settled]) -> None:
        batches.append([item.message.key for item in news])
        if sum(len(b) for b in batches) == len(keys):
            everything.set()

    async def nothing(*_: object) -> None:
        return None

    sender = Sender(
        SmsSettings(weights={"primary": 100}, global_rate=1e6, global_burst=1e6),
        client,
        Keys(namespace),
        {"primary": gateway},
        nothing,
        nothing,
        settle,
    )
    try:
        # messages 0-2 of one dossier, 3-7 of five others
        for i, key in enumerate(keys):
            dossier = "D-same" if i < 3 else f"D-other-{i}"
            await sender.submit(pending(key, dossier, to=f"+849051{i:05d}"))
        await asyncio.wait_for(everything.wait(), 30)
        same = [[key for key in b if key in keys[:3]] for b in batches]
        assert [b for b in same if b] == [[keys[0]], [keys[1]], [keys[2]]]
        assert set(batches[0]) == {keys[0], *keys[3:]}  # the others went with the first
        assert not sender.inflight
        # done, so busy until its record learns it (the rescan leaves it alone meanwhile)
        assert all(sender.busy_with(key) for key in keys)
        assert sender.backlog == len(keys)  # what the records still hold pending
        sender.learnt(keys[0])
        assert not sender.busy_with(keys[0]) and sender.busy_with(keys[1])
        assert sender.backlog == len(keys) - 1
    finally:
        await sender.aclose()
        await client.aclose()


def pending(key: str, dossier_id: str, *, to: str) -> Pending:
    return Pending(
        key=key,
        dossier_id=dossier_id,
        template="dossier_received",
        to=to,
        text="Ho so da duoc tiep nhan",
        segments=1,
        urgent=False,
        not_before=datetime.now(UTC),
        source_topic="dossier.events",
        origin="{}",
    )
