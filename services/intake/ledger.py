"""What intake has published: (source, id) → content hash, kept in Redis.

A batch's events are claimed as `p:<hash>` before they are published and confirmed as `<hash>`
once the broker acknowledged them, in one Redis round trip each for the whole batch, so two
requests racing with the same event never both publish it, and a failed publication (released)
leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import redis.asyncio as aioredis

from services.common.coordination import Keys
from services.intake.domain import Candidate

PENDING = "p:"  # marks a claim whose publication is under way

# For each key: claim it with `p:<digest>` if free, else report what it holds. Keys and digests
# travel as one newline-joined argument each and the answer as one string: with 500 events a
# request, packing and parsing 1,000 separate arguments cost more than the script itself.
# (Keys of one call may fall in different slots: this needs a single Redis, not a cluster.)
_CLAIM = """
local ttl = ARGV[1]
local digests = {}
for d in string.gmatch(ARGV[3], '[^\\n]+') do digests[#digests + 1] = d end
local out = {}
local i = 0
for key in string.gmatch(ARGV[2], '[^\\n]+') do
  i = i + 1
  local held = redis.call('GET', key)
  if held then
    out[i] = held
  else
    redis.call('SET', key, 'p:' .. digests[i], 'EX', ttl)
    out[i] = ''
  end
end
return table.concat(out, '\\n')
"""
_CONFIRM = """
local ttl = ARGV[1]
local digests = {}
for d in string.gmatch(ARGV[3], '[^\\n]+') do digests[#digests + 1] = d end
local i = 0
for key in string.gmatch(ARGV[2], '[^\\n]+') do
  i = i + 1
  redis.call('SET', key, digests[i], 'EX', ttl)
end
return i
"""


class StillPublishing(Exception):
    """Another request is publishing the same events right now."""


@dataclass
class BatchClaim:
    """What claiming a batch found: ours to publish, and the content hashes held before."""

    ours: list[Candidate]
    held: dict[str, str]
    pending: bool  # some are being published by another request right now


class EventLedger:
    """Claims, confirmations and releases of a batch's events, by (source, id)."""

    def __init__(
        self, client: aioredis.Redis, keys: Keys, ttl_seconds: int, wait_seconds: float
    ) -> None:
        self._client = client
        self._keys = keys
        self._ttl = ttl_seconds
        self._wait = wait_seconds  # how long a request waits for another's publication
        self._claim = client.register_script(_CLAIM)
        self._confirm = client.register_script(_CONFIRM)

    def key(self, source: str, event_id: str) -> str:
        # Hashed: fixed size, and free of the separators the claim script splits on.
        digest = hashlib.sha256(f"{source}\x00{event_id}".encode()).hexdigest()[:32]
        return self._keys("intake", "event", digest)

    async def claim_settled(self, candidates: Sequence[Candidate]) -> BatchClaim:
        """Claim `candidates`; while another request is publishing some of them, release ours
        and try again until its verdict is in (`StillPublishing` after the wait)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait
        while True:
            claim = await self.claim(candidates)
            if not claim.pending:
                return claim
            await self.release(claim.ours)
            if loop.time() > deadline:
                raise StillPublishing
            await asyncio.sleep(0.05)

    async def claim(self, candidates: Sequence[Candidate]) -> BatchClaim:
        if not candidates:
            return BatchClaim([], {}, pending=False)
        answer = await self._claim(args=[int(self._wait) + 60, *self._joined(candidates)])
        answers = answer.decode().split("\n")
        ours: list[Candidate] = []
        held: dict[str, str] = {}
        pending = False
        for candidate, value in zip(candidates, answers, strict=True):
            if not value:
                ours.append(candidate)
            elif value.startswith(PENDING):
                pending = True
            else:
                held[candidate.key] = value
        return BatchClaim(ours, held, pending)

    async def confirm(self, candidates: Sequence[Candidate]) -> None:
        if candidates:
            await self._confirm(args=[self._ttl, *self._joined(candidates)])

    async def release(self, candidates: Sequence[Candidate]) -> None:
        if candidates:
            await self._client.delete(*(c.key for c in candidates))

    @staticmethod
    def _joined(candidates: Sequence[Candidate]) -> tuple[str, str]:
        return "\n".join(c.key for c in candidates), "\n".join(c.digest for c in candidates)
