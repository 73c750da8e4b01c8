"""The portal keys every intake replica holds: the settings' keys and the topic `portal.keys`,
followed while the process runs (the rules are `services.common.portal_keys`).

`Keyring.follow()` (a task of the app's lifespan) reads the topic from the beginning
(`changelog.read_latest`) and folds it over the settings' keys; from then on `caught_up` is true
(intake's `/readyz` waits for it) and it tails every partition of the topic with a consumer of
no group, folding each new record in as it comes (within a second of its write). When the broker
goes away the follower keeps the table it has, starts again from the beginning once the broker
answers, and never ends the process. `Keyring.apply(record)` folds in a record this replica has
just written, so its own answer already holds.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from aiokafka import AIOKafkaConsumer

from services.common.changelog import read_latest
from services.common.coordination import TokenBucket
from services.common.following import every_partition, follow_forever
from services.common.logging import get_logger
from services.common.portal_keys import InvalidRecord, KeyRecord, KeyTable, decode_record, fold
from services.common.settings import Portal
from services.common.topics import PORTAL_KEYS, portal_keys_spec

log = get_logger("motcua.intake.keys")


class Keyring:
    """The current `KeyTable` of this replica, and the task that keeps it current."""

    def __init__(
        self,
        bootstrap: str,
        static: Sequence[Portal],
        *,
        replication: int = 1,
        poll_ms: int = 200,
    ) -> None:
        self._bootstrap = bootstrap
        self._static = list(static)
        self._replication = replication
        self._poll_ms = poll_ms
        self.table: KeyTable = fold(self._static, [])
        self.caught_up = False
        self.skipped = 0  # records of the topic that are no valid key record

    # --- what the routes read --------------------------------------------------------------

    def find(self, key_sha256: str) -> Portal | None:
        return self.table.find(key_sha256)

    def apply(self, record: KeyRecord) -> None:
        self.table = self.table.with_record(record)

    async def portal_keys_read(self) -> bool:
        """Whether the first read of `portal.keys` is done (a ready check of intake)."""
        return self.caught_up

    # --- following the topic ---------------------------------------------------------------

    async def follow(self) -> None:
        """Catch up, then tail `portal.keys` until cancelled; start again after any failure."""
        await follow_forever(self._catch_up_and_tail, name="portal_keys_follower")

    async def _catch_up_and_tail(self, caught_up: Callable[[], None]) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=self._poll_ms,
        )
        await consumer.start()
        await asyncio.sleep(0)  # aiokafka 0.14: see changelog.read_latest
        try:
            tps = await every_partition(
                consumer, self._bootstrap, portal_keys_spec(), self._replication
            )
            consumer.assign(tps)
            # Taken before the whole read: tailing from here reads again what the read may have
            # seen already, which folds to the same table (the latest record of a key id wins).
            starts = await consumer.end_offsets(tps)
            latest = await read_latest(self._bootstrap, PORTAL_KEYS)
            self.table = fold(self._static, self._decoded(latest.items()))
            if not self.caught_up:
                log.info(
                    "portal_keys_caught_up",
                    keys=len(self.table.entries),
                    active=self.table.active_count,
                )
            self.caught_up = True
            caught_up()
            for tp in tps:
                consumer.seek(tp, starts[tp])
            while True:
                batch = await consumer.getmany(timeout_ms=self._poll_ms, max_records=1000)
                for records in batch.values():
                    for record in self._decoded((r.key, r.value) for r in records):
                        self.apply(record)
                        log.info(
                            "portal_key_changed",
                            source=record.source,
                            key_id=record.key_id,
                            state=record.state,
                        )
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 5.0)

    def _decoded(self, items: Iterable[tuple[bytes | None, bytes | None]]) -> Iterator[KeyRecord]:
        for key, value in items:
            if not value:
                continue  # a tombstone: nothing writes one, and it removes nothing
            try:
                yield decode_record(key, value)
            except InvalidRecord as exc:
                self.skipped += 1
                log.warning("portal_key_record_skipped", reason=str(exc))


class PortalBuckets(Mapping[str, TokenBucket]):
    """The rate bucket of each portal source, made the first time the source is seen, with the
    rate and burst of its portal (`Portal`'s defaults for a portal of `portal.keys` alone)."""

    def __init__(self, keyring: Keyring, make: Callable[[float, int], TokenBucket]) -> None:
        self._keyring = keyring
        self._make = make
        self._buckets: dict[str, TokenBucket] = {}

    def __getitem__(self, source: str) -> TokenBucket:
        bucket = self._buckets.get(source)
        if bucket is None:
            rate, burst = self._keyring.table.limits(source)
            bucket = self._buckets[source] = self._make(rate, burst)
        return bucket

    def __iter__(self) -> Iterator[str]:
        return iter(self._buckets)

    def __len__(self) -> int:
        return len(self._buckets)
