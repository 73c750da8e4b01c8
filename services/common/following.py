"""Following a topic for the whole life of a process: a consumer of no group over every
partition, started again after any failure, never ending the process.

Used by intake's portal keys (`intake.keyring`) and metrics' figures (`metrics.figures`): each
gives `follow_forever` one attempt (catch up, then tail) and calls `caught_up()` once it has read
to the end, which makes the next failure wait the shortest time again.

`CompactedView` is the whole pattern for a view of a compacted topic: a subclass says what a
record does (`reset` with every latest record after the first read, `apply` for each one after)
and runs `follow()` as a task of its app; a service's changelog is read from its partitions'
snapshots on (`changelog.Changelog.read_by_partition`). The portals service's portal keys,
subscriptions and dossier states are such views.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from services.common.changelog import Changelog, read_latest
from services.common.kafka import ensure_topics
from services.common.logging import get_logger
from services.common.topics import TopicSpec

log = get_logger("motcua.following")

RETRY_SECONDS = (0.5, 1.0, 2.0, 5.0)


async def follow_forever(
    attempt: Callable[[Callable[[], None]], Awaitable[None]], *, name: str
) -> None:
    """Run `attempt(caught_up)` until cancelled; after a failure (the broker away, or any
    surprise) wait 0.5, 1, 2, then 5 s between tries, logging `<name>_restarts`."""
    failures = 0

    def caught_up() -> None:
        nonlocal failures
        failures = 0

    while True:
        try:
            await attempt(caught_up)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            wait = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)]
            failures += 1
            log.warning(
                f"{name}_restarts",
                error_type=type(exc).__name__,
                error=str(exc)[:300],
                retry_in=wait,
            )
            await asyncio.sleep(wait)


async def every_partition(
    consumer: AIOKafkaConsumer, bootstrap: str, spec: TopicSpec, replication: int
) -> list[TopicPartition]:
    """Every partition of `spec`'s topic, the topic created first if it is missing (a broker
    still starting when the service created its topics)."""
    await consumer.topics()
    numbers = consumer.partitions_for_topic(spec.name) or set()
    if not numbers:
        await ensure_topics(bootstrap, [spec], replication)
        await consumer.topics()
        numbers = consumer.partitions_for_topic(spec.name) or set()
    if not numbers:
        raise RuntimeError(f"{spec.name} has no partitions yet")
    return [TopicPartition(spec.name, p) for p in sorted(numbers)]


Record = tuple[bytes | None, bytes | None]


class CompactedView:
    """A view of a compacted topic, kept current while the process runs.

    `follow()` (a task of the app) reads the topic from the beginning (a service's changelog
    from its partitions' snapshots on), hands every latest record to `reset`, sets `caught_up`
    (a ready check) and then tails the topic with a consumer of no group, handing each new
    record to `apply` as it comes. When the broker goes away the view keeps what it has and
    starts again from the beginning once the broker answers, never ending the process.
    """

    name = "compacted"

    def __init__(
        self,
        bootstrap: str,
        spec: TopicSpec,
        *,
        replication: int = 1,
        changelog: Changelog | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._spec = spec
        self._replication = replication
        # a service's changelog: read from its partitions' snapshots on, not from the beginning
        self._changelog = changelog
        self.caught_up = False
        self._read = asyncio.Event()

    async def wait_read(self) -> None:
        """Return once the first whole read is done."""
        await self._read.wait()

    def reset(self, records: Iterable[Record]) -> None:
        raise NotImplementedError

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        raise NotImplementedError

    async def read(self) -> bool:
        """Whether the first whole read is done (a ready check)."""
        return self.caught_up

    async def follow(self) -> None:
        await follow_forever(self._catch_up_and_tail, name=f"{self.name}_follower")

    async def _catch_up_and_tail(self, caught_up: Callable[[], None]) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self._bootstrap,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            fetch_max_wait_ms=200,
        )
        await consumer.start()
        await asyncio.sleep(0)  # aiokafka 0.14: see changelog.read_latest
        try:
            tps = await every_partition(consumer, self._bootstrap, self._spec, self._replication)
            consumer.assign(tps)
            if self._changelog is not None:
                read = await self._changelog.read_by_partition([tp.partition for tp in tps])
                starts = {tp: read[tp.partition].next_offset for tp in tps}
                self.reset(record for found in read.values() for record in found.latest.items())
            else:
                # Taken before the whole read: tailing from here may read again what the read
                # saw, which leaves the same view (the latest record of a key wins).
                starts = await consumer.end_offsets(tps)
                latest = await read_latest(self._bootstrap, self._spec.name)
                self.reset(latest.items())
            self.caught_up = True
            self._read.set()
            caught_up()
            for tp in tps:
                consumer.seek(tp, starts[tp])
            while True:
                batch = await consumer.getmany(timeout_ms=200, max_records=1000)
                for records in batch.values():
                    for record in records:
                        self.apply(record.key, record.value)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), 5.0)
