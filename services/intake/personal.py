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
request that writes no key (a conflict, a failure) releases its claims.

Sealing is deterministic (`sealing.seal`): a resent event seals to the same bytes, which the
event ledger compares. An erased dossier's key is gone for good: an event that would bring its
personal data back is refused (`PersonalDataErased`), the others pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis

from services.common.coordination import Keys
from services.common.data_keys import DataKeys, KeysUnavailable
from services.common.events import CloudEvent
from services.common.kafka import DurablePublisher
from services.common.logging import get_logger
from services.common.sealing import has_personal_data, new_data_key, seal_data
from services.common.topics import DOSSIER_KEYS
from services.intake.domain import canonical_bytes
from services.intake.ledger import SideClaims

log = get_logger("motcua.intake.personal")

# How long the claim of making a dossier's key is kept: far longer than a follower lags behind
# the topic, so a replica that wins it knows that no other made the key before (it would have
# read it), and short enough that a replica dying between its claim and its write holds up that
# dossier's filing only that long.
CLAIM_SECONDS = 60


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
        self._release_script = redis.register_script(_RELEASE)

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
        made = {d: new_data_key() for d in wanted if not self.keys.known(d)}
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

    async def write_keys(self, batch: SealedBatch, answers: str) -> bool:
        """Write (acks=all) the keys of `batch.made` whose claim is ours (`answers`: '1' or '0'
        per key, in order); True when that is all of them. Otherwise another replica is making
        the rest: wait until they are read from `dossier.keys` and answer False (the batch must
        be sealed again). A failed write releases the claims and raises `BrokerUnavailable`."""
        if not batch.made:
            return True
        ours = [d for d, won in zip(batch.made, answers, strict=True) if won == "1"]
        if ours:
            wrapped = {d: self.keys.keks.wrap(d, batch.made[d]).encode() for d in ours}
            try:
                await self._publisher.publish(
                    [(DOSSIER_KEYS, d.encode(), value) for d, value in wrapped.items()]
                )
            except BaseException:
                await self.release(batch)
                raise
            for dossier_id, value in wrapped.items():
                self.keys.apply_written(dossier_id, value)
        if len(ours) == len(batch.made):
            return True
        await self._await_keys([d for d in batch.made if d not in ours])
        return False

    async def release(self, batch: SealedBatch) -> None:
        """`batch`'s claims, dropped when its keys are not written (a conflict, a failure), so
        the portal's retry can make them."""
        if batch.made:
            with contextlib.suppress(aioredis.RedisError, OSError):
                await self._release_script(
                    args=[batch.token, "\n".join(self._claim_key(d) for d in batch.made)]
                )

    async def _await_keys(self, dossier_ids: Sequence[str]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait
        while any(not self.keys.known(d) for d in dossier_ids):
            if loop.time() > deadline:
                raise KeysUnavailable("another replica's data keys did not arrive in time")
            await asyncio.sleep(0.05)
            await self.keys.read_to_now()

    def _claim_key(self, dossier_id: str) -> str:
        return self._claims("intake", "data-key", dossier_id)
