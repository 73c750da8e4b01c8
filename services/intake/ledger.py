"""What intake has published: (source, id) → content hash, kept in Redis, restored from the topic.

A batch's events are claimed as `p:<hash>` before they are published and confirmed as `<hash>`
once the broker acknowledged them, in one Redis round trip each for the whole batch, so two
requests racing with the same event never both publish it, and a failed publication (released)
leaves nothing behind.

Redis is a cache of `dossier.events`, not the record: the topic is.
- **Redis lost** (restarted empty, flushed): a marker key, set when the ledger is complete, is
  gone; the first claim finds that out in the same round trip, and the ledger is restored from
  the events written to `dossier.events` within the dedupe window (one replica restores, under a
  lock; requests answer 503 until it is done), so a portal's resend is still a duplicate.
- **Broker stalled**: a publication that failed after the events were handed to a connection may
  still land when the broker resumes. Its claims are kept as `u:<hash>:<ms>` (uncertain) instead
  of released; the next request with those events reads the topic from that moment: found, they
  are duplicates; not found, they are published.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field

import orjson
import redis.asyncio as aioredis
from aiokafka.errors import KafkaError

from services.common.changelog import read_to_end
from services.common.coordination import Keys
from services.common.kafka import BrokerUnavailable
from services.common.logging import get_logger
from services.common.topics import DOSSIER_EVENTS
from services.common.tracing import traced_script
from services.intake.domain import Candidate, content_digest

log = get_logger("motcua.intake.ledger")

PENDING = "p:"  # marks a claim whose publication is under way
UNCERTAIN = "u:"  # marks a publication that failed after its events were sent: `u:<hash>:<ms>`
COLD = "!"  # the claim script's answer when the ledger's completeness marker is missing
RESTORE_LOCK_SECONDS = 600

# Written records of the topic since a time: batches of (value, timestamp in ms).
History = Callable[[int], AsyncIterator[Sequence[tuple[bytes, int]]]]

# For each key: claim it with `p:<digest>` if free, else report what it holds. Keys and digests
# travel as one newline-joined argument each and the answer as one string: with 500 events a
# request, packing and parsing 1,000 separate arguments cost more than the script itself.
# Without the marker ARGV[4] the ledger is incomplete (Redis lost it) and nothing is claimed.
# The same round trip takes the side claims of ARGV[7] (newline-joined) with the token ARGV[5]
# for ARGV[6] seconds, each answered on the answer's first line (space-joined): '1' (free, or
# ours already), the claim held if it is uncertain (`u:...`), or '0' (another's)
# (`SideClaims`: intake's claims of making data keys).
# (Keys of one call may fall in different slots: this needs a single Redis, not a cluster.)
_CLAIM = """
if redis.call('EXISTS', ARGV[4]) == 0 then return '!' end
local side = {}
local j = 0
for key in string.gmatch(ARGV[7], '[^\\n]+') do
  j = j + 1
  if redis.call('SET', key, ARGV[5], 'NX', 'EX', ARGV[6]) then side[j] = '1'
  else
    local held = redis.call('GET', key)
    if held == ARGV[5] then side[j] = '1'
    elseif string.sub(held, 1, 2) == 'u:' then side[j] = held
    else side[j] = '0' end
  end
end
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
return table.concat(side, ' ') .. '\\n' .. table.concat(out, '\\n')
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
# Replace each key's value ARGV[3][i] by ARGV[4][i] (EX ARGV[1]) only if it still holds it;
# answers '1' or '0' per key (the ledger's claims, and intake's claims of making data keys).
SWAP = """
local ttl = ARGV[1]
local expected = {}
for v in string.gmatch(ARGV[3], '[^\\n]+') do expected[#expected + 1] = v end
local new = {}
for v in string.gmatch(ARGV[4], '[^\\n]+') do new[#new + 1] = v end
local out = {}
local i = 0
for key in string.gmatch(ARGV[2], '[^\\n]+') do
  i = i + 1
  if redis.call('GET', key) == expected[i] then
    redis.call('SET', key, new[i], 'EX', ttl)
    out[i] = '1'
  else
    out[i] = '0'
  end
end
return table.concat(out, '')
"""


def accepted_entry(value: bytes | None) -> tuple[str, str, str] | None:
    """(source, id, content hash) of an event as intake published it (canonical JSON); None for
    a record that is not one."""
    if not value:
        return None
    try:
        event = orjson.loads(value)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(event, dict):
        return None
    source, event_id = event.get("source"), event.get("id")
    if not isinstance(source, str) or not isinstance(event_id, str):
        return None
    return source, event_id, content_digest(value, event)


def uncertain_fields(value: str) -> list[str] | None:
    """The fields of an uncertain claim, `u:<hash or token>:<ms>[:<more>]` (at most three:
    the last is the rest, whatever it holds); None for another claim."""
    if not value.startswith(UNCERTAIN):
        return None
    return value[len(UNCERTAIN) :].split(":", 2)


def uncertain_since(value: str) -> int | None:
    """The time (ms) an uncertain claim was published at; None otherwise."""
    fields = uncertain_fields(value)
    return int(fields[1]) if fields and len(fields) > 1 and fields[1].isdigit() else None


