"""The dossiers' data keys, read from `dossier.keys` (CONTRACT section 10).

`dossier.keys` is compacted: key = dossier id, value = the dossier's data key wrapped by a KEK
(`sealing.WrappedKey`); a tombstone is the erasure of the dossier's personal data. Every process
that opens a personal field (intake, SMS for the phone, postal for the address) follows the topic
whole with one `DataKeys` (a task of its lifespan or app): the wrapped keys are held in memory,
and a key is unwrapped only for the call that needs it, never kept in clear.

A dossier not seen yet may only be behind: `data_key` reads the topic to its end offsets (taken
at the call) before it concludes that the dossier has no key. A dossier whose tombstone was
compacted away is indistinguishable from one that never had a key: either way its sealed fields
do not open (`KeyErased`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from services.common.following import every_partition, follow_forever
from services.common.logging import get_logger
from services.common.sealing import (
    Keks,
    SealingError,
    Tampered,
    WrappedKey,
    is_sealed,
    unseal,
)
from services.common.topics import DOSSIER_KEYS, dossier_keys_spec

log = get_logger("motcua.data_keys")

CATCH_UP_SECONDS = 10.0


class KeyErased(SealingError):
    """The dossier's data key is destroyed (erasure or retention) or was never written: its
    personal data cannot be read any more."""


class KeysUnavailable(TimeoutError):
    """`dossier.keys` could not be read to its end in time (the broker away): retry later."""


class DataKeys:
    """The wrapped data key of every dossier on `dossier.keys`, and the erased dossiers."""

    def __init__(
        self,
        bootstrap: str,
        keks: Keks,
        *,
        partitions: int,
        replication: int = 1,
        poll_ms: int = 100,
        catch_up_seconds: float = CATCH_UP_SECONDS,
    ) -> None:
        self._bootstrap = bootstrap
        self.keks = keks
        self._partitions = partitions
        self._replication = replication
        self._poll_ms = poll_ms
        self._catch_up_seconds = catch_up_seconds
        self._wrapped: dict[str, WrappedKey] = {}
        self._erased: set[str] = set()
        self._positions: dict[int, int] = {}
        self._consumer: AIOKafkaConsumer | None = None
        self._tps: list[TopicPartition] = []
        self._moved = asyncio.Event()
        self.caught_up = False
        self.skipped = 0  # records that are not a wrapped key

    # --- what is known ------------------------------------------------------------------------

    def apply(self, dossier_id: str, value: bytes | None) -> None:
        """Fold one record of `dossier.keys` in (also the writer's own, before it answers)."""
        if not value:
            self._wrapped.pop(dossier_id, None)
            self._erased.add(dossier_id)
            return
        try:
            wrapped = WrappedKey.decode(value)
        except Tampered as exc:
            self.skipped += 1
            log.warning("data_key_record_skipped", dossier_id=dossier_id, reason=str(exc))
            return
        self._wrapped[dossier_id] = wrapped
        self._erased.discard(dossier_id)

    def known(self, dossier_id: str) -> bool:
        return dossier_id in self._wrapped

    def erased(self, dossier_id: str) -> bool:
        return dossier_id in self._erased

    def __len__(self) -> int:
        return len(self._wrapped)

    def dossiers(self) -> list[str]:
        """The dossiers whose key is there (not erased)."""
        return list(self._wrapped)

    async def keys_read(self) -> bool:
        """Whether the first read of `dossier.keys` is done (a ready check)."""
        return self.caught_up

    # --- opening --------------------------------------------------------------------------------

    async def data_key(self, dossier_id: str, *, fresh: bool = False) -> bytes:
        """The dossier's data key, unwrapped for this call; `KeyErased` when it has none after
        reading the topic to its end, `KeysUnavailable` when the topic cannot be read now.
        `fresh`: read the topic to its end first, so an erasure acknowledged before the call
        holds (a send or a booking asks so)."""
        if fresh:
            await self.read_to_now()
        wrapped = self._wrapped.get(dossier_id)
        if wrapped is None and dossier_id not in self._erased:
            await self.read_to_now()
            wrapped = self._wrapped.get(dossier_id)
        if wrapped is None:
            raise KeyErased(f"dossier {dossier_id!r} has no data key (erased)")
        return self.keks.unwrap(dossier_id, wrapped)

    async def open(self, dossier_id: str, field: str, value: Any) -> Any:
        """A personal field's value in clear, for the call at hand: a sealed value opened (its
        dossier's key read for it), anything else (null, a value never sealed) as it is.
        `KeyErased`, `Tampered` or `UnknownKek` when it cannot be opened."""
        if not is_sealed(value):
            return value
        key = await self.data_key(dossier_id)
        return unseal(key, dossier_id, field, value)

    async def read_to_now(self) -> None:
        """Wait until the follower has read every partition up to its end offset as of now."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._catch_up_seconds
        while True:
            consumer = self._consumer
            if consumer is not None and self._tps:
                try:
                    ends = await asyncio.wait_for(
                        consumer.end_offsets(self._tps), max(0.1, deadline - loop.time())
                    )
                except Exception as exc:  # the follower restarting, the broker away
                    if loop.time() > deadline:
                        raise KeysUnavailable(f"{DOSSIER_KEYS}: {type(exc).__name__}") from exc
                else:
                    while not all(
                        self._positions.get(tp.partition, 0) >= end for tp, end in ends.items()
                    ):
                        await self._wait_moved(deadline)
                    return
            await self._wait_moved(deadline)

    async def _wait_moved(self, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        left = deadline - loop.time()
        if left <= 0:
            raise KeysUnavailable(f"{DOSSIER_KEYS} was not read to its end in time")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._moved.wait(), min(left, 0.5))

    # --- following the topic -------------------------------------------------------------------

    async def follow(self) -> None:
        """Read `dossier.keys` whole, then tail it until cancelled; start again after any
        failure (from where it was)."""
        await follow_forever(self._read_and_tail, name="data_keys_follower")

    async def _read_and_tail(self, caught_up: Callable[[], None]) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self._poll_ms,
        )
        await consumer.start()
        await asyncio.sleep(0)  # aiokafka 0.14: see changelog.read_latest
        try:
            spec = dossier_keys_spec(self._partitions)
            tps = await every_partition(consumer, self._bootstrap, spec, self._replication)
            consumer.assign(tps)
            for tp in tps:
                position = self._positions.get(tp.partition)
                if position is None:
                    await consumer.seek_to_beginning(tp)
                else:
                    consumer.seek(tp, position)
            ends = await consumer.end_offsets(tps)
            self._consumer, self._tps = consumer, tps
            reached = False
            while True:
                batch = await consumer.getmany(timeout_ms=self._poll_ms, max_records=5000)
                for records in batch.values():
                    for record in records:
                        if record.key is not None:
                            self.apply(record.key.decode(errors="replace"), record.value)
                for tp in tps:
                    self._positions[tp.partition] = await consumer.position(tp)
                moved, self._moved = self._moved, asyncio.Event()
                moved.set()
                if not reached and all(
                    self._positions[tp.partition] >= end for tp, end in ends.items()
                ):
                    reached = True
                    caught_up()
                    if not self.caught_up:
                        log.info("data_keys_caught_up", keys=len(self._wrapped))
                    self.caught_up = True
        finally:
            self._consumer = None
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 5.0)
