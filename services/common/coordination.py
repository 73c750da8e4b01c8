"""Short-lived coordination in Redis: namespaced keys, token buckets, idempotency claims.

Redis holds nothing that is not also in Kafka: losing it may cost a retry, never an event.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common.settings import Settings
from services.common.tracing import traced_script

# Connections a process keeps to Redis; a burst beyond them waits up to `POOL_WAIT_SECONDS` for
# one to come back instead of failing (a webhook burst of 300 concurrent calls is normal).
POOL_SIZE = 64
POOL_WAIT_SECONDS = 5.0


def connect(settings: Settings) -> aioredis.Redis:
    pool = aioredis.BlockingConnectionPool.from_url(
        settings.redis_url,
        max_connections=POOL_SIZE,
        timeout=POOL_WAIT_SECONDS,
        socket_connect_timeout=2.0,
        socket_timeout=5.0,
        decode_responses=False,
    )
    return aioredis.Redis(connection_pool=pool)


def redis_reachable(client: aioredis.Redis) -> Callable[[], Awaitable[bool]]:
    """A ready check (`Service.add_ready_check`): Redis answers a PING."""

    async def redis_reachable() -> bool:
        try:
            return bool(await client.ping())
        except (RedisError, OSError):
            return False

    return redis_reachable


@dataclass(frozen=True)
class Keys:
    """Every Redis key motcua writes starts with the namespace, so runs never collide."""

    namespace: str

    def __call__(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))


# A token bucket as a Lua function, shared by every script that takes tokens. With `reserve`, a
# caller that must wait still takes its tokens (the bucket goes into debt) and is told how long to
# sleep: it delays rather than drops. Without, the caller is refused and told when enough tokens
# will be there.
_TAKE_TOKENS = """
local function take_tokens(key, rate, burst, now, cost, reserve)
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
  return wait
end
"""

_TOKEN_BUCKET = (
    _TAKE_TOKENS
    + """
return tostring(take_tokens(KEYS[1], tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]),
                            tonumber(ARGV[4]), ARGV[5] == '1'))
"""
)


class TokenBucket:
    """A named family of token buckets in Redis (one per portal, per number, ...)."""

    def __init__(self, client: aioredis.Redis, key_prefix: str, rate: float, burst: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self._client = client
        self._prefix = key_prefix
        self.rate = rate
        self.burst = burst
        self._script = traced_script(client, _TOKEN_BUCKET, "token_bucket")

    def key(self, name: str) -> str:
        return f"{self._prefix}:{name}"

    async def take(self, name: str, cost: float = 1.0, *, reserve: bool = False) -> float:
        """Seconds to wait before `cost` tokens are there (0 = go now).

        With `reserve=False` a positive answer means nothing was taken (the caller is refused).
        """
        result = await self._script(
            keys=[self.key(name)],
            args=[self.rate, self.burst, time.time(), cost, "1" if reserve else "0"],
        )
        return float(result)


# Per item: claim its key unless held, then (when the claim is new, or held with the "retake"
# prefix: an attempt whose outcome is unknown) reserve one token from each of its buckets.
# KEYS: per item, the claim key then one bucket key per family.
# ARGV: now, claim ttl, number of families, retake prefix, (rate, burst) per family, then the
# claim value of each item. Returns per item: what the claim held ("" = claimed now), the wait.
_CLAIM_AND_TAKE = (
    _TAKE_TOKENS
    + """
local now = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local families = tonumber(ARGV[3])
local retake = ARGV[4]
local stride = 1 + families
local out = {}
for i = 0, #KEYS / stride - 1 do
  local claim = KEYS[i * stride + 1]
  local held = redis.call('GET', claim)
  if not held then
    redis.call('SET', claim, ARGV[5 + 2 * families + i], 'EX', ttl)
    held = ''
  end
  local wait = 0
  if held == '' or (retake ~= '' and string.sub(held, 1, #retake) == retake) then
    for f = 1, families do
      local rate = tonumber(ARGV[3 + 2 * f])
      local burst = tonumber(ARGV[4 + 2 * f])
      wait = math.max(wait, take_tokens(KEYS[i * stride + 1 + f], rate, burst, now, 1, true))
    end
  end
  out[#out + 1] = held
  out[#out + 1] = tostring(wait)
end
return out
"""
)


@dataclass(frozen=True)
class Ticket:
    """One item to admit: its idempotency claim, and its bucket name in each family."""

    claim_key: str
    claim_value: str
    buckets: tuple[str, ...]


@dataclass(frozen=True)
class Admission:
    held: str  # what the claim already held; "" when this call claimed it
    wait: float  # seconds to wait for the tokens reserved (0 when none were taken or due now)


class ClaimGate:
    """Idempotency claims plus token buckets for many items in one round trip.

    The claim comes first, so an item already claimed by an earlier attempt takes no tokens
    (unless its claim starts with `retake_prefix`: that attempt's outcome is unknown and it is
    about to be tried again). Tokens are reserved, so a wait is a delay, never a refusal.
    """

    def __init__(
        self,
        client: aioredis.Redis,
        buckets: tuple[TokenBucket, ...],
        *,
        claim_ttl_seconds: int,
        retake_prefix: str = "",
    ) -> None:
        self._buckets = buckets
        self._ttl = claim_ttl_seconds
        self._retake = retake_prefix
        self._script = traced_script(client, _CLAIM_AND_TAKE, "claim_and_take")

    async def admit(self, tickets: list[Ticket]) -> list[Admission]:
        if not tickets:
            return []
        keys: list[str] = []
        for ticket in tickets:
            if len(ticket.buckets) != len(self._buckets):
                raise ValueError("a ticket names one bucket per family")
            keys.append(ticket.claim_key)
            keys.extend(b.key(name) for b, name in zip(self._buckets, ticket.buckets, strict=True))
        args: list[str | float | int] = [time.time(), self._ttl, len(self._buckets), self._retake]
        for bucket in self._buckets:
            args += [bucket.rate, bucket.burst]
        args += [ticket.claim_value for ticket in tickets]
        result = await self._script(keys=keys, args=args)
        pairs = zip(result[0::2], result[1::2], strict=True)
        return [Admission(_text(held), float(wait)) for held, wait in pairs]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
