"""Intake's side of the personal data (CONTRACT section 10): the dossiers' data keys written to
`dossier.keys`, and the personal fields of `dossier.submitted` sealed before publication.

A dossier's data key is made the first time one of its events carries personal data, and
written (acks=all) before any event sealed with it is published; later events of the dossier
reuse it (`DataKeys`, which every intake replica follows). Two replicas making a key for the
same dossier would seal with different keys, so making one is claimed in Redis first (`SET NX`,
kept a minute, one round trip per batch): a replica that wins the claim of a dossier it does not
know makes the key, one that finds the claim taken waits for the other's key on the topic. A
write that fails releases the claims.

Sealing is deterministic (`sealing.seal`): a resent event seals to the same bytes, which the
event ledger compares. An erased dossier's key is gone for good: an event that would bring its
personal data back is refused (`PersonalDataErased`), the others pass.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Mapping, Sequence
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


# Claim each key of ARGV[3] (newline-joined) with the token ARGV[1] for ARGV[2] seconds if it is
# free: one command for a whole batch (as the event ledger's scripts), answered '1' (ours) or
# '0' (another's) per key. A failed write releases only what still holds our token.
_CLAIM = """
local out = {}
local i = 0
for key in string.gmatch(ARGV[3], '[^\\n]+') do
  i = i + 1
  if redis.call('SET', key, ARGV[1], 'NX', 'EX', ARGV[2]) then out[i] = '1' else out[i] = '0' end
end
return table.concat(out, '')
"""
_RELEASE = """
local n = 0
for key in string.gmatch(ARGV[2], '[^\\n]+') do
  if redis.call('GET', key) == ARGV[1] then redis.call('DEL', key); n = n + 1 end
end
return n
"""


class Sealer:
    """Seals a batch's personal fields, making and writing the data keys it needs first."""

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
        self._claim = redis.register_script(_CLAIM)
        self._release_script = redis.register_script(_RELEASE)

    async def encode(self, events: Sequence[CloudEvent[Any]]) -> list[bytes]:
        """Each event as it is published (`canonical_bytes`, same order), every personal field
        sealed by its dossier's key. Raises `PersonalDataErased`, `KeysUnavailable` or
        `BrokerUnavailable`."""
        values = [e.to_dict() for e in events]
        personal = [needs_key(v) for v in values]
        wanted = {e.subject for e, p in zip(events, personal, strict=True) if p}
        if not wanted:
            return [canonical_bytes(v) for v in values]
        if not self.keys.caught_up:
            await self.keys.read_to_now()
        erased = [i for i, e in enumerate(events) if personal[i] and self.keys.erased(e.subject)]
        if erased:
            raise PersonalDataErased(erased, [events[i].subject for i in erased])
        missing = sorted(d for d in wanted if not self.keys.known(d))
        made = await self._make_keys(missing) if missing else {}
        encoded: list[bytes] = []
        for event, value, has_personal in zip(events, values, personal, strict=True):
            if has_personal:
                key = made.get(event.subject) or await self.keys.data_key(event.subject)
                value["data"] = seal_data(value["data"], key)
            encoded.append(canonical_bytes(value))
        return encoded

    async def _make_keys(self, dossier_ids: Sequence[str]) -> dict[str, bytes]:
        """A data key for each of `dossier_ids`, written to `dossier.keys` (acks=all) by whichever
        replica claims it; the others wait for it on the topic. Answers the keys made here."""
        token = uuid.uuid4().hex
        claims = "\n".join(self._claim_key(d) for d in dossier_ids)
        won = await self._claim(args=[token, CLAIM_SECONDS, claims])
        if isinstance(won, bytes):
            won = won.decode()
        ours = [d for d, claimed in zip(dossier_ids, str(won), strict=True) if claimed == "1"]
        made: dict[str, bytes] = {}
        if ours:
            wrapped: dict[str, bytes] = {}
            for dossier_id in ours:
                made[dossier_id] = new_data_key()
                wrapped[dossier_id] = self.keys.keks.wrap(dossier_id, made[dossier_id]).encode()
            try:
                await self._publisher.publish(
                    [(DOSSIER_KEYS, d.encode(), value) for d, value in wrapped.items()]
                )
            except BaseException:
                await self._release(ours, token)
                raise
            for dossier_id, value in wrapped.items():
                self.keys.apply_written(dossier_id, value)
        others = [d for d in dossier_ids if not self.keys.known(d)]
        if others:
            await self._await_keys(others)
        return made

    async def _await_keys(self, dossier_ids: Sequence[str]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait
        while any(not self.keys.known(d) for d in dossier_ids):
            if loop.time() > deadline:
                raise KeysUnavailable("another replica's data keys did not arrive in time")
            await asyncio.sleep(0.05)
            await self.keys.read_to_now()

    async def _release(self, dossier_ids: Sequence[str], token: str) -> None:
        """Our claims, dropped after a failed write, so the portal's retry can make the keys."""
        with contextlib.suppress(aioredis.RedisError, OSError):
            await self._release_script(
                args=[token, "\n".join(self._claim_key(d) for d in dossier_ids)]
            )

    def _claim_key(self, dossier_id: str) -> str:
        return self._claims("intake", "data-key", dossier_id)
