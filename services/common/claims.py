"""A webhook's dedupe claim in Redis, and the record it decides on, in one round trip.

A claim is taken as *pending* (`p`, with a short time to live) before the callback is written to
Kafka and *confirmed* (`1`, with the full time to live) once the broker acknowledged it. A copy
that arrives while the first is being written finds it pending and is asked to retry: it must
not be answered "duplicate" before the first copy is durable, since that write may still fail.

Confirmations are sent in the background, many in one pipelined round trip: the reply to the
partner does not wait for them. While Redis is away they are tried again; one that never lands
leaves the claim pending until its short time to live runs out, and a later copy is then
written again, which the consumers apply idempotently (by the partner's event id).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common.logging import get_logger
from services.common.tracing import traced_script

log = get_logger("motcua.claims")

# The claim, what held it before, and the record: one script, so one round trip and atomic.
# A nil GET ends a Lua table, so the record is the last item and is absent when missing.
_CLAIM_AND_READ = """
local claimed = redis.call('SET', KEYS[1], 'p', 'NX', 'EX', ARGV[1])
local held = ''
if not claimed then held = redis.call('GET', KEYS[1]) or '' end
if #KEYS > 1 then
  return {claimed and 1 or 0, held, redis.call('GET', KEYS[2])}
end
return {claimed and 1 or 0, held}
"""

PENDING = b"p"


@dataclass(frozen=True)
class Claim:
    claimed: bool  # False: the key was claimed before (a duplicate, or `pending`)
    record: bytes | None  # the value at `read`, when asked for and present
    pending: bool = False  # claimed before and not yet confirmed: the first copy is in flight


class Claims:
    """Idempotency claims with a time to live; confirm one once its work is durable, release
    one when its work did not happen."""

    def __init__(
        self, client: aioredis.Redis, ttl_seconds: int, *, pending_seconds: int = 60
    ) -> None:
        self._client = client
        self._ttl = ttl_seconds
        self._pending_ttl = max(1, min(pending_seconds, ttl_seconds))
        self._script = traced_script(client, _CLAIM_AND_READ, "claim_and_read")
        self._to_confirm: list[str] = []
        self._confirming: asyncio.Task[None] | None = None

    async def claim(self, key: str, *, read: str | None = None) -> Claim:
        keys = [key] if read is None else [key, read]
        reply = await self._script(keys=keys, args=[self._pending_ttl])
        record = reply[2] if len(reply) > 2 else None
        return Claim(
            claimed=bool(reply[0]),
            record=bytes(record) if record else None,
            pending=bytes(reply[1] or b"") == PENDING,
        )

    async def release(self, key: str) -> None:
        await self._client.delete(key)

    def confirm_soon(self, key: str) -> None:
        """Confirm in the background, together with whatever else is waiting to be confirmed."""
        self._to_confirm.append(key)
        if self._confirming is None or self._confirming.done():
            self._confirming = asyncio.get_running_loop().create_task(self._confirm_waiting())

    async def flush(self) -> None:
        """Wait until every confirmation asked for so far was sent."""
        while self._confirming is not None and not self._confirming.done():
            await asyncio.shield(self._confirming)

    async def _confirm_waiting(self) -> None:
        failing_since: float | None = None
        loop = asyncio.get_running_loop()
        while self._to_confirm:
            keys, self._to_confirm = self._to_confirm, []
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    for key in keys:
                        pipe.set(key, b"1", ex=self._ttl)
                    await pipe.execute()
            except (RedisError, OSError) as exc:
                failing_since = failing_since or loop.time()
                if loop.time() - failing_since >= self._pending_ttl:
                    # the claims have expired by now: a later copy is written again and
                    # applied idempotently
                    log.warning("claims_not_confirmed", claims=len(keys), error=type(exc).__name__)
                    failing_since = None
                    continue
                self._to_confirm[:0] = keys  # try again shortly, with whatever came meanwhile
                await asyncio.sleep(0.5)
            else:
                failing_since = None
