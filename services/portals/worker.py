"""The portals consumer: events into the dossiers' states, deliveries made, outcomes applied.

One batch consumer (`Service.consume`, group `motcua-portals`) reads, keyed by dossier id and
co-partitioned, so a member holds whole dossiers:

- `dossier.events` (every `dossier.*`: the owner from `dossier.submitted`'s `source`, the
  status, `dossier.overdue`), `payment.events`, `postal.events` and `sms.events`;
- `portals.callbacks` (`messages.py`): the outcome of each attempt, redelivery requests, ticks.

A poll is grouped by dossier; each dossier's inputs are applied in order by the pure core
(`domain.py`) and its state put in the `StateTable`, which the consumer writes to
`topics.PORTALS_STATE_CHANGELOG` before it commits. Nothing waits in memory only: a pending
delivery and the moment of its next attempt are part of the state, so a restarted or
SIGKILLed worker finds every pending retry in the changelog (`after_restore`).

The scan (`PortalsWorker.scan`, every `PORTALS_SCAN_INTERVAL_SECONDS`) takes the dossiers whose
next moment has come from a `DueIndex` and starts their due attempts as tasks (`Deliverer`,
bounded per portal, so one slow portal holds only its own share); each attempt's outcome is
written to `portals.callbacks` and applied by the consumer like any input. A delivery given up
after its last attempt goes to `portals.callbacks.dlq` (its event's bytes, `error` the reason,
`error_type` `DeliveryGivenUp`); `motcua dlq-replay portals.callbacks` puts it back, which
delivers it again. A dossier whose story is over leaves the state after its grace (a `Tick`).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

import orjson
from aiokafka.structs import ConsumerRecord, TopicPartition

from services.common import topics
from services.common.consumer import for_each_dossier
from services.common.dead_letters import PoisonMessage, dead_letter_headers
from services.common.due import DueIndex
from services.common.kafka import DurablePublisher
from services.common.logging import get_logger
from services.common.state import STATES_LIVE, STATES_RETIRED, StateTable
from services.portals import messages
from services.portals.book import SubscriptionBook
from services.portals.deliverer import DELIVERED, GIVEN_UP, RETRIED, Deliverer
from services.portals.domain import (
    Attempt,
    Delivery,
    DossierState,
    Incoming,
    Result,
    Retirement,
    due_deliveries,
    initial_state,
    next_due,
    on_attempt,
    on_event,
    on_redeliver,
    retire,
)
from services.portals.messages import Redeliver, Tick
from services.portals.settings import PortalsSettings

log = get_logger("motcua.portals")

SERVICE = "portals"
INPUT_TOPICS = (
    topics.DOSSIER_EVENTS,
    topics.PAYMENT_EVENTS,
    topics.POSTAL_EVENTS,
    topics.SMS_EVENTS,
    topics.PORTALS_CALLBACKS,
)
# How long an attempt whose outcome could not be written waits before it is made again.
RETRY_SOON = timedelta(seconds=1)
Input = Incoming | Attempt | Redeliver | Tick


class DeliveryGivenUp(Exception):
    """The reason of a dead letter: a delivery given up after its last attempt."""


def now_utc() -> datetime:
    return datetime.now(UTC)


# --- the consumer's inputs ---------------------------------------------------------------------


def event_input(raw: bytes) -> Incoming | None:
    """An event of the event topics as the core's input; None for a type portals ignore.
    What cannot be read is poison (intake and the services validated every envelope)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PoisonMessage(f"malformed JSON: {exc}"[:300]) from None
    if not isinstance(value, dict):
        raise PoisonMessage("not a CloudEvents envelope")
    kind = value.get("type")
    if not isinstance(kind, str):
        raise PoisonMessage("not a CloudEvents envelope with a type")
    if kind.partition(".")[0] not in ("dossier", "payment", "postal", "sms"):
        return None
    data = value.get("data")
    event_id, source, when = value.get("id"), value.get("source"), value.get("time")
    try:
        if not isinstance(data, dict):
            raise TypeError("data must be an object")
        dossier_id = data.get("dossier_id") or value.get("subject")
        if not isinstance(dossier_id, str) or not dossier_id:
            raise TypeError("no dossier id")
        if not isinstance(event_id, str) or not event_id:
            raise TypeError("no id")
        if not isinstance(source, str) or not source:
            raise TypeError("no source")
        if not isinstance(when, str):
            raise TypeError("no time")
        at = datetime.fromisoformat(when)
        if at.tzinfo is None:
            raise ValueError("time has no offset")
    except (TypeError, ValueError) as exc:
        raise PoisonMessage(f"{type(exc).__name__}: {exc}"[:300]) from None
    return Incoming(kind, event_id, source, dossier_id, at, data, raw)


