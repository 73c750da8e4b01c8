"""The per-dossier states of the postal worker: in memory, kept in the service's own changelog.

The changelog (`topics.POSTAL_STATE_CHANGELOG`, compacted, co-partitioned with `dossier.events`
and `postal.callbacks`) holds the latest state of every dossier, written by this worker only:
one record per dossier changed per batch, acknowledged (acks=all) before the batch's offsets are
committed. On every assignment the states of the assigned partitions are read back from it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection
from datetime import datetime, timedelta

import orjson

from services.common.changelog import Changelog
from services.common.logging import get_logger
from services.postal.carriers import Leg
from services.postal.domain import (
    DossierState,
    StalePolicy,
    initial_state,
    needs_scan,
    state_from_json,
    state_to_json,
)

log = get_logger("motcua.postal")

# The scan decodes states between yields to the loop (heartbeats, webhooks) in chunks this big.
SCAN_CHUNK = 2000


def encode(state: DossierState) -> bytes:
    return orjson.dumps(state_to_json(state))


def decode(raw: bytes) -> DossierState:
    return state_from_json(orjson.loads(raw))


def watched(state: DossierState) -> bool:
    """A leg was booked and is not closed: the stale scan must keep looking at the dossier."""
    legs = (state.shipment(leg) for leg in (Leg.PICKUP, Leg.RETURN))
    return any(sh is not None and sh.booking is not None and not sh.closed for sh in legs)


class PostalStates:
    """dossier id → its encoded state, as last written to (or restored from) the changelog."""

    def __init__(self, changelog: Changelog) -> None:
        self.changelog = changelog
        self.raw: dict[str, bytes] = {}
        # changed since the last write: the next `save` sends them
        self.unsaved: set[str] = set()
        # dossiers the stale scan looks at: every restored one until a scan decoded it, and every
        # one stored with an open leg since (most dossiers never have one, or no longer)
        self.watched: set[str] = set()

    def __len__(self) -> int:
        return len(self.raw)

    def load(self, dossier_id: str) -> DossierState:
        raw = self.raw.get(dossier_id)
        return initial_state(dossier_id) if raw is None else decode(raw)

    def put(self, state: DossierState) -> None:
        """Keep `state` in memory; an unchanged state (a redelivery, or an input about a dossier
        postal never planned for) is not written."""
        before = self.raw.get(state.dossier_id)
        if before is None and state == initial_state(state.dossier_id):
            return
        encoded = encode(state)
        if before == encoded:
            return
        self.raw[state.dossier_id] = encoded
        self.unsaved.add(state.dossier_id)
        if watched(state):
            self.watched.add(state.dossier_id)
        else:
            self.watched.discard(state.dossier_id)

    async def save(self) -> None:
        """Write every unsaved state once; return when the broker acknowledged them all."""
        written = {key: self.raw[key] for key in self.unsaved}
        await self.changelog.write({key.encode(): value for key, value in written.items()})
        for key, value in written.items():
            if self.raw.get(key) is value:  # not changed again meanwhile
                self.unsaved.discard(key)

    async def restore(self, partitions: Collection[int]) -> None:
        """Replace the states by those of `partitions` in the changelog (what is unsaved is lost:
        its inputs are redelivered, since their offsets were not committed)."""
        records = await self.changelog.read(partitions)
        self.raw = {key.decode(): value for key, value in records.items()}
        self.unsaved = set()
        self.watched = set(self.raw)

    async def due_for_scan(
        self, now: datetime, policy: StalePolicy, rebook_after: timedelta
    ) -> list[str]:
        """The watched dossiers a `Tick` at `now` would move; forgets those with no open leg."""
        due: list[str] = []
        for count, dossier_id in enumerate(list(self.watched), start=1):
            if count % SCAN_CHUNK == 0:
                await asyncio.sleep(0)
            raw = self.raw.get(dossier_id)
            if raw is None:  # revoked meanwhile
                self.watched.discard(dossier_id)
                continue
            try:
                state = decode(raw)
            except Exception:  # a state we cannot read is not the scan's to fix
                log.warning("unreadable_state", dossier_id=dossier_id)
                self.watched.discard(dossier_id)
                continue
            if not watched(state):
                self.watched.discard(dossier_id)
            elif needs_scan(state, now, policy, rebook_after):
                due.append(dossier_id)
        return due
