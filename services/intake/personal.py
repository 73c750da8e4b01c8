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
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis

from services.common.coordination import Keys
from services.common.data_keys import DataKeys, KeysUnavailable
from services.common.events import CloudEvent, parse_event
from services.common.kafka import DurablePublisher
from services.common.logging import get_logger
from services.common.sealing import has_personal_data, new_data_key, seal_data
from services.common.topics import DOSSIER_KEYS

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


def needs_key(event: CloudEvent[Any]) -> bool:
    return event.type == "dossier.submitted" and has_personal_data(event.data.model_dump())


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
        self._redis = redis
        self._claims = redis_keys
        self._wait = wait_seconds

    async def seal(self, events: Sequence[CloudEvent[Any]]) -> list[CloudEvent[Any]]:
        """`events` with every personal field sealed by its dossier's key (same order).
        Raises `PersonalDataErased`, `KeysUnavailable` or `BrokerUnavailable`."""
        personal = [needs_key(e) for e in events]
        wanted = {e.subject for e, p in zip(events, personal, strict=True) if p}
        if not wanted:
            return list(events)
        if not self.keys.caught_up:
            await self.keys.read_to_now()
        erased = [i for i, e in enumerate(events) if personal[i] and self.keys.erased(e.subject)]
        if erased:
            raise PersonalDataErased(erased, [events[i].subject for i in erased])
        missing = sorted(d for d in wanted if not self.keys.known(d))
        if missing:
            await self._make_keys(missing)
        sealed: list[CloudEvent[Any]] = []
        for event, has_personal in zip(events, personal, strict=True):
            if not has_personal:
                sealed.append(event)
                continue
            key = await self.keys.data_key(event.subject)
            value = event.to_dict()
            value["data"] = seal_data(value["data"], key)
            sealed.append(parse_event(value))
        return sealed

    async def _make_keys(self, dossier_ids: Sequence[str]) -> None:
        """A data key for each of `dossier_ids`, written to `dossier.keys` (acks=all) by whichever
        replica claims it; the others wait for it on the topic."""
        token = uuid.uuid4().hex
        pipe = self._redis.pipeline(transaction=False)
        for dossier_id in dossier_ids:
            pipe.set(self._claim_key(dossier_id), token, nx=True, ex=CLAIM_SECONDS)
        won = await pipe.execute()
        ours = [d for d, claimed in zip(dossier_ids, won, strict=True) if claimed]
        if ours:
            records = []
            for dossier_id in ours:
                wrapped = self.keys.keks.wrap(dossier_id, new_data_key())
                records.append((dossier_id, wrapped.encode()))
            try:
                await self._publisher.publish(
                    [(DOSSIER_KEYS, dossier_id.encode(), value) for dossier_id, value in records]
                )
            except BaseException:
                await self._release(ours, token)
                raise
            for dossier_id, value in records:
                self.keys.apply(dossier_id, value)
        others = [d for d in dossier_ids if not self.keys.known(d)]
        if others:
            await self._await_keys(others)

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
            pipe = self._redis.pipeline(transaction=False)
            for dossier_id in dossier_ids:
                pipe.get(self._claim_key(dossier_id))
            held = await pipe.execute()
            mine = [
                self._claim_key(d)
                for d, value in zip(dossier_ids, held, strict=True)
                if value == token.encode()
            ]
            if mine:
                await self._redis.delete(*mine)

    def _claim_key(self, dossier_id: str) -> str:
        return self._claims("intake", "data-key", dossier_id)
