"""The one way a motcua service reads Kafka: a batch consumer on plain aiokafka, inside the
service's faust worker and event loop (`Service.consume` creates and starts it).

Why not a faust stream: faust's per-event plumbing (conductor, stream processors, acks) tops out
at about 3,400 events/s on two cores with a no-op handler, while a plain aiokafka consumer
decoding every envelope reads 50,000-67,000 events/s (docs/benchmarks.md, "Metrics").

- Each record becomes an item through `decode` (default: CloudEvents, `event_decoder`); one that
  raises `PoisonMessage` goes to `<topic>.dlq` at once (attempts 1) with the CONTRACT section 3
  headers (`dead_letters.dead_letter_headers`); None skips it.
- The handler gets the items of one poll (every topic at once); a failure is retried
  (`RetrySchedule`), then the items are handed over one at a time, so a poison item is
  dead-lettered alone (`PoisonMessage`: without retries) and the others still count.
- Write-then-commit: the handler returns only once its own writes are acknowledged; a failed
  attempt's changes to the `StateTable` are rolled back before the next attempt; then the
  table writes what changed, and only then are the poll's offsets
  committed (after its dead letters are acked too): at-least-once, so handlers are idempotent.
  A broker or Redis error (`INFRASTRUCTURE_ERRORS`) is never blamed on a message: the consumer
  backs off and starts again from the committed offsets, restoring its state first.
- Restore on assignment: after every assignment the state table is read back for the assigned
  partitions, then `after_restore(assigned)` rebuilds whatever the service derives from it, on
  the consumer's loop before any record is handled; `ready` stays false until then. A revocation
  waits for the poll in hand to be handled and committed. The range assignor gives a member the
  same partition numbers of every topic, so with co-partitioned topics it holds whole dossiers.
- `held`, when given, names the topics to leave unread for now; it is asked before every poll,
  and their assigned partitions are paused until it no longer names them (the others are read
  on). A service whose work in flight has grown too large holds its inputs this way, while it
  still reads the topic that brings the news that work is done: the backlog stays on the
  broker, not in memory.
- `on_idle`, when given, runs after a poll that brought nothing (the partitions restored), under
  the same lock as a poll, and what it changes in the state table is written the same way:
  work a service does on its own clock, such as retiring closed dossiers.
- Snapshots: after a restore, a commit or idle work, the state table writes the snapshots that
  are due (`StateTable.write_snapshots`), so the next restore reads live state, not history.
- Tracing (`services.common.tracing`, when set up): a poll is a span linking its traced events,
  each traced event a span under its own `traceparent`, current while `for_each_dossier`
  handles its dossier (so what that produces carries its trace on).
- `motcua_events_consumed_total`, `motcua_dead_lettered_total`, `motcua_handler_seconds`;
  `motcua_consumer_holds_total` and `motcua_consumer_held_partitions` for `held`.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import ConsumerRecord as Record  # [bytes, bytes]; aiokafka is untyped
from aiokafka.structs import TopicPartition
from opentelemetry import trace
from opentelemetry.context import Context
from prometheus_client import Counter, Gauge, Histogram
from redis.exceptions import RedisError

from services.common import topics, tracing
from services.common.dead_letters import PoisonMessage, RetrySchedule, dead_letter_headers
from services.common.events import CloudEvent, InvalidEvent, decode_event_of
from services.common.kafka import BrokerUnavailable, DurablePublisher
from services.common.logging import get_logger
from services.common.members import MemberFile, leave_for
from services.common.state import StateTable

Item = TypeVar("Item")
Restore = Callable[[frozenset[TopicPartition]], Awaitable[None]]
GiveUp = Callable[[BaseException, int], Awaitable[None]]
# What a record becomes for the handler; None skips it, `PoisonMessage` dead-letters it at once.
Decoder = Callable[[Record], Item | None]

FETCH_MAX_BYTES = 4 * 1024 * 1024
PARTITION_FETCH_MAX_BYTES = 512 * 1024

log = get_logger("motcua.consumer")

EVENTS_CONSUMED = Counter(
    "motcua_events_consumed_total", "Events handled by a service", ["service", "topic"]
)
DEAD_LETTERED = Counter(
    "motcua_dead_lettered_total",
    "Messages sent to a dead-letter topic",
    ["service", "topic", "error_type"],
)
HOLDS = Counter(
    "motcua_consumer_holds_total",
    "Times a service began to leave some of its input topics unread (`held`)",
    ["service"],
)
HELD_PARTITIONS = Gauge(
    "motcua_consumer_held_partitions", "Partitions a service leaves unread for now", ["service"]
)
HANDLER_SECONDS = Histogram(
    "motcua_handler_seconds", "Time to handle one event or batch", ["service", "topic"]
)

# Errors of the broker or the connection: retrying the same records later is the cure.
INFRASTRUCTURE_ERRORS = (BrokerUnavailable, KafkaError, RedisError, OSError, TimeoutError)


def event_decoder(types: frozenset[str] | None = None) -> Decoder[CloudEvent[Any]]:
    """CloudEvents, validated; with `types`, the others are skipped before validation (a
    service does not dead-letter what it has no business with)."""

    def decode(record: Record) -> CloudEvent[Any] | None:
        try:
            return decode_event_of(record.value or b"", types)
        except InvalidEvent as exc:
            raise PoisonMessage(str(exc)) from exc

    return decode


async def for_each_dossier(
    items: Sequence[Item],
    dossier_of: Callable[[Item], str],
    handle: Callable[[str, list[Item]], Awaitable[None]],
    *,
    concurrency: int,
) -> None:
    """Handle a poll's items dossier by dossier: up to `concurrency` dossiers at once, one
    dossier's items in the order they came. Every dossier is finished before a failure is
    raised (so a retry never runs beside a first attempt), and the one raised is what the
    consumer should act on: a broker or Redis error first (it starts again from the committed
    offsets), then any other error (retried), then a poison message (each item then alone)."""
    by_dossier: dict[str, list[Item]] = {}
    for item in items:
        by_dossier.setdefault(dossier_of(item), []).append(item)
    pending = iter(by_dossier.items())
    failures: list[Exception] = []

    async def work_through() -> None:
        for dossier_id, inputs in pending:  # the workers share the iterator
            try:
                with tracing.within_items(inputs):
                    await handle(dossier_id, inputs)
            except Exception as exc:  # the other dossiers go on: less to redo on a retry
                failures.append(exc)

    await asyncio.gather(*(work_through() for _ in range(min(concurrency, len(by_dossier)))))
    for kinds in (INFRASTRUCTURE_ERRORS, (Exception,)):
        for failure in failures:
            if isinstance(failure, kinds) and not isinstance(failure, PoisonMessage):
                raise failure
    if failures:
        raise failures[0]


async def dead_letter(
    publisher: DurablePublisher,
    service: str,
    topic: str,
    key: bytes | None,
    value: bytes,
    error: BaseException,
    attempts: int,
    **where: int,
) -> None:
    """Put `value` (the original bytes of a message of `topic`) on `<topic>.dlq` with the
    CONTRACT section 3 headers; counted and logged. Returns once the broker acked it."""
    DEAD_LETTERED.labels(service, topic, type(error).__name__).inc()
    log.warning(
        "dead_lettered",
        service=service,
        topic=topic,
        error_type=type(error).__name__,
        error=str(error)[:300],
        **where,
    )
    await publisher.publish(
        [(topics.dlq(topic), key, value)], headers=dead_letter_headers(error, attempts)
    )


class BatchConsumer(Generic[Item]):
    """Consume `topic_names` in the consumer group `group_id` and hand batches to `handler`.

    Records become items through `decode` (default: CloudEvents, see `event_decoder`), so a
    service may read its internal, non-CloudEvents topics in the same batches.
    """

    def __init__(
        self,
        name: str,
        bootstrap: str,
        topic_names: Sequence[str],
        handler: Callable[[Sequence[Item]], Awaitable[None]],
        *,
        decode: Decoder[Item] | None = None,
        types: frozenset[str] | None = None,
        state: StateTable[Any] | None = None,
        after_restore: Restore | None = None,
        on_idle: Callable[[], Awaitable[None]] | None = None,
        held: Callable[[], Collection[str]] | None = None,
        retry: RetrySchedule | None = None,
        max_records: int = 2000,
        poll_seconds: float = 0.2,
        group_id: str | None = None,
        publisher: DurablePublisher | None = None,
        session_timeout_seconds: float = 10.0,
        members_dir: Path | None = None,
    ) -> None:
        self.name = name
        self.bootstrap = bootstrap
        self.topic_names = tuple(topic_names)
        self.handler = handler
        self.state = state
        self.after_restore = after_restore
        self.on_idle = on_idle
        self.held = held
        if decode is not None and types is not None:
            raise ValueError("filter by type inside `decode`")
        self.decode: Decoder[Any] = decode or event_decoder(types)
        self.retry = retry or RetrySchedule()
        self.max_records = max_records
        self.poll_ms = int(poll_seconds * 1000)
        self.session_timeout_ms = int(session_timeout_seconds * 1000)
        self.group_id = group_id or f"motcua-{name}"
        self._owns_publisher = publisher is None
        self.publisher = publisher or DurablePublisher(bootstrap)
        self._lock = asyncio.Lock()  # one poll, restore or revocation at a time
        self._assigned: frozenset[TopicPartition] = frozenset()
        self._generation = 0  # bumped on every assignment change: a poll in hand goes stale
        self._restored = False
        # the member id of this process's slot (`members.py`), given a directory to keep it in
        self._member_file = None if members_dir is None else MemberFile(members_dir, self.group_id)
        self._consumer: AIOKafkaConsumer | None = None

    @property
    def ready(self) -> bool:
        """Partitions assigned and the state restored for them."""
        return bool(self._assigned) and self._restored

    @property
    def leads(self) -> bool:
        """This member holds partition 0 of its first topic: exactly one member of the group
        does at a time, so once-per-group work (a daily job) runs there."""
        return self.ready and TopicPartition(self.topic_names[0], 0) in self._assigned

    # --- the loop --------------------------------------------------------------------------

    async def run(self) -> None:
        """Consume until cancelled; after a broker error start again from committed offsets."""
        backoff = 0.5
        try:
            while True:
                started = time.monotonic()
                try:
                    await self._consume()
                except asyncio.CancelledError as exc:
                    task = asyncio.current_task()
                    if task is None or task.cancelling():
                        raise  # we are being stopped
                    await self._after_failure(exc, backoff)  # aiokafka cancelled its own task
                    backoff = min(backoff * 2, 30.0)
                except Exception as exc:
                    if time.monotonic() - started > 60:
                        backoff = 0.5  # it ran fine for a while: this is a new outage
                    await self._after_failure(exc, backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            if self._owns_publisher:  # a service's own producer is closed by the service
                await self.publisher.close()

    async def _after_failure(self, exc: BaseException, backoff: float) -> None:
        self._forget_assignment()
        log.warning(
            "batch_consumer_restarting",
            service=self.name,
            error_type=type(exc).__name__,
            error=str(exc)[:300],
            in_seconds=backoff,
        )
        await asyncio.sleep(backoff)

    async def _consume(self) -> None:
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            session_timeout_ms=self.session_timeout_ms,
            heartbeat_interval_ms=self.session_timeout_ms * 3 // 10,
            # Tansu answers a fetch only once this wait is over; no longer than a poll waits
            fetch_max_wait_ms=self.poll_ms,
            # The same partition numbers on every topic (they have the same count), so that a
            # member restores exactly the state of the dossiers it is given
            partition_assignment_strategy=(RangePartitionAssignor,),
            # What a lagging member holds fetched and not yet handled: aiokafka's defaults (50 MiB
            # a fetch, 1 MiB a partition) kept ~50 MiB of responses and records in a worker on
            # 16 partitions; these still bring more than `max_records` a fetch, and a record
            # batch larger than a partition's share still comes whole
            fetch_max_bytes=FETCH_MAX_BYTES,
            max_partition_fetch_bytes=PARTITION_FETCH_MAX_BYTES,
        )
        consumer.subscribe(list(self.topic_names), listener=_Rebalance(self))
        if self._member_file is not None and (previous := self._member_file.previous()):
            self._member_file.write("")  # asked once: the next start has nobody to drop
            await leave_for(self.bootstrap, self.group_id, previous)
        self._consumer = consumer
        await consumer.start()
        await asyncio.sleep(0)  # aiokafka 0.14: stopping before its tasks ran raises Cancelled
        try:
            while True:
                self._hold(consumer)
                batch = await consumer.getmany(
                    timeout_ms=self.poll_ms, max_records=self.max_records
                )
                generation = self._generation
                async with self._lock:
                    if not self._restored:
                        await self._restore()
                    if generation != self._generation:
                        continue  # the assignment changed under this poll
                    if batch:
                        await self._handle(consumer, batch)
                    elif self.on_idle is not None and self._restored:
                        await self._idle()
        finally:
            self._forget_assignment()
            with contextlib.suppress(Exception):
                await consumer.stop()

    def _hold(self, consumer: AIOKafkaConsumer) -> None:
        """Pause the assigned partitions of the topics `held` names, resume the others."""
        if self.held is None:
            return
        topics_held = set(self.held())
        paused: set[TopicPartition] = consumer.paused()
        wanted = {tp for tp in consumer.assignment() if tp.topic in topics_held}
        HELD_PARTITIONS.labels(self.name).set(len(wanted))
        if wanted == paused:
            return
        if wanted and not paused:
            HOLDS.labels(self.name).inc()
        if wanted - paused:
            consumer.pause(*(wanted - paused))
        if paused - wanted:
            consumer.resume(*(paused - wanted))
        log.debug("batch_consumer_held", service=self.name, partitions=len(wanted))

    def _forget_assignment(self) -> None:
        self._assigned = frozenset()
        self._generation += 1
        self._restored = False

    async def _restore(self) -> None:
        assigned = self._assigned
        started = time.perf_counter()
        if self.state is not None:
            await self.state.restore({tp.partition for tp in assigned})
        if self.after_restore is not None:
            await self.after_restore(assigned)
        if self.state is not None or self.after_restore is not None:
            # The restored state lives until the next assignment: keep it out of every later
            # collection, which then only scans the batches' short-lived objects.
            gc.collect()
            gc.freeze()
        if assigned == self._assigned:  # no newer assignment arrived meanwhile
            self._restored = True
            await self._write_snapshots()  # a restore that read a long tail is not read twice
        log.info(
            "batch_consumer_restored",
            service=self.name,
            partitions=len(assigned),
            seconds=round(time.perf_counter() - started, 3),
        )

    async def _idle(self) -> None:
        """A poll brought nothing: the service's idle work (it may change the state table,
        which is then written like a poll's changes)."""
        assert self.on_idle is not None
        if self.state is not None:
            self.state.checkpoint()
        try:
            await self.on_idle()
        except BaseException:
            if self.state is not None:
                self.state.rollback()
            raise
        if self.state is not None:
            self.state.keep()
            await self.state.save()
            await self._write_snapshots()

    # --- one poll --------------------------------------------------------------------------

    async def _handle(
        self, consumer: AIOKafkaConsumer, batch: Mapping[TopicPartition, Sequence[Record]]
    ) -> None:
        pairs: list[tuple[Record, Item]] = []
        offsets: dict[TopicPartition, int] = {}
        for tp, records in batch.items():
            if tp not in self._assigned or not records:
                continue
            for record in records:
                event = await self._decode_or_dead_letter(record)
                if event is not None:
                    pairs.append((record, event))
            offsets[tp] = records[-1].offset + 1
        if pairs:
            if tracing.enabled():
                await self._handle_traced(pairs)
            else:
                await self._handle_events(pairs)
        if self.state is not None:
            await self.state.save()  # before the commit: what the poll changed is durable
        if offsets:
            try:
                await consumer.commit(offsets)
            except CommitFailedError as exc:
                # A rebalance took the partitions away; their new owner reads from the last
                # commit, and handlers are idempotent.
                log.warning("commit_failed", service=self.name, error=str(exc)[:200])
        await self._write_snapshots()

    async def _write_snapshots(self) -> None:
        """The state table's snapshots that are due (a failure is logged: the restore then
        reads more of the changelog, nothing is lost)."""
        if self.state is None:
            return
        try:
            await self.state.write_snapshots()
        except Exception as exc:
            log.warning(
                "state_snapshot_failed",
                service=self.name,
                error_type=type(exc).__name__,
                error=str(exc)[:200],
            )

    async def _handle_traced(self, pairs: Sequence[tuple[Record, Item]]) -> None:
        """`_handle_events` in the poll's span (linking the traced events), with one span per
        traced event under the event's own `traceparent`; while a dossier's items are handled
        (`for_each_dossier`) its newest traced event's span is current."""
        traced: list[tuple[Record, Item, Context]] = []
        for record, item in pairs:
            context = tracing.context_of(tracing.traceparent_in(record.value))
            if context is not None:
                traced.append((record, item, context))
        batch = tracing.start_batch(
            f"consume {','.join(self.topic_names)}",
            [context for _, _, context in traced],
            {
                "messaging.system": "kafka",
                "messaging.consumer.group.name": self.group_id,
                "messaging.batch.message_count": len(pairs),
            },
        )
        spans = {
            id(item): tracing.start_child(
                f"process {record.topic}",
                context,
                {
                    "messaging.system": "kafka",
                    "messaging.destination.name": record.topic,
                    "messaging.destination.partition.id": str(record.partition),
                    "messaging.kafka.offset": record.offset,
                    "messaging.consumer.group.name": self.group_id,
                },
            )
            for record, item, context in traced
        }
        try:
            with (
                tracing.use_span(batch),
                tracing.item_contexts(
                    {key: trace.set_span_in_context(span) for key, span in spans.items()}
                ),
            ):
                await self._handle_events(pairs)
        except BaseException as exc:
            for span in (batch, *spans.values()):
                tracing.fail(span, exc)
            raise
        finally:
            for span in (*spans.values(), batch):
                span.end()

    async def _handle_events(self, pairs: Sequence[tuple[Record, Item]]) -> None:
        events = [event for _, event in pairs]
        tally = Tally(record.topic for record, _ in pairs)
        if await self._attempt(events, tally):
            return
        # The batch failed every attempt: one event at a time, so a poison event is
        # dead-lettered alone and the rest still count.
        for record, event in pairs:

            async def give_up(exc: BaseException, attempts: int, r: Record = record) -> None:
                await self._dead_letter(r, exc, attempts)

            await self._attempt([event], Tally({record.topic: 1}), on_give_up=give_up)

    async def _attempt(
        self,
        events: Sequence[Item],
        tally: Mapping[str, int],
        *,
        on_give_up: GiveUp | None = None,
    ) -> bool:
        """True when the handler succeeded, or failed for good and `on_give_up` dealt with it."""
        retry = self.retry
        for attempt in range(1, retry.attempts + 1):
            started = time.perf_counter()
            if self.state is not None:
                self.state.checkpoint()
            try:
                await self.handler(events)
            except INFRASTRUCTURE_ERRORS:
                raise  # not the messages' fault: start again from the committed offsets
            except Exception as exc:
                if self.state is not None:
                    self.state.rollback()  # the next attempt starts from the same states
                log.warning(
                    "handler_failed",
                    service=self.name,
                    topics=sorted(tally),
                    attempt=attempt,
                    error_type=type(exc).__name__,
                    error=str(exc)[:300],
                )
                if attempt == retry.attempts or isinstance(exc, PoisonMessage):
                    if on_give_up is None:
                        return False
                    await on_give_up(exc, attempt)
                    return True
                await asyncio.sleep(retry.delay(attempt))
            else:
                if self.state is not None:
                    self.state.keep()
                elapsed = time.perf_counter() - started
                for topic, count in tally.items():
                    HANDLER_SECONDS.labels(self.name, topic).observe(elapsed)
                    EVENTS_CONSUMED.labels(self.name, topic).inc(count)
                return True
        return False

    async def _decode_or_dead_letter(self, record: Record) -> Item | None:
        try:
            item: Item | None = self.decode(record)
        except PoisonMessage as exc:
            await self._dead_letter(record, exc.__cause__ or exc, 1)
            return None
        return item

    async def _dead_letter(self, record: Record, error: BaseException, attempts: int) -> None:
        await dead_letter(
            self.publisher,
            self.name,
            record.topic,
            record.key,
            record.value or b"",
            error,
            attempts,
            partition=record.partition,
            offset=record.offset,
        )

    # --- rebalances (called by aiokafka's group coordinator) --------------------------------

    async def on_revoked(self) -> None:
        async with self._lock:  # the poll in hand is handled and committed first
            self._forget_assignment()

    def on_assigned(self, assigned: frozenset[TopicPartition]) -> None:
        member_id = getattr(getattr(self._consumer, "_coordinator", None), "member_id", None)
        if self._member_file is not None and isinstance(member_id, str):
            self._member_file.write(member_id)
        self._assigned = assigned
        self._generation += 1
        self._restored = False  # restored by the loop before it handles anything


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]  # aiokafka is untyped
    def __init__(self, owner: BatchConsumer[Any]) -> None:
        self.owner = owner

    async def on_partitions_revoked(self, revoked: object) -> None:
        await self.owner.on_revoked()

    async def on_partitions_assigned(self, assigned: Sequence[TopicPartition]) -> None:
        self.owner.on_assigned(frozenset(assigned))
