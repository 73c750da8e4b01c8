"""Short-lived coordination in Redis: namespaced keys, token buckets, idempotency claims.

Redis holds nothing that is not also in Kafka: losing it may cost a retry, never an event.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.common.settings import Settings


def connect(settings: Settings) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        settings.redis_url, socket_connect_timeout=2.0, socket_timeout=5.0, decode_responses=False
    )


@dataclass(frozen=True)
class Keys:
    """Every Redis key motcua writes starts with the namespace, so runs never collide."""

    namespace: str

    def __call__(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))


# A token bucket in one round trip. With `reserve`, a caller that must wait still takes its
# tokens (the bucket goes into debt) and is told how long to sleep: it delays rather than drops.
# Without, the caller is refused and told when enough tokens will be there.
_TOKEN_BUCKET = """
local key = KEYS[1]
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local now = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local reserve = ARGV[5] == '1'
local state = redis.call('HMGET', key, 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
tokens = math.min(burst, tokens + math.max(0, now - at) * rate)
local wait = 0
if tokens < cost then
  wait = (cost - tokens) / rate
end
if wait == 0 or reserve then
  tokens = tokens - cost
end
redis.call('HSET', key, 'tokens', tostring(tokens), 'at', tostring(now))
redis.call('EXPIRE', key, math.ceil(burst / rate) + 60)
return tostring(wait)
"""


class TokenBucket:
    """A named family of token buckets in Redis (one per portal, per number, ...)."""

    def __init__(self, client: aioredis.Redis, key_prefix: str, rate: float, burst: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self._client = client
        self._prefix = key_prefix
        self.rate = rate
        self.burst = burst
        self._script = client.register_script(_TOKEN_BUCKET)

    async def take(self, name: str, cost: float = 1.0, *, reserve: bool = False) -> float:
        """Seconds to wait before `cost` tokens are there (0 = go now).

        With `reserve=False` a positive answer means nothing was taken (the caller is refused).
        """
        result = await self._script(
            keys=[f"{self._prefix}:{name}"],
            args=[self.rate, self.burst, time.time(), cost, "1" if reserve else "0"],
        )
        return float(result)
