"""Webhook dedupe claims against the real Redis: one winner, the record read alongside."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis

from services.common.claims import Claims


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