def decode_input(record: ConsumerRecord) -> Input | None:
    """A record of any input as the core's input; `PoisonMessage` for what can never apply."""
    if record.topic == topics.PORTALS_CALLBACKS:
        try:
            return messages.decode(record.value or b"", now=now_utc())
        except messages.BadMessage as exc:
            raise PoisonMessage(str(exc)) from exc
    return event_input(record.value or b"")


# --- the states ----------------------------------------------------------------------------------


class DossierStates:
    """The `StateTable` of dossier states, and the next moment of each in a `DueIndex`.

    The index follows the table's committed changes only: `put` stages, `settle` applies once
    the handler's attempt succeeded, `discard` forgets when it failed."""

    def __init__(self, table: StateTable[DossierState], rules: Retirement) -> None:
        self.table = table
        self.rules = rules
        self.due = DueIndex()
        self._staged: dict[str, DossierState | None] = {}

    def __len__(self) -> int:
        return len(self.table)

    def get(self, dossier_id: str) -> DossierState | None:
        return self.table.get(dossier_id)

    def load(self, dossier_id: str, now: datetime) -> DossierState:
        return self.table.get(dossier_id) or initial_state(dossier_id, now)

    def put(self, state: DossierState) -> None:
        self._staged[state.dossier_id] = state
        self.table.put(state.dossier_id, state)

    def delete(self, dossier_id: str) -> None:
        self._staged[dossier_id] = None
        self.table.delete(dossier_id)

    def settle(self) -> None:
        retired = 0
        for dossier_id, state in self._staged.items():
            if state is None:
                retired += 1
                self.due.set(dossier_id, None)
            else:
                self.due.set(dossier_id, next_due(state, self.rules))
        STATES_RETIRED.labels(SERVICE).inc(retired)
        STATES_LIVE.labels(SERVICE).set(len(self.table))
        self._staged.clear()

    def discard(self) -> None:
        self._staged.clear()

    def restored(self) -> None:
        self.discard()
        self.due.clear()
        for dossier_id, state in self.table.readable():
            self.due.set(dossier_id, next_due(state, self.rules))
        STATES_LIVE.labels(SERVICE).set(len(self.table))

    def pop_due(self, now: datetime) -> list[str]:
        return [d for d in self.due.pop_due(now) if d in self.table]

    def due_again(self, dossier_ids: Sequence[str], at: datetime) -> None:
        for dossier_id in dossier_ids:
            known = self.due.due_at(dossier_id)
            if dossier_id in self.table and (known is None or known > at):
                self.due.set(dossier_id, at)


# --- the worker ------------------------------------------------------------------------------


