"""Following a topic for the whole life of a process: a consumer of no group over every
partition, started again after any failure, never ending the process.

Each follower gives `follow_forever` one attempt (catch up, then tail) and calls `caught_up()`
once it has read to the end, which makes the next failure wait the shortest time again; an
attempt reads through `assigned_consumer` (every partition, no group).

`CompactedView` is the whole pattern for a view of a compacted topic: a subclass says what a
record does (`reset` with every latest record after the first read, `apply` for each one after)
and runs `follow()` as a task of its app; a service's changelog is read from its partitions'
snapshots on (`changelog.Changelog.read_by_partition`), and a view kept on disk from the
offsets it has read to (`kept_offsets`, `applied`: the data keys' file). `read_to_now()` waits
until the view holds everything written before the call (what a reader must see once a writer
was answered). The portal keys (`portal_keys_view`, in intake and portals), the dossiers' data keys
(`data_keys`), and the portals service's subscriptions and dossier states are such views;
metrics' figures follow their changelog with `follow_forever` too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

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


@contextlib.asynccontextmanager
async def assigned_consumer(
    bootstrap: str, spec: TopicSpec, replication: int, *, poll_ms: int = 200, **options: Any
) -> AsyncIterator[tuple[AIOKafkaConsumer, list[TopicPartition]]]:
    """A consumer of no group assigned every partition of `spec`'s topic (created if missing),
    reading from the earliest offset unless told otherwise; stopped on the way out."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=poll_ms,
        **options,
    )
    await consumer.start()
    await asyncio.sleep(0)  # aiokafka 0.14: see changelog.read_latest
    try:
        tps = await every_partition(consumer, bootstrap, spec, replication)
        consumer.assign(tps)
        yield consumer, tps
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(consumer.stop(), 5.0)


Record = tuple[bytes | None, bytes | None]
# where a view kept on disk stands in a partition: the next offset to read, and the timestamp of
# the record before it (-1: not known)
Mark = tuple[int, int]


