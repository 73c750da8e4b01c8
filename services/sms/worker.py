"""The SMS worker: the consuming shell around the fold, the sender and the timers.

Per poll (`on_batch`, called by the service's `BatchConsumer`): the items are folded into the
per-dossier records (`fold.fold`, pure); the changed records are put in the `StateTable`; the
`sms.*` events, the fold's dead letters and the records are written (acks=all, all at once); and
only then are the messages due handed to the sender, and those deferred past quiet hours kept
for the timer. The consumer commits the poll's offsets after the handler returns.

The records are the truth: on every assignment the consumer restores them for the assigned
partitions, and `after_restore` picks up every pending message and wake-up again. A pending
message whose `sms.sent` / `sms.failed` is already on `sms.events` (the worker was killed before
its record learnt it; `announced.py`) is settled without being sent or announced again. For the
others, the Redis claim per message makes a second attempt harmless, and should Redis have lost
it too, the message goes to the same gateway as before (`providers.key_point`), which answers
"replayed" for a key it had.

Backpressure: the sender takes `SMS_MAX_PENDING` messages into its stages at most (`submit`
waits), and while its backlog (`Sender.backlog`: in the stages, or sent and not yet settled in
their records) is that large, the consumer leaves the input topics unread (`held`) and reads only
`sms.callbacks`, so a worker behind its input holds a bounded number of pending messages.

Timer jobs: `send_deferred` (quiet hours over), `request_ticks` (a dossier's wake-up or its
retirement is due: a `tick` callback, applied by the member holding the dossier) and
`pick_up_pending` (a send that Redis or the broker interrupted is tried again).

Retirement: `retiring` (a `DueIndex`, rebuilt from the records on every restore) holds the
moment each record whose story is over may leave (`record.retire_at`); when it comes, a `tick`
goes out for the dossier, and the fold retires the record if it still may: the table forgets it
and its tombstone is written with the poll's records, before the commit. An idle worker retires
too, since the tick is an input. `motcua_states_live{service="sms"}` and
`motcua_states_retired_total{service="sms"}` count the records held and retired.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from aiokafka.structs import ConsumerRecord as Record  # [bytes, bytes]; aiokafka is untyped
from aiokafka.structs import TopicPartition

from services.common import topics
from services.common.consumer import dead_letter
from services.common.coordination import Keys
from services.common.due import DueIndex
from services.common.events import CloudEvent
from services.common.kafka import DurablePublisher, dossier_partition
from services.common.logging import get_logger
from services.common.state import STATES_LIVE, STATES_RETIRED, StateTable
from services.sms.announced import read_send_outcomes
from services.sms.contacts import Contacts
from services.sms.counters import BY_NAME
from services.sms.decisions import SurveyInvites, next_wakeup
from services.sms.fold import Outcome, Rules, SmsNotSent, fold
from services.sms.inbox import INPUT_TOPICS, Item, Settle, decode_item, settle_body, tick_body
from services.sms.partner import SmsGateway
from services.sms.record import Pending, SmsRecord, retire_at
from services.sms.sender import Sender, as_held
from services.sms.settings import SmsSettings
from services.sms.settling import Settled
from services.sms.templates import load_templates

log = get_logger("motcua.sms")

SERVICE = "sms"

# Ticks published per timer round at most (the rest go in the next rounds).
MAX_TICKS = 5000

# A record with all of these has nothing pending and no wake-up: the rescan skips decoding it.
_IDLE_MARKS = (b'"pending":{}', b'"pending_overdue":null', b'"awaiting_contact":[]')


def open_with_phone(raw: bytes) -> bool:
    """The record (its bytes) of an open dossier with a phone number: not one to retire, so
    the restore need not decode it."""
    return b'"settled":false' in raw and b'"contact":null' not in raw


Publish = Callable[[Sequence[CloudEvent[Any]]], Awaitable[None]]


def decode(record: Record) -> Item | None:
    """A Kafka record of any consumed topic, as the fold reads it (`inbox.decode_item`)."""
    return decode_item(record.topic, record.key, record.value)


class SmsWorker:
    """One per worker process: the records, what they still have to do, and the sender."""

    def __init__(
        self,
        sms: SmsSettings,
        records: StateTable[SmsRecord],
        *,
        partitions: int,
        bootstrap: str,
        publisher: DurablePublisher,
        publish: Publish,
        redis: aioredis.Redis,
        keys: Keys,
        gateways: Mapping[str, SmsGateway],
        contacts: Contacts | None = None,
        survey: SurveyInvites | None = None,
    ) -> None:
        self.sms = sms
        self.records = records
        self.partitions = partitions
        self.bootstrap = bootstrap
        self.publisher = publisher
        self.publish = publish
        self.rules = Rules(
            load_templates(),
            sms.opt_out,
            sms.quiet_hours,
            replace(sms.policy, survey=survey),
            sms.retirement,
        )
        self.contacts = contacts
        self.sender = Sender(
            sms,
            redis,
            keys,
            gateways,
            publish,
            self.dead_letter_pending,
            self.settle_many,
            open_number=contacts.number if contacts is not None else as_held,
            refresh_numbers=contacts.refresh if contacts is not None else None,
        )
        self.deferred: dict[str, Pending] = {}  # due later (quiet hours, or picked up again)
        self.wakeups: dict[str, datetime] = {}  # when a dossier needs a tick
        self.retiring = DueIndex()  # when a record whose story is over may leave

    # --- consuming -------------------------------------------------------------------------

    async def on_batch(self, items: Sequence[Item]) -> None:
        """Fold a poll into the records; write what changed (acks=all), then act on it."""
        if self.contacts is not None:
            items = await self.contacts.open_phones(items)
        outcome = fold(self.records.get, items, self.rules, datetime.now(UTC))
        for dossier_id, record in outcome.records.items():
            self.records.put(dossier_id, record)
        for dossier_id in outcome.retired:
            self.records.delete(dossier_id)
        # A failed write raises a broker error: the consumer restores the records from the
        # changelog and reads the poll again, so nothing below runs for a write not durable.
        await self._write(outcome)
        for record in outcome.records.values():
            self._schedule_wakeup(record)
            self._schedule_retirement(record)
        for dossier_id in outcome.retired:
            self.retiring.set(dossier_id, None)
            self.wakeups.pop(dossier_id, None)
        if outcome.retired:
            STATES_RETIRED.labels(SERVICE).inc(len(outcome.retired))
        STATES_LIVE.labels(SERVICE).set(len(self.records))
        for name, labels in outcome.counts:
            BY_NAME[name].labels(*labels).inc()
        for key in outcome.settled:  # the records are written: none holds these pending
            self.deferred.pop(key, None)
            self.sender.learnt(key)
        for message in outcome.deferred:
            self.deferred[message.key] = message
        for message in outcome.due:  # each decided by this poll
            await self.sender.submit(message, decided_now=True)  # waits when too much queued

    def held(self) -> tuple[str, ...]:
        """The input topics while the sender's backlog is full (`SMS_MAX_PENDING`): the consumer
        then reads only `sms.callbacks`, whose news takes the messages out of the records, and the
        rest of the backlog waits on the broker instead of in the records."""
        return INPUT_TOPICS if self.sender.backlog >= self.sms.max_pending else ()

    async def _write(self, outcome: Outcome) -> None:
        writes: list[Awaitable[None]] = [self.records.save()]
        if outcome.events:
            writes.append(self.publish(outcome.events))
        writes.extend(
            dead_letter(
                self.publisher,
                SERVICE,
                dead.topic.removesuffix(".dlq"),
                dead.key,
                dead.value,
                dead.error,
                1,
            )
            for dead in outcome.dead_letters
        )
        await asyncio.gather(*writes)

    async def after_restore(self, assigned: frozenset[TopicPartition]) -> None:
        """The records of the assigned partitions are back: everything they still have to do."""
        self.deferred.clear()
        self.wakeups.clear()
        self.retiring.clear()
        self.rescan()
        announced = await self._settle_announced()
        for dossier_id, raw in self.records.items_raw():
            if open_with_phone(raw):
                continue
            self._schedule_retirement(self.records.decode(dossier_id, raw))
        STATES_LIVE.labels(SERVICE).set(len(self.records))
        log.info(
            "sms_restored",
            partitions=len(assigned),
            dossiers=len(self.records),
            pending=len(self.deferred),
            announced_before=announced,
            retiring=len(self.retiring),
        )

    async def _settle_announced(self) -> int:
        """The pending messages whose outcome `sms.events` already holds leave the deferred
        ones, settled without a send or an announcement; returns how many."""
        if not self.deferred:
            return 0
        dossiers = {message.dossier_id for message in self.deferred.values()}
        # only the partitions holding a pending message's dossier (all of them assigned)
        partitions = {dossier_partition(d.encode(), self.partitions) for d in dossiers}
        since = datetime.now(UTC).timestamp() - self.sms.restore_lookback_seconds
        reading = await read_send_outcomes(
            self.bootstrap, partitions, int(since * 1000), set(self.deferred), dossiers
        )
        found = [(self.deferred.pop(key), outcome) for key, outcome in reading.outcomes.items()]
        await self.sender.announced_before(found)
        log.info(
            "sms_announced_read",
            records=reading.records,
            seconds=round(reading.seconds, 3),
            settled=len(found),
        )
        return len(found)

    # --- the sender's callbacks ------------------------------------------------------------

    async def settle_many(self, news: Sequence[Settled]) -> None:
        """The sender's news, one `settle` callback per partition of the dossiers concerned.

        Keyed by one of its dossiers, the batch lands on their partition (the producer's default
        partitioner, the one that placed their events), so the member holding those dossiers
        applies it.
        """
        by_partition: dict[int, list[Settle]] = {}
        keys: dict[int, bytes] = {}
        for item in news:
            message = item.message
            key = message.dossier_id.encode()
            partition = dossier_partition(key, self.partitions)
            keys.setdefault(partition, key)
            by_partition.setdefault(partition, []).append(
                Settle(
                    message.dossier_id,
                    message.key,
                    message.template,
                    message.segments,
                    item.provider,
                    item.status,
                )
            )
        await self.publisher.publish(
            [
                (topics.SMS_CALLBACKS, keys[partition], settle_body(items))
                for partition, items in by_partition.items()
            ]
        )

    async def dead_letter_pending(self, message: Pending, reason: str, attempts: int) -> None:
        await dead_letter(
            self.publisher,
            SERVICE,
            message.source_topic,
            message.dossier_id.encode(),
            message.origin.encode(),
            SmsNotSent(reason),
            attempts,
        )

    # --- timer jobs ------------------------------------------------------------------------

    async def send_deferred(self) -> None:
        """Hand the sender every deferred message whose time has come."""
        now = datetime.now(UTC)
        for key, message in list(self.deferred.items()):
            if message.not_before <= now:
                self.deferred.pop(key, None)
                await self.sender.submit(message)

    async def request_ticks(self) -> None:
        """A `tick` for every dossier whose wake-up or retirement is due (written keyed by the
        dossier, so the member holding it applies it in order with its events)."""
        now = datetime.now(UTC)
        due = [dossier_id for dossier_id, when in self.wakeups.items() if when <= now]
        retiring = self.retiring.pop_due(now)
        for dossier_id in retiring[MAX_TICKS:]:
            self.retiring.set(dossier_id, now)  # due still: the next rounds
        retiring = retiring[:MAX_TICKS]
        ticks = list(dict.fromkeys(due + retiring))
        if not ticks:
            return
        try:
            await self.publisher.publish(
                [(topics.SMS_CALLBACKS, d.encode(), tick_body(d)) for d in ticks]
            )
        except BaseException:
            for dossier_id in retiring:
                self.retiring.set(dossier_id, now)
            raise
        for dossier_id in due:
            self.wakeups.pop(dossier_id, None)

    async def pick_up_pending(self) -> None:
        """Now and then: a send that Redis or the broker interrupted is picked up again."""
        self.rescan()

    def rescan(self) -> None:
        """Every pending message and wake-up of the records held (saved ones: a record still
        being written is acted on by the poll that changed it)."""
        unsaved = self.records.unsaved
        for dossier_id, raw in self.records.items_raw():
            if dossier_id in unsaved or all(idle in raw for idle in _IDLE_MARKS):
                continue
            record = self.records.decode(dossier_id, raw)
            self._schedule_wakeup(record)
            for key, message in record.pending.items():
                if not self.sender.busy_with(key):
                    self.deferred[key] = message  # sent by the timer when due

    def _schedule_retirement(self, record: SmsRecord) -> None:
        self.retiring.set(record.state.dossier_id, retire_at(record, self.sms.retirement))

    def _schedule_wakeup(self, record: SmsRecord) -> None:
        when = next_wakeup(record.state, self.rules.policy)
        if when is None:
            self.wakeups.pop(record.state.dossier_id, None)
        else:
            self.wakeups[record.state.dossier_id] = when
