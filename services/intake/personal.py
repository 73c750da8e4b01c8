"""Intake's side of the personal data (CONTRACT section 10): the dossiers' data keys written to
`dossier.keys`, and the personal fields of `dossier.submitted` sealed before publication.

A dossier's data key is made the first time one of its events carries personal data, and
written (acks=all) before any event sealed with it is published; later events of the dossier
reuse it (`DataKeys`, which every intake replica follows). Two replicas making a key for the
same dossier would seal with different keys, so making one is claimed in Redis (`SET NX`, kept a
minute) in the event ledger's claim round trip, before the key is written: a replica seals a
batch with a key of its own for each dossier it does not know, and claims those with the
batch's events. One that wins a claim writes the key, then publishes; one that finds a claim
taken writes the keys it won, waits for the other's on the topic, and seals the batch again. A
request that writes no key (a conflict, a failure) releases its claims, except those of a key
write that may have reached the broker (`BrokerUnavailable.maybe_sent`): that key may still
land, and a key made after it would then not be the dossier's latest (compaction keeps the
latest), so events sealed with it would not open. Such a claim is kept uncertain
(`u:<token>:<ms>:<wrapped key>`: the time the write was given up, and the key written, as it
was written, wrapped by the KEK); the next request that meets it reads `dossier.keys` to its end,
no sooner than `SETTLE_MARGIN_MS` after that time: the key found there is the dossier's (the
batch is sealed again with it); none found, the request takes the claim over and writes the
claim's key again, not a new one, and seals the batch again with it. A write that lands later
still (held in a network's buffers past the take-over) is then the same key. A request that
meets no uncertain claim makes no Redis call more. An erasure deletes the dossier's claim: the
wrapped key in it is a copy of the key.

Sealing is deterministic (`sealing.seal`): a resent event seals to the same bytes, which the
event ledger compares. An erased dossier's key is gone for good: an event that would bring its
personal data back is refused (`PersonalDataErased`), the others pass.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis

from services.common.coordination import Keys
from services.common.data_keys import DataKeys, KeysUnavailable
from services.common.events import CloudEvent
from services.common.kafka import BrokerUnavailable, DurablePublisher
from services.common.logging import get_logger
from services.common.sealing import (
    SealingError,
    WrappedKey,
    has_personal_data,
    new_data_key,
    seal_data,
)
from services.common.topics import DOSSIER_KEYS
from services.common.tracing import traced_script
from services.intake.domain import canonical_bytes
from services.intake.ledger import (
    SWAP,
    UNCERTAIN,
    SideClaims,
    uncertain_fields,
    uncertain_since,
)

log = get_logger("motcua.intake.personal")

# How long the claim of making a dossier's key is kept: far longer than a follower lags behind
# the topic, so a replica that wins it knows that no other made the key before (it would have
# read it), and short enough that a replica dying between its claim and its write holds up that
# dossier's filing only that long.
CLAIM_SECONDS = 60
# How long the claim of a key write that may have reached the broker is kept uncertain: a
# request for the dossier within that time reads `dossier.keys` before it makes another key.
UNCERTAIN_SECONDS = 600
# How long after an uncertain key write was given up the end of `dossier.keys` tells that it did
# not land: the intake replicas' clocks apart, and a produce request the broker took before that
# time but appends while it answers the read.
SETTLE_MARGIN_MS = 2_000
WON = "1"  # a key claim's answer: ours
LOST = "0"  # another's


class PersonalDataErased(Exception):
    """Events that carry personal data of dossiers whose personal data was erased."""

    def __init__(self, indexes: Sequence[int], dossier_ids: Sequence[str]) -> None:
        super().__init__(f"personal data of {len(indexes)} erased dossier(s)")
        self.indexes = list(indexes)
        self.dossier_ids = list(dossier_ids)


def needs_key(value: Mapping[str, Any]) -> bool:
    """Whether an event (as JSON values) carries personal data to seal."""
    data = value.get("data")
    return (
        value.get("type") == "dossier.submitted"
        and isinstance(data, Mapping)
        and has_personal_data(data)
    )


def uncertain_claim(token: str, since_ms: int, wrapped: bytes) -> str:
    """What a key claim holds once its write may have reached the broker:
    `u:<token>:<ms>:<base64url of the wrapped key written>`."""
    return f"{UNCERTAIN}{token}:{since_ms}:{base64.urlsafe_b64encode(wrapped).decode()}"


def claimed_key(claim: str) -> bytes | None:
    """The wrapped key an uncertain claim holds (its record's value on `dossier.keys`, as it was
    written); None for another claim, or one without a readable key."""
    fields = uncertain_fields(claim)
    if fields is None or len(fields) < 3 or not fields[2]:
        return None
    try:
        return base64.urlsafe_b64decode(fields[2].encode())
    except (binascii.Error, ValueError):
        return None


@dataclass(frozen=True)
class KeyClaims:
    """The answers to a batch's key claims (`SideClaims`), by dossier id."""

    won: list[str]
    lost: list[str]
    uncertain: dict[str, str]  # dossier id → the uncertain claim held (`u:<token>:<ms>`)


