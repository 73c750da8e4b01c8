"""A webhook's dedupe claim in Redis, and the record it decides on, in one round trip."""

from __future__ import annotations

from dataclasses import dataclass

import redis.asyncio as aioredis

# A nil GET ends a Lua table, so the reply has one item when there is no record.
_CLAIM_AND_READ = """
local claimed = redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1])
if #KEYS > 1 then
  return {claimed and 1 or 0, redis.call('GET', KEYS[2])}
end
return {claimed and 1 or 0}
"""


@dataclass(frozen=True)
class Claim:
    claimed: bool  # False: the key was claimed before (a duplicate)
    record: bytes | None  # the value at `read`, when asked for and present


class Claims:
    """Idempotency claims with a time to live; release one when its work did not happen."""

    def __init__(self, client: aioredis.Redis, ttl_seconds: int) -> None:
        self._client = client
        self._ttl = ttl_seconds
        self._script = client.register_script(_CLAIM_AND_READ)

    async def claim(self, key: str, *, read: str | None = None) -> Claim:
        reply = await self._script(keys=[key] if read is None else [key, read], args=[self._ttl])
        record = reply[1] if len(reply) > 1 else None
        return Claim(claimed=bool(reply[0]), record=bytes(record) if record else None)

    async def release(self, key: str) -> None:
        await self._client.delete(key)