class PortalsWorker:
    def __init__(
        self,
        states: DossierStates,
        book: SubscriptionBook,
        deliverer: Deliverer,
        publisher: DurablePublisher,
        settings: PortalsSettings,
        *,
        clock: Callable[[], datetime] = now_utc,
    ) -> None:
        self.states = states
        self.book = book
        self.deliverer = deliverer
        self.publisher = publisher
        self.schedule = tuple(settings.retry_seconds)
        self.dossier_concurrency = settings.dossier_concurrency
        # attempts started for one portal beyond its concurrency wait for a connection slot;
        # past this many the dossier waits in the portal's line until attempts finish
        self.max_in_flight_per_portal = settings.per_portal_concurrency * 64
        self.clock = clock
        # (dossier, delivery) → the number of its attempt started here whose outcome the
        # consumer has not applied yet: until then the delivery is not started again, however
        # often the dossier comes due (another input for it restages its next moment)
        self._unsettled: dict[tuple[str, str], int] = {}
        self._in_flight_by_portal: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # outcomes of finished attempts, written to `portals.callbacks` in the background
        self._outcomes: list[Attempt] = []
        self._writing: asyncio.Task[None] | None = None
        # per portal, the due dossiers waiting for one of its attempt slots to free
        self._waiting: dict[str, deque[str]] = {}

    # --- inputs ----------------------------------------------------------------------------

    async def on_batch(self, inputs: Sequence[Input]) -> None:
        await self.book.wait_read()  # the subscriptions decide what is delivered
        dead: list[tuple[str, bytes, bytes | None, Delivery]] = []
        now = self.clock()

        async def handle(dossier_id: str, items: list[Input]) -> None:
            fresh = initial_state(dossier_id, now)
            state: DossierState | None = self.states.load(dossier_id, now)
            for item in items:
                state = self._apply(state or fresh, item, now, dead)
            held = dossier_id in self.states.table
            if state is None:
                if held:
                    self.states.delete(dossier_id)
            elif held or state != fresh:  # an input that changed nothing keeps no state
                self.states.put(state)

        try:
            await for_each_dossier(
                inputs, lambda item: item.dossier_id, handle, concurrency=self.dossier_concurrency
            )
            if dead:
                await self._dead_letter(dead)
        except BaseException:
            self.states.discard()
            raise
        for _, _, _, delivery in dead:
            GIVEN_UP.labels(delivery.portal).inc()
        self.states.settle()

    def _apply(
        self,
        state: DossierState,
        item: Input,
        now: datetime,
        dead: list[tuple[str, bytes, bytes | None, Delivery]],
    ) -> DossierState | None:
        match item:
            case Incoming():
                return on_event(state, item, self.book.by_source, now)
            case Attempt():
                key = (item.dossier_id, item.delivery_id)
                if self._unsettled.get(key) == item.attempt:
                    del self._unsettled[key]
                outcome = on_attempt(state, item, self.schedule)
                if outcome.result is Result.DELIVERED and outcome.delivery is not None:
                    DELIVERED.labels(outcome.delivery.portal).inc()
                elif outcome.result is Result.RETRIED and outcome.delivery is not None:
                    RETRIED.labels(outcome.delivery.portal).inc()
                elif outcome.result is Result.GIVEN_UP and outcome.delivery is not None:
                    d = outcome.delivery
                    dead.append((d.id, state.dossier_id.encode(), d.body.encode(), d))
                    log.warning(
                        "delivery_given_up",
                        portal=d.portal,
                        delivery_id=d.id,
                        dossier_id=state.dossier_id,
                        reason=d.reason,
                    )
                return outcome.state
            case Redeliver():
                return on_redeliver(state, item.delivery_id, item.at)
            case Tick():
                return None if retire(state, self.states.rules, item.at) else state
        return state

    async def _dead_letter(self, dead: Sequence[tuple[str, bytes, bytes | None, Delivery]]) -> None:
        for _, key, body, delivery in dead:
            await self.publisher.publish(
                [(topics.dlq(topics.PORTALS_CALLBACKS), key, body)],
                headers={
                    **dead_letter_headers(
                        DeliveryGivenUp(delivery.reason or "given up"), delivery.attempts
                    ),
                    "portal": delivery.portal.encode(),
                    "delivery_id": delivery.id.encode(),
                },
            )

    async def after_restore(self, assigned: frozenset[TopicPartition]) -> None:
        self.states.restored()
        self._waiting.clear()  # every due dossier is in the rebuilt index
        # an attempt of a dossier held elsewhere now is settled by its new holder
        for key in [k for k in self._unsettled if k[0] not in self.states.table]:
            del self._unsettled[key]
        log.info(
            "portals_states_restored",
            dossiers=len(self.states),
            due=len(self.states.due),
            partitions=len(assigned),
        )

    # --- the scan ------------------------------------------------------------------------------

    async def scan(self) -> None:
        """Start writing the outcomes of the attempts finished since the last write; start every
        due attempt; a tick for every dossier whose retirement is due."""
        if self._outcomes and (self._writing is None or self._writing.done()):
            self._writing = asyncio.create_task(self._write_outcomes())
        now = self.clock()
        ticks: list[str] = []
        for dossier_id in self.states.pop_due(now):
            self._consider(dossier_id, now, ticks)
        # the dossiers that waited for a slot of their portal, as slots have come free
        for portal, waiting in self._waiting.items():
            while waiting and not self._full(portal):
                self._consider(waiting.popleft(), now, ticks)
        if ticks:
            try:
                await self.publisher.publish(
                    [
                        (topics.PORTALS_CALLBACKS, d.encode(), messages.encode(Tick(d, now)))
                        for d in ticks
                    ]
                )
            except BaseException:
                self.states.due_again(ticks, now + RETRY_SOON)
                raise

    def _full(self, portal: str) -> bool:
        return self._in_flight_by_portal.get(portal, 0) >= self.max_in_flight_per_portal

    def _consider(self, dossier_id: str, now: datetime, ticks: list[str]) -> None:
        """Start the dossier's due attempts; if its portal has no slot free, it waits in that
        portal's line (a dead portal's backlog costs a scan nothing until a slot frees)."""
        state = self.states.get(dossier_id)
        if state is None:
            return
        due = due_deliveries(state, now)
        if not due:
            if retire(state, self.states.rules, now):
                ticks.append(dossier_id)
            return
        portal = due[0].portal  # a dossier's deliveries all go to its owner
        if self._full(portal):
            self._waiting.setdefault(portal, deque()).append(dossier_id)
            return
        for delivery in due:
            if self._unsettled.get((dossier_id, delivery.id)) != delivery.attempts + 1:
                self._start(dossier_id, delivery)  # else started here: its outcome is coming

    def _start(self, dossier_id: str, delivery: Delivery) -> None:
        self._unsettled[(dossier_id, delivery.id)] = delivery.attempts + 1
        portal = delivery.portal
        self._in_flight_by_portal[portal] = self._in_flight_by_portal.get(portal, 0) + 1
        task = asyncio.create_task(self._attempt(dossier_id, delivery))
        self._tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            self._tasks.discard(t)
            self._in_flight_by_portal[portal] -= 1
            if not t.cancelled() and t.exception() is not None:
                log.warning("attempt_task_failed", error=str(t.exception())[:300])

        task.add_done_callback(done)

    async def _attempt(self, dossier_id: str, delivery: Delivery) -> None:
        number = delivery.attempts + 1
        code: int | None
        error: str | None
        subscription = self.book.get(delivery.portal)
        ok, code, error = False, None, "the portal has no subscription"
        if subscription is not None:
            answer = await self.deliverer.post(
                delivery.portal,
                subscription.url,
                subscription.secret,
                delivery.id,
                delivery.body.encode(),
            )
            ok, code, error = answer.ok, answer.status_code, answer.error
        self._outcomes.append(
            Attempt(dossier_id, delivery.id, number, ok, code, error, self.clock())
        )

    async def _write_outcomes(self) -> None:
        """One write of every outcome waiting; if it fails, their attempts are made again (the
        same delivery id: the portal sees a repeat, never a loss)."""
        outcomes, self._outcomes = self._outcomes, []
        if not outcomes:
            return
        try:
            await self.publisher.publish(
                [
                    (topics.PORTALS_CALLBACKS, o.dossier_id.encode(), messages.encode(o))
                    for o in outcomes
                ]
            )
        except Exception as exc:  # the broker away: the attempts are made again
            log.warning(
                "attempt_outcomes_not_written", outcomes=len(outcomes), error=str(exc)[:200]
            )
            for o in outcomes:
                self._unsettled.pop((o.dossier_id, o.delivery_id), None)
            self.states.due_again([o.dossier_id for o in outcomes], self.clock() + RETRY_SOON)

    async def close(self) -> None:
        if self._writing is not None:
            self._writing.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