def key_claims(dossier_ids: Sequence[str], answers: Sequence[str]) -> KeyClaims:
    """Sort the claim round trip's answers ('1', '0', or the uncertain claim held) by dossier."""
    won: list[str] = []
    lost: list[str] = []
    uncertain: dict[str, str] = {}
    for dossier_id, answer in zip(dossier_ids, answers, strict=True):
        if answer == WON:
            won.append(dossier_id)
        elif answer.startswith(UNCERTAIN):
            uncertain[dossier_id] = answer
        else:
            lost.append(dossier_id)
    return KeyClaims(won, lost, uncertain)


def settle_at_ms(uncertain: Iterable[str]) -> int:
    """When (ms) the end of `dossier.keys` tells whether the uncertain key writes landed: the
    latest one given up plus `SETTLE_MARGIN_MS` (a claim without a time: at once)."""
    return max((uncertain_since(value) or 0 for value in uncertain), default=0) + SETTLE_MARGIN_MS


def settled_answers(
    dossier_ids: Sequence[str], answers: Sequence[str], taken_over: Iterable[str]
) -> list[str]:
    """The claims' answers once the uncertain ones are settled: ours where this request took the
    claim over, another's for the rest (the key landed, or another request took it over)."""
    taken = set(taken_over)
    return [
        WON if answer == WON or dossier_id in taken else LOST
        for dossier_id, answer in zip(dossier_ids, answers, strict=True)
    ]


# Release each key of ARGV[2] (newline-joined) that still holds our token ARGV[1]: the claims of a
# request that made no key after all.
_RELEASE = """
local n = 0
for key in string.gmatch(ARGV[2], '[^\\n]+') do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key); n = n + 1 end
end
return n
"""


@dataclass
class SealedBatch:
    """A batch's events as they are published (`canonical_bytes`, same order), every personal
    field sealed by its dossier's key, and the keys made for dossiers this replica did not
    know: each to be claimed (`claims`, in the event ledger's claim round trip) and written
    (`write_keys`) before any of these events is published."""

    encoded: list[bytes]
    made: dict[str, bytes]  # dossier id → the data key made for it, sorted by dossier id
    token: str  # the claims' token (when `made`)
    # dossier id → the wrapped key of an uncertain claim this request took over (`settle`): it
    # is written instead of the key made, and the batch sealed again with it
    recovered: dict[str, bytes] = field(default_factory=dict)