async def written_since(bootstrap: str, since_ms: int) -> AsyncIterator[list[tuple[bytes, int]]]:
    """The records of `dossier.events` written at or after `since_ms`, as (value, ms);
    `BrokerUnavailable` if the topic cannot be read now."""
    try:
        async for batch in read_to_end(bootstrap, DOSSIER_EVENTS, since_ms=since_ms):
            yield [
                (record.value, record.timestamp)
                for records in batch.values()
                for record in records
                if record.value is not None
            ]
    except (KafkaError, OSError, TimeoutError) as exc:
        raise BrokerUnavailable(
            f"cannot read {DOSSIER_EVENTS}: {type(exc).__name__}", maybe_sent=False
        ) from exc


class StillPublishing(Exception):
    """Another request is publishing the same events right now."""


class LedgerRestoring(Exception):
    """The ledger is being restored from `dossier.events` (Redis lost it); retry shortly."""


@dataclass
class BatchClaim:
    """What claiming a batch found: ours to publish, the content hashes held before, and the
    uncertain claims (key → `u:<hash>:<ms>`) of publications whose outcome is not known."""

    ours: list[Candidate]
    held: dict[str, str]
    pending: bool  # some are being published by another request right now
    uncertain: dict[str, str] = field(default_factory=dict)
    # the side claims' answers, in order: '1' ours, '0' another's, or the uncertain claim held
    side: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SideClaims:
    """Keys claimed in the ledger's claim round trip (`SET NX` with `token` for `seconds`; a key
    that already holds `token` is ours again, one held uncertain is answered with what it holds):
    intake's claims of making data keys."""

    token: str
    seconds: int
    keys: Sequence[str]


