"""A webhook's dedupe claim in Redis, and the record it decides on, in one round trip.

A claim is taken as *pending* (`p`, with a short time to live) before the callback is written to
Kafka and *confirmed* (`1`, with the full time to live) once the broker acknowledged it. A copy
that arrives while the first is being written finds it pending and is asked to retry: it must
not be answered "duplicate" before the first copy is durable, since that write may still fail.

Claims asked for while a round trip is under way wait for it and then go together, every one in
one script call: one round trip and one Redis command however many callbacks arrive at once (the
Redis client's own work per command costs far more than a claim). Each claim is decided exactly
as alone; a Redis error answers every claim of its round trip.

Confirmations are sent in the background, many in one round trip: the reply to the partner does
not wait for them. While Redis is away they are tried again; one that never lands
leaves the claim pending until its short time to live runs out, and a later copy is then
written again, which the consumers apply idempotently (by the partner's event id).
"""

from __future__ import annotations

import asyncio
from contextvars import Context
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from services.common import tracing
from services.common.logging import get_logger

log = get_logger("motcua.claims")

# Claims, each with what held it before and its record: one script, so one round trip, and each
# claim atomic. KEYS are the claim keys, each followed by the key of its record when ARGV[1 + i]
# (claim i) is '1'; ARGV[1] is the pending time to live. Three items per claim: claimed (1 or 0),
# what held it ('' when claimed) and the record ('' when not asked for or absent).
_CLAIM_AND_READ = """
local out = {}
local k = 1
for i = 2, #ARGV do
  local key = KEYS[k]
  local claimed = redis.call('SET', key, 'p', 'NX', 'EX', ARGV[1])
  local held = ''
  if not claimed then held = redis.call('GET', key) or '' end
  local record = ''
  if ARGV[i] == '1' then
    k = k + 1
    record = redis.call('GET', KEYS[k]) or ''
  end
  k = k + 1
  out[#out + 1] = claimed and 1 or 0
  out[#out + 1] = held
  out[#out + 1] = record
end
return out
"""

# Confirmed claims: every key of KEYS set to '1' for ARGV[1] seconds.
_CONFIRM = """
for _, key in ipairs(KEYS) do redis.call('SET', key, '1', 'EX', ARGV[1]) end
return #KEYS
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
        self._script = client.register_script(_CLAIM_AND_READ)
        self._confirm = client.register_script(_CONFIRM)
        self._to_claim: list[tuple[str, str | None, asyncio.Future[Claim]]] = []
        self._claiming: asyncio.Task[None] | None = None
        self._to_confirm: list[str] = []
        self._confirming: asyncio.Task[None] | None = None

    async def claim(self, key: str, *, read: str | None = None) -> Claim:
        """Claim `key` (pending), reading `read` in the same round trip; raises `RedisError` or
        `OSError` when Redis is away (then nothing is known of the claim)."""
        loop = asyncio.get_running_loop()
        decided: asyncio.Future[Claim] = loop.create_future()
        self._to_claim.append((key, read, decided))
        if self._claiming is None or self._claiming.done():
            # a context of its own: the round trip is every waiting claim's, not one request's
            self._claiming = loop.create_task(self._claim_waiting(), context=Context())
        with tracing.script_span("claim_and_read", 1 if read is None else 2):
            return await decided

    async def _claim_waiting(self) -> None:
        """Every claim waiting, in one script call, until none waits."""
        while self._to_claim:
            batch, self._to_claim = self._to_claim, []
            keys: list[str] = []
            reads: list[int] = []
            for key, read, _ in batch:
                keys.append(key)
                if read is not None:
                    keys.append(read)
                reads.append(0 if read is None else 1)
            try:
                reply = await self._script(keys=keys, args=[self._pending_ttl, *reads])
            except asyncio.CancelledError:
                for *_, decided in batch:
                    decided.cancel()
                raise
            except Exception as exc:
                for *_, decided in batch:
                    if not decided.done():
                        decided.set_exception(exc)
                continue
            for i, (*_, decided) in enumerate(batch):
                claimed, held, record = reply[3 * i : 3 * i + 3]
                if not decided.done():  # its caller may have gone
                    decided.set_result(
                        Claim(
                            claimed=bool(claimed),
                            record=bytes(record) if record else None,
                            pending=bytes(held or b"") == PENDING,
                        )
                    )

    async def release(self, key: str) -> None:
        await self._client.delete(key)

    def confirm_soon(self, key: str) -> None:
        """Confirm in the background, together with whatever else is waiting to be confirmed."""
        self._to_confirm.append(key)
        if self._confirming is None or self._confirming.done():
            self._confirming = asyncio.get_running_loop().create_task(
                self._confirm_waiting(), context=Context()
            )

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
                await self._confirm(keys=keys, args=[self._ttl])
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