class NotReadToNow(TimeoutError):
    """A view did not read its topic to the end offsets of the moment asked in time (the broker
    away, or the follower starting again)."""


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
        poll_ms: int = 200,
        catch_up_seconds: float = 10.0,
    ) -> None:
        self._bootstrap = bootstrap
        self._spec = spec
        self._replication = replication
        # a service's changelog: read from its partitions' snapshots on, not from the beginning
        self._changelog = changelog
        self._poll_ms = poll_ms
        self._catch_up_seconds = catch_up_seconds  # how long `read_to_now` waits
        self.caught_up = False
        self._read = asyncio.Event()
        # where the tail stands, for `read_to_now`
        self._consumer: AIOKafkaConsumer | None = None
        self._tps: list[TopicPartition] = []
        self._positions: dict[int, int] = {}
        self._last_ms: dict[int, int] = {}  # the timestamp of the last record read, per partition
        self._moved = asyncio.Event()
        # the end offsets last asked for `read_to_now`: when, and the request
        self._ends: tuple[float, asyncio.Task[dict[TopicPartition, int]]] | None = None

    async def wait_read(self) -> None:
        """Return once the first whole read is done."""
        await self._read.wait()

    def reset(self, records: Iterable[Record]) -> None:
        raise NotImplementedError

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        raise NotImplementedError

    def kept_offsets(self) -> dict[int, Mark] | None:
        """For a view kept on disk, per partition read: the next offset to read, and the
        timestamp of the record before it (which tells the same topic from another of that
        name). None (a view in memory): the topic is read whole into `reset`."""
        return None

    def applied(self, marks: Mapping[int, Mark]) -> None:
        """After each batch of records applied: per partition, the next offset to read and the
        timestamp of the record before it."""

    def forget(self) -> None:
        """A view kept on disk whose offsets the topic does not have (another topic of the same
        name): empty it, to be read again from the beginning."""

    async def read(self) -> bool:
        """Whether the first whole read is done (a ready check)."""
        return self.caught_up

    async def follow(self) -> None:
        await follow_forever(self._catch_up_and_tail, name=f"{self.name}_follower")

    async def read_to_now(self) -> None:
        """Return once the view has read every partition up to its end offset as of now;
        `NotReadToNow` after the view's catch-up time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._catch_up_seconds
        while True:
            consumer, tps = self._consumer, self._tps
            if consumer is not None and tps:
                try:
                    ends = await asyncio.wait_for(
                        self._ends_after(loop.time(), consumer, tps),
                        max(0.1, deadline - loop.time()),
                    )
                except Exception as exc:  # the follower starting again, the broker away
                    if loop.time() > deadline:
                        raise NotReadToNow(f"{self._spec.name}: {type(exc).__name__}") from exc
                else:
                    while not all(
                        self._positions.get(tp.partition, 0) >= end for tp, end in ends.items()
                    ):
                        await self._wait_moved(deadline)
                    return
            await self._wait_moved(deadline)

    async def _ends_after(
        self, asked: float, consumer: AIOKafkaConsumer, tps: list[TopicPartition]
    ) -> dict[TopicPartition, int]:
        """End offsets asked of the broker after `asked` (a loop time): callers at the same
        time (a poll's bookings, say) share one request instead of one each."""
        loop = asyncio.get_running_loop()
        while True:
            if self._ends is not None:
                started, task = self._ends
                failed = task.done() and (task.cancelled() or task.exception() is not None)
                if started >= asked and not failed:
                    return dict(await asyncio.shield(task))
                if not task.done():
                    await asyncio.wait([task])
                    continue
            self._ends = (loop.time(), loop.create_task(consumer.end_offsets(tps)))

    async def _wait_moved(self, deadline: float) -> None:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise NotReadToNow(f"{self._spec.name} was not read to its end in time")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._moved.wait(), min(left, 0.5))

    def _moved_on(self) -> None:
        moved, self._moved = self._moved, asyncio.Event()
        moved.set()

    async def _read_on(
        self, consumer: AIOKafkaConsumer, tps: list[TopicPartition], kept: dict[int, Mark]
    ) -> dict[TopicPartition, int]:
        """Read a view kept on disk from where it stands to the topic's end offsets (taken
        first); return where the read ended. A view the topic does not match (an offset past
        its end or before its beginning, or another record before the offset: a broker that
        started again empty, say) is emptied first and read from the beginning."""
        beginnings = await consumer.beginning_offsets(tps)
        ends = await consumer.end_offsets(tps)
        if kept and not await self._matches(consumer, tps, kept, beginnings, ends):
            log.warning(f"{self.name}_read_again", kept={p: m[0] for p, m in kept.items()})
            self.forget()
            kept = {}
        marks = {tp.partition: kept.get(tp.partition, (beginnings[tp], -1)) for tp in tps}
        for tp in tps:
            consumer.seek(tp, marks[tp.partition][0])
        while any(marks[tp.partition][0] < ends[tp] for tp in tps):
            batch = await consumer.getmany(timeout_ms=self._poll_ms, max_records=5000)
            for tp, records in batch.items():
                for record in records:
                    self.apply(record.key, record.value)
                if records:
                    marks[tp.partition] = (records[-1].offset + 1, records[-1].timestamp)
            for tp in tps:  # a partition's position moves past records compacted away too
                position = await consumer.position(tp)
                if position > marks[tp.partition][0]:
                    marks[tp.partition] = (position, marks[tp.partition][1])
            if batch:
                self.applied(marks)
        self._last_ms = {p: ms for p, (_, ms) in marks.items()}
        return {tp: marks[tp.partition][0] for tp in tps}

    async def _matches(
        self,
        consumer: AIOKafkaConsumer,
        tps: list[TopicPartition],
        kept: dict[int, Mark],
        beginnings: dict[TopicPartition, int],
        ends: dict[TopicPartition, int],
    ) -> bool:
        """Whether the topic still has what the kept view read: every kept offset within the
        partition, and the record before it the one read then (its timestamp). A record
        compacted away since cannot be checked, and passes."""
        checks: dict[TopicPartition, Mark] = {}
        for tp in tps:
            if tp.partition not in kept:
                continue
            offset, ms = kept[tp.partition]
            if offset > ends[tp] or offset < beginnings[tp]:
                return False
            if offset > beginnings[tp] and ms >= 0:
                checks[tp] = (offset, ms)
                consumer.seek(tp, offset - 1)
        while checks:
            batch = await consumer.getmany(*checks, timeout_ms=self._poll_ms, max_records=1)
            for tp, records in batch.items():
                offset, ms = checks.pop(tp)
                if records and records[0].offset == offset - 1 and records[0].timestamp != ms:
                    return False
            for tp in list(checks):
                if await consumer.position(tp) >= ends[tp]:  # compacted away to the end
                    del checks[tp]
        return True

    async def _catch_up_and_tail(self, caught_up: Callable[[], None]) -> None:
        async with assigned_consumer(
            self._bootstrap, self._spec, self._replication, poll_ms=self._poll_ms
        ) as (consumer, tps):
            try:
                await self._read_and_tail(consumer, tps, caught_up)
            finally:
                self._consumer = None

    async def _read_and_tail(
        self, consumer: AIOKafkaConsumer, tps: list[TopicPartition], caught_up: Callable[[], None]
    ) -> None:
        on_disk = False  # a view kept on disk is told where each batch leaves the read
        if self._changelog is not None:
            read = await self._changelog.read_by_partition([tp.partition for tp in tps])
            starts = {tp: read[tp.partition].next_offset for tp in tps}
            self.reset(record for found in read.values() for record in found.latest.items())
        elif (kept := self.kept_offsets()) is not None:
            starts, on_disk = await self._read_on(consumer, tps, kept), True
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
        self._positions = {tp.partition: starts[tp] for tp in tps}
        self._consumer, self._tps, self._ends = consumer, tps, None
        self._moved_on()
        while True:
            batch = await consumer.getmany(timeout_ms=self._poll_ms, max_records=5000)
            if not batch:
                continue  # nothing read: nothing moved
            for tp, records in batch.items():
                for record in records:
                    self.apply(record.key, record.value)
                self._positions[tp.partition] = await consumer.position(tp)
                if on_disk and records:
                    self._last_ms[tp.partition] = records[-1].timestamp
            if on_disk:
                self.applied(
                    {p: (at, self._last_ms.get(p, -1)) for p, at in self._positions.items()}
                )
            self._moved_on()