class EventLedger:
    """Claims, confirmations and releases of a batch's events, by (source, id); restored from
    `history` (the records of `dossier.events` since a time) when Redis lost it."""

    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        ttl_seconds: int,
        wait_seconds: float,
        history: History,
    ) -> None:
        self._client = client
        self._keys = keys
        self._ttl = ttl_seconds
        self._wait = wait_seconds  # how long a request waits for another's publication
        self._history = history
        self._claim = traced_script(client, _CLAIM, "ledger_claim")
        self._confirm = traced_script(client, _CONFIRM, "ledger_confirm")
        self._swap = traced_script(client, SWAP, "ledger_swap")
        self._complete = keys("intake", "ledger", "complete")
        self._restoring_lock = keys("intake", "ledger", "restoring")
        self._restore: asyncio.Task[None] | None = None

    def key(self, source: str, event_id: str) -> str:
        # Hashed: fixed size, and free of the separators the claim script splits on.
        digest = hashlib.sha256(f"{source}\x00{event_id}".encode()).hexdigest()[:32]
        return self._keys("intake", "event", digest)

    async def claim_settled(
        self, candidates: Sequence[Candidate], side: SideClaims | None = None
    ) -> BatchClaim:
        """Claim `candidates` (and `side`, in the same round trips); while another request is
        publishing some of them, release ours and try again until its verdict is in
        (`StillPublishing` after the wait). Uncertain claims are settled against the topic;
        an incomplete ledger is restored first (`LedgerRestoring` if that takes longer than
        the wait)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait
        while True:
            claim = await self._claim_or_restore(candidates, deadline, side)
            if not claim.pending:
                if claim.uncertain:
                    await self._settle(claim, candidates)
                return claim
            await self.release(claim.ours)
            if loop.time() > deadline:
                raise StillPublishing
            await asyncio.sleep(0.05)

    async def claim(
        self, candidates: Sequence[Candidate], side: SideClaims | None = None
    ) -> BatchClaim:
        """One claim round trip (with `side`'s claims); `LedgerCold` if the ledger is
        incomplete (nothing claimed then)."""
        if not candidates and side is None:
            return BatchClaim([], {}, pending=False)
        side_args = [side.token, side.seconds, "\n".join(side.keys)] if side else ["", 0, ""]
        answer = (
            await self._claim(
                args=[int(self._wait) + 60, *self._joined(candidates), self._complete, *side_args]
            )
        ).decode()
        if answer == COLD:
            raise LedgerCold
        first, _, answer = answer.partition("\n")
        sides = first.split(" ") if first else []
        if not candidates:
            return BatchClaim([], {}, pending=False, side=sides)
        ours: list[Candidate] = []
        held: dict[str, str] = {}
        uncertain: dict[str, str] = {}
        pending = False
        for candidate, value in zip(candidates, answer.split("\n"), strict=True):
            if not value:
                ours.append(candidate)
            elif value.startswith(PENDING):
                pending = True
            elif value.startswith(UNCERTAIN):
                uncertain[candidate.key] = value
            else:
                held[candidate.key] = value
        return BatchClaim(ours, held, pending, uncertain, side=sides)

    async def confirm(self, candidates: Sequence[Candidate]) -> None:
        if candidates:
            await self._confirm(args=[self._ttl, *self._joined(candidates)])

    async def release(self, candidates: Sequence[Candidate]) -> None:
        if candidates:
            await self._client.delete(*(c.key for c in candidates))

    async def hold_uncertain(self, candidates: Sequence[Candidate], since_ms: int) -> None:
        """Our claims of a publication that failed after the events were sent, kept as
        uncertain (they may still land), to be settled against the topic by the next claim."""
        if candidates:
            await self._swap(
                args=[
                    self._ttl,
                    "\n".join(c.key for c in candidates),
                    "\n".join(PENDING + c.digest for c in candidates),
                    "\n".join(f"{UNCERTAIN}{c.digest}:{since_ms}" for c in candidates),
                ]
            )

    async def complete(self) -> bool:
        """Whether the ledger holds every event of the dedupe window (Redis did not lose it);
        starts restoring it if not. False while Redis is unreachable."""
        try:
            if await self._client.exists(self._complete):
                return True
        except aioredis.RedisError:
            return False
        self._start_restore()
        return False

    async def _claim_or_restore(
        self, candidates: Sequence[Candidate], deadline: float, side: SideClaims | None
    ) -> BatchClaim:
        try:
            return await self.claim(candidates, side)
        except LedgerCold:
            pass
        restore = self._start_restore()
        timeout = max(0.0, deadline - asyncio.get_running_loop().time())
        try:
            await asyncio.wait_for(asyncio.shield(restore), timeout)
        except TimeoutError:
            raise LedgerRestoring from None
        return await self.claim(candidates, side)

    def _start_restore(self) -> asyncio.Task[None]:
        if self._restore is None or self._restore.done():
            self._restore = asyncio.create_task(self._restore_from_topic())
            self._restore.add_done_callback(_log_failure)
        return self._restore

    async def _restore_from_topic(self) -> None:
        """Write every event of `dossier.events` within the dedupe window into the ledger, then
        mark it complete. One replica restores (a lock in Redis); the others wait for the mark."""
        token = uuid.uuid4().hex
        for _ in range(RESTORE_LOCK_SECONDS * 5):  # a restorer that died leaves its lock to expire
            if await self._client.exists(self._complete):
                return
            if await self._client.set(
                self._restoring_lock, token, nx=True, ex=RESTORE_LOCK_SECONDS
            ):
                break
            await asyncio.sleep(0.2)
        else:
            return
        try:
            started = time.monotonic()
            now_ms = int(time.time() * 1000)
            restored = 0
            async for batch in self._history(now_ms - self._ttl * 1000):
                pipe = self._client.pipeline(transaction=False)
                for value, written_ms in batch:
                    entry = accepted_entry(value)
                    left = self._ttl - (now_ms - written_ms) // 1000
                    if entry is None or left <= 0:
                        continue
                    source, event_id, digest = entry
                    pipe.set(self.key(source, event_id), digest, ex=left)
                    restored += 1
                await pipe.execute()
            await self._client.set(self._complete, str(now_ms))
            log.info(
                "intake_ledger_restored",
                events=restored,
                seconds=round(time.monotonic() - started, 3),
            )
        finally:
            if await self._client.get(self._restoring_lock) == token.encode():
                await self._client.delete(self._restoring_lock)

    async def _settle(self, claim: BatchClaim, candidates: Sequence[Candidate]) -> None:
        """Settle uncertain claims against the topic: an event found there is held with the
        content it was published with; one not found becomes ours to publish."""
        wanted = dict(claim.uncertain)
        since = min(uncertain_since(v) or 0 for v in wanted.values()) - 5_000
        landed: dict[str, str] = {}
        async for batch in self._history(since):
            for value, _ in batch:
                entry = accepted_entry(value)
                if entry is None:
                    continue
                key = self.key(entry[0], entry[1])
                if key in wanted and key not in landed:
                    landed[key] = entry[2]
        by_key = {c.key: c for c in candidates}
        found = [key for key in wanted if key in landed]
        if found:
            await self._swap(
                args=[
                    self._ttl,
                    "\n".join(found),
                    "\n".join(wanted[k] for k in found),
                    "\n".join(landed[k] for k in found),
                ]
            )
            claim.held.update({k: landed[k] for k in found})
        missing = [by_key[key] for key in wanted if key not in landed]
        if missing:
            swapped = await self._swap(
                args=[
                    int(self._wait) + 60,
                    "\n".join(c.key for c in missing),
                    "\n".join(wanted[c.key] for c in missing),
                    "\n".join(PENDING + c.digest for c in missing),
                ]
            )
            for candidate, won in zip(missing, swapped.decode(), strict=True):
                if won == "1":
                    claim.ours.append(candidate)
                else:
                    claim.pending = True  # another request settled it first: wait for it
        claim.uncertain.clear()
        claim.ours.sort(key=lambda c: c.index)
        if claim.pending:
            await self.release(claim.ours)
            raise StillPublishing

    @staticmethod
    def _joined(candidates: Sequence[Candidate]) -> tuple[str, str]:
        return "\n".join(c.key for c in candidates), "\n".join(c.digest for c in candidates)


class LedgerCold(Exception):
    """The ledger's completeness marker is missing: Redis lost what it held."""


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("intake_ledger_restore_failed", error=str(exc))
