"""The Redis token bucket the SMS sender uses, against the real Redis: a burst goes through,
the rest is delayed (never refused), and the waits space them at the configured rate."""

from __future__ import annotations

import uuid

import pytest
import redis.asyncio as aioredis

from services.common.coordination import TokenBucket

pytestmark = pytest.mark.integration


async def test_bucket_lets_a_burst_through_then_delays_the_rest(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    prefix = f"motcua-test-{uuid.uuid4().hex[:10]}:bucket"
    try:
        bucket = TokenBucket(client, prefix, rate=2.0, burst=3.0)
        waits = [await bucket.take("number", reserve=True) for _ in range(6)]
        assert waits[:3] == [0.0, 0.0, 0.0]
        for got, want in zip(waits[3:], [0.5, 1.0, 1.5], strict=True):
            assert want - 0.05 <= got <= want  # a few ms pass between calls
        # Another number has its own bucket.
        assert await bucket.take("other", reserve=True) == 0.0
    finally:
        await client.delete(f"{prefix}:number", f"{prefix}:other")
        await client.aclose()