class Sealer:
    """Seals a batch's personal fields; makes, claims and writes the data keys it needs."""

    def __init__(
        self,
        keys: DataKeys,
        publisher: DurablePublisher,
        redis: aioredis.Redis,
        redis_keys: Keys,
        *,
        wait_seconds: float,
    ) -> None:
        self.keys = keys
        self._publisher = publisher
        self._claims = redis_keys
        self._wait = wait_seconds
        self._redis = redis
        self._release_script = redis.register_script(_RELEASE)
        self._swap = traced_script(redis, SWAP, "data_key_claims_swap")

    async def seal(self, events: Sequence[CloudEvent[Any]]) -> SealedBatch:
        """Each event as it is published, every personal field sealed: by its dossier's key,
        or by a key made now for a dossier that has none yet (`SealedBatch.made`). Raises
        `PersonalDataErased`, `KeysUnavailable`."""
        values = [e.to_dict() for e in events]
        personal = [needs_key(v) for v in values]
        if not any(personal):
            return SealedBatch([canonical_bytes(v) for v in values], {}, "")
        if not self.keys.caught_up:
            await self.keys.read_to_now()
        erased = [i for i, e in enumerate(events) if personal[i] and self.keys.erased(e.subject)]
        if erased:
            raise PersonalDataErased(erased, [events[i].subject for i in erased])
        wanted = sorted({e.subject for e, p in zip(events, personal, strict=True) if p})
        made = {d: new_data_key() for d in wanted if d not in self.keys}
        data_keys = {d: made.get(d) or await self.keys.data_key(d) for d in wanted}
        encoded: list[bytes] = []
        for event, value, has_personal in zip(events, values, personal, strict=True):
            if has_personal:
                value["data"] = seal_data(value["data"], data_keys[event.subject])
            encoded.append(canonical_bytes(value))
        return SealedBatch(encoded, made, uuid.uuid4().hex if made else "")

    def claims(self, batch: SealedBatch) -> SideClaims | None:
        """The claims of making `batch`'s new keys, for the event ledger's claim round trip."""
        if not batch.made:
            return None
        return SideClaims(batch.token, CLAIM_SECONDS, [self._claim_key(d) for d in batch.made])

    async def settle(self, batch: SealedBatch, answers: Sequence[str]) -> list[str]:
        """`answers` to `batch`'s key claims (the claim round trip's) with the uncertain claims
        settled: `dossier.keys` read to its end (no sooner than `settle_at_ms`); a key that did
        not land is ours to write if this request takes its claim over ('1': the claim's key,
        kept in `batch.recovered`); one that landed is another's ('0': the batch is sealed again
        with it). Without an uncertain claim, `answers` as they are, at no cost.
        `KeysUnavailable` when the topic cannot be read now (the claims stay uncertain)."""
        claims = key_claims(list(batch.made), answers)
        if not claims.uncertain:
            return list(answers)
        wait_ms = settle_at_ms(claims.uncertain.values()) - int(time.time() * 1000)
        if wait_ms > 0:
            await asyncio.sleep(wait_ms / 1000)
        await self.keys.read_to_now()
        missing = [d for d in claims.uncertain if d not in self.keys and not self.keys.erased(d)]
        taken: list[str] = []
        if missing:
            swapped = await self._swap(
                args=[
                    CLAIM_SECONDS,
                    "\n".join(self._claim_key(d) for d in missing),
                    "\n".join(claims.uncertain[d] for d in missing),
                    "\n".join(batch.token for _ in missing),
                ]
            )
            taken = [d for d, won in zip(missing, swapped.decode(), strict=True) if won == WON]
        for dossier_id in taken:
            wrapped = self._readable(dossier_id, claims.uncertain[dossier_id])
            if wrapped is not None:
                batch.recovered[dossier_id] = wrapped
        log.info(
            "intake_key_claims_settled",
            uncertain=len(claims.uncertain),
            landed=len(claims.uncertain) - len(missing),
            taken_over=len(taken),
            rewritten=len(batch.recovered),
        )
        return settled_answers(list(batch.made), answers, taken)

    def _readable(self, dossier_id: str, claim: str) -> bytes | None:
        """The wrapped key of an uncertain claim, if it unwraps with the KEKs listed now (one
        wrapped by a KEK no longer listed cannot be written again: a new key is made)."""
        wrapped = claimed_key(claim)
        if wrapped is None:
            return None
        try:
            self.keys.keks.unwrap(dossier_id, WrappedKey.decode(wrapped))
        except SealingError as exc:
            log.warning("intake_key_claim_unreadable", dossier_id=dossier_id, reason=str(exc))
            return None
        return wrapped

    async def write_keys(self, batch: SealedBatch, answers: Sequence[str]) -> bool:
        """Write (acks=all) the keys of `batch.made` whose claim is ours (`answers`, settled:
        '1' or '0' per key, in order); True when that is all of them and the batch was sealed
        with them. Otherwise answer False (the batch must be sealed again): another replica is
        making the rest (waited for until they are read from `dossier.keys`), or a key taken
        over from an uncertain claim was written instead of the one made. A failed write raises
        `BrokerUnavailable`: its claims are kept uncertain, with the keys written, when the keys
        may have reached the broker (`maybe_sent`), else released."""
        if not batch.made:
            return True
        ours = [d for d, won in zip(batch.made, answers, strict=True) if won == WON]
        if ours:
            wrapped = {
                d: batch.recovered.get(d) or self.keys.keks.wrap(d, batch.made[d]).encode()
                for d in ours
            }
            try:
                await self._publisher.publish(
                    [(DOSSIER_KEYS, d.encode(), value) for d, value in wrapped.items()]
                )
            except BrokerUnavailable as exc:
                if exc.maybe_sent:
                    await self._hold_uncertain(batch, wrapped, int(time.time() * 1000))
                else:
                    await self.release(batch)
                raise
            except BaseException:
                await self.release(batch)
                raise
            for dossier_id, value in wrapped.items():
                self.keys.apply_written(dossier_id, value)
        if len(ours) < len(batch.made):
            await self._await_keys([d for d in batch.made if d not in ours])
            return False
        return not batch.recovered

    async def release(self, batch: SealedBatch) -> None:
        """`batch`'s claims, dropped when its keys are not written (a conflict, a failure), so
        the portal's retry can make them."""
        if batch.made:
            with contextlib.suppress(aioredis.RedisError, OSError):
                await self._release_script(
                    args=[batch.token, "\n".join(self._claim_key(d) for d in batch.made)]
                )

    async def forget(self, dossier_id: str) -> None:
        """Delete the dossier's key claim (an erasure: an uncertain claim holds its wrapped key).
        Best effort: a claim left by an unreachable Redis expires within `UNCERTAIN_SECONDS`,
        and no request reads it for an erased dossier (`seal` refuses it first)."""
        try:
            await self._redis.delete(self._claim_key(dossier_id))
        except (aioredis.RedisError, OSError) as exc:
            log.warning("intake_key_claim_not_deleted", dossier_id=dossier_id, error=str(exc))

    async def _hold_uncertain(
        self, batch: SealedBatch, wrapped: Mapping[str, bytes], since_ms: int
    ) -> None:
        """Our claims of keys whose write may have reached the broker, kept uncertain for
        `UNCERTAIN_SECONDS` with the key written (`u:<token>:<ms>:<wrapped key>`), to be
        settled by the next request that meets them (`settle`)."""
        with contextlib.suppress(aioredis.RedisError, OSError):
            await self._swap(
                args=[
                    UNCERTAIN_SECONDS,
                    "\n".join(self._claim_key(d) for d in wrapped),
                    "\n".join(batch.token for _ in wrapped),
                    "\n".join(uncertain_claim(batch.token, since_ms, w) for w in wrapped.values()),
                ]
            )

    async def _await_keys(self, dossier_ids: Sequence[str]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait
        # an erased dossier's key never comes: sealing again refuses its personal data
        while any(d not in self.keys and not self.keys.erased(d) for d in dossier_ids):
            if loop.time() > deadline:
                raise KeysUnavailable("another replica's data keys did not arrive in time")
            await asyncio.sleep(0.05)
            await self.keys.read_to_now()

    def _claim_key(self, dossier_id: str) -> str:
        return self._claims("intake", "data-key", dossier_id)
