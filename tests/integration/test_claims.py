"""Webhook dedupe claims against the real Redis: one winner, the record read alongside."""

from __future__ import annotations

import asyncio
import socket
from collections import Counter
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from services.common.claims import Claim, Claims


def test_first_claim_wins_reads_the_record_and_can_be_released(
    redis_url: str, namespace: str
) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        claims = Claims(client, ttl_seconds=60)
        record_key, claim_key = f"{namespace}:order:1", f"{namespace}:cb:1"
        await client.set(record_key, b"snapshot")

        first, second = await asyncio.gather(
            claims.claim(claim_key, read=record_key), claims.claim(claim_key, read=record_key)
        )
        assert sorted([first.claimed, second.claimed]) == [False, True]
        assert first.record == second.record == b"snapshot"
        assert 0 < await client.ttl(claim_key) <= 60

        await claims.release(claim_key)
        again = await claims.claim(claim_key)
        assert again.claimed and again.record is None

        missing = await claims.claim(f"{namespace}:cb:2", read=f"{namespace}:order:absent")
        assert missing.claimed and missing.record is None
        await client.aclose()

    asyncio.run(scenario())


def test_a_claim_is_pending_until_confirmed_then_a_copy_is_a_duplicate(
    redis_url: str, namespace: str
) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        claims = Claims(client, ttl_seconds=600, pending_seconds=30)
        key = f"{namespace}:cb:pending"

        first = await claims.claim(key)
        assert first.claimed and not first.pending
        assert 0 < await client.ttl(key) <= 30  # a pending claim lives only while it is written

        in_flight = await claims.claim(key)
        assert not in_flight.claimed and in_flight.pending

        claims.confirm_soon(key)
        await claims.flush()
        assert 30 < await client.ttl(key) <= 600  # confirmed: the full time to live
        duplicate = await claims.claim(key)
        assert not duplicate.claimed and not duplicate.pending

        # a pending claim whose write failed is released: the partner's retry claims it again
        other = f"{namespace}:cb:released"
        assert (await claims.claim(other)).claimed
        await claims.release(other)
        retry = await claims.claim(other)
        assert retry.claimed and not retry.pending
        await client.aclose()

    asyncio.run(scenario())


def test_of_concurrent_claims_one_wins_and_the_others_see_it_pending(
    redis_url: str, namespace: str
) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        claims = Claims(client, ttl_seconds=60)
        key = f"{namespace}:cb:race"
        results = await asyncio.gather(*(claims.claim(key) for _ in range(50)))
        assert sum(r.claimed for r in results) == 1
        assert all(r.pending for r in results if not r.claimed)
        await client.aclose()

    asyncio.run(scenario())


def test_claims_confirmed_in_the_background_are_all_confirmed(
    redis_url: str, namespace: str
) -> None:
    async def scenario() -> None:
        client = aioredis.Redis.from_url(redis_url)
        claims = Claims(client, ttl_seconds=600, pending_seconds=30)
        keys = [f"{namespace}:cb:soon:{i}" for i in range(200)]
        claimed = [await claims.claim(key) for key in keys]
        assert all(c.claimed for c in claimed)
        for key in keys:
            claims.confirm_soon(key)
        await claims.flush()
        for key in keys:
            again = await claims.claim(key)
            assert not again.claimed and not again.pending  # a duplicate now, not in flight
            assert 30 < await client.ttl(key) <= 600
        await client.aclose()

    asyncio.run(scenario())


class CountingRedis(aioredis.Redis):
    """Counts the commands sent, by name."""

    sent: Counter[str]

    async def execute_command(self, *args: Any, **options: Any) -> Any:
        self.sent[str(args[0]).upper()] += 1
        return await super().execute_command(*args, **options)  # type: ignore[no-untyped-call]


def test_claims_asked_at_once_go_in_one_round_trip_each_decided_as_alone(
    redis_url: str, namespace: str
) -> None:
    async def scenario() -> None:
        pool = aioredis.ConnectionPool.from_url(redis_url)
        client = CountingRedis(connection_pool=pool)
        client.sent = Counter()
        claims = Claims(client, ttl_seconds=600, pending_seconds=30)
        confirmed, pending = f"{namespace}:cb:confirmed", f"{namespace}:cb:pending"
        record, absent = f"{namespace}:order:1", f"{namespace}:order:absent"
        await client.set(record, b"snapshot")
        assert (await claims.claim(confirmed)).claimed
        claims.confirm_soon(confirmed)
        await claims.flush()
        assert (await claims.claim(pending)).claimed
        client.sent.clear()

        fresh = f"{namespace}:cb:fresh"
        results = await asyncio.gather(
            claims.claim(fresh, read=record),
            claims.claim(confirmed),
            claims.claim(pending, read=record),
            claims.claim(f"{namespace}:cb:other", read=absent),
            claims.claim(fresh),
        )
        assert list(results) == [
            Claim(claimed=True, record=b"snapshot"),
            Claim(claimed=False, record=None, pending=False),  # a duplicate
            Claim(claimed=False, record=b"snapshot", pending=True),  # in flight
            Claim(claimed=True, record=None),
            Claim(claimed=False, record=None, pending=True),  # the first of this batch holds it
        ]
        assert client.sent == Counter({"EVALSHA": 1})
        await client.aclose()
        await pool.disconnect()

    asyncio.run(scenario())


def test_with_redis_away_every_claim_waiting_raises() -> None:
    async def scenario() -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        client = aioredis.Redis(
            host="127.0.0.1", port=port, socket_connect_timeout=0.5, retry=Retry(NoBackoff(), 0)
        )
        claims = Claims(client, ttl_seconds=60)
        results = await asyncio.gather(
            *(claims.claim(f"t:cb:{i}") for i in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, RedisError | OSError) for r in results), results
        await client.aclose()

    asyncio.run(scenario())
