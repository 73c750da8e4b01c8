"""The postal consumer: its inputs applied to the dossiers' states, and the decisions carried out.

One batch consumer (`Service.consume`, group `motcua-postal`) reads both inputs of a dossier's
state, keyed by dossier id and co-partitioned, so a member holds whole dossiers:

- `dossier.events`: submitted, resolved, withdrawn, rejected (the other types are skipped after
  reading their `type`, and so is a `dossier.submitted` whose postal mode wants no leg, before
  its sealed address is opened or its state looked up; of these, only the fields the core uses
  are read, `dossier_input`);
- `postal.callbacks` (ours, not CloudEvents, see `messages.py`): the carrier callbacks the
  webhook wrote, and the `Tick`s of the scan, so states change only in the consumer.

A batch is grouped by dossier; dossiers are handled concurrently (`dossier_concurrency`), one
dossier's inputs in order: load the state, `domain.apply`, carry out the commands
(`PostalShell`: carrier calls feed their results back into `apply`) and keep the state in the
`StateTable`; the `postal.*` events of every dossier of the batch are then published together
(acks=all), and only then does the handler return. The consumer writes the changed states to
`topics.POSTAL_STATE_CHANGELOG` after the handler and only then commits (a failed publish
discards the batch's states: the consumer rolls them back or restores them). A crash
anywhere before that replays the inputs: bookings are idempotent by order reference at the
carrier and event ids are deterministic, so nothing happens twice.

Only dossiers with a postal leg are kept, and only until their story is over
(`domain.retire_at`): the scan (`PostalWorker.scan`, every `POSTAL_SCAN_INTERVAL_SECONDS`) takes
the dossiers whose next tick is due from a `DueIndex` (`DossierStates`) and puts a `Tick` for
each on `postal.callbacks`; applied by the consumer, a tick queries or gives up a leg without
news, re-sends a booking, or retires the dossier (deleted from the table, tombstoned in the
changelog before the commit). `motcua_states_live{service="postal"}` and
`motcua_states_retired_total{service="postal"}` count them; what a late input of a retired
dossier does is in `domain.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import orjson
from aiokafka.structs import ConsumerRecord, TopicPartition
from prometheus_client import Counter

from services.common import topics, tracing
from services.common.consumer import for_each_dossier
from services.common.counter_series import CounterSeries
from services.common.data_keys import KeyErased
from services.common.dead_letters import PoisonMessage
from services.common.due import DueIndex
from services.common.events import make_event
from services.common.kafka import DurablePublisher
from services.common.logging import get_logger
from services.common.partner import PartnerError
from services.common.sealing import SealingError
from services.common.state import STATES_LIVE, STATES_RETIRED, StateTable
from services.postal.callback_bodies import MalformedCallback
from services.postal.commands import (
    Alert,
    BookOrder,
    CancelOrder,
    Command,
    Ignored,
    IgnoreReason,
    PostalEvent,
    QueryOrder,
)
from services.postal.domain import PostalConfig, apply, from_retired, next_tick_at
from services.postal.inputs import (
    BookingFailed,
    CarrierCallback,
    DossierRejected,
    DossierResolved,
    DossierSubmitted,
    DossierWithdrawn,
    Event,
    OrderBooked,
    Tick,
)
from services.postal.messages import BadMessage, decode, encode_tick
from services.postal.partner import Carrier, CarrierRejected
from services.postal.personal import ERASED, PersonalData
from services.postal.settings import PostalSettings
from services.postal.shipments import DossierState, initial_state
from services.postal.stale import due_rebookings, unacknowledged_bookings

log = get_logger("motcua.postal")

SERVICE = "postal"
SOURCE = "motcua/postal"
DOSSIER_TYPES = frozenset(
    {"dossier.submitted", "dossier.resolved", "dossier.withdrawn", "dossier.rejected"}
)
EVENTS = Counter("motcua_postal_events_total", "postal.* events published", ["carrier", "status"])
CARRIER_CODES = Counter(
    "motcua_postal_carrier_codes_total", "Carrier status codes applied", ["carrier", "code"]
)
ORDERS = Counter(
    "motcua_postal_carrier_calls_total",
    "Calls to carriers by operation and outcome",
    ["carrier", "operation", "outcome"],
)
ALERTS = Counter("motcua_postal_alerts_total", "Alerts raised by the postal core", ["kind"])
IGNORED = Counter("motcua_postal_ignored_total", "Inputs dropped on purpose", ["reason"])
# one child per reason, looked up once: most dossier events without postal legs are counted here
_IGNORED_BY_REASON = {reason: IGNORED.labels(reason.value) for reason in IgnoreReason}


_EVENTS = CounterSeries(EVENTS)
_CARRIER_CODES = CounterSeries(CARRIER_CODES)
_ALERTS = CounterSeries(ALERTS)


def now_utc() -> datetime:
    return datetime.now(UTC)


# --- the consumer's inputs ------------------------------------------------------------------------


def dossier_input(raw: bytes, recorded_at: datetime | None = None) -> Event | None:
    """A `dossier.events` record (written at `recorded_at`) as the core's input; None for the
    types postal has no business with, and for a `dossier.submitted` whose postal mode wants no
    leg (the core would keep nothing of it). Intake validated every envelope against the
    contract on its way in, so postal reads only `type` and `data` and checks the fields its
    core uses (`from_data`), without building the whole event; what it cannot read is poison."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise PoisonMessage(f"malformed JSON: {exc}"[:300]) from None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in DOSSIER_TYPES:
        if isinstance(kind, str):
            return None
        raise PoisonMessage("not a CloudEvents envelope with a type")
    data = value.get("data")
    try:
        if not isinstance(data, dict):
            raise TypeError("data must be an object")
        match kind:
            case "dossier.submitted":
                submitted = DossierSubmitted.from_data(data, recorded_at)
                return submitted if submitted.mode.legs else None
            case "dossier.resolved":
                return DossierResolved.from_data(data)
            case "dossier.withdrawn":
                return DossierWithdrawn.from_data(data)
            case _:
                return DossierRejected.from_data(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise PoisonMessage(f"{type(exc).__name__}: {exc}"[:300]) from None


def decode_input(record: ConsumerRecord) -> Event | None:
    """A record of either input as the core's input; None for the dossier events postal has no
    business with. What can never be applied raises `PoisonMessage` (dead-lettered at once)."""
    if record.topic == topics.POSTAL_CALLBACKS:
        try:
            return decode(record.value or b"")
        except BadMessage as exc:
            raise PoisonMessage(str(exc)) from exc
    return dossier_input(record.value or b"", recorded_at(record))


def recorded_at(record: ConsumerRecord) -> datetime | None:
    """When the record was written (its timestamp), if the broker kept one."""
    stamp = record.timestamp
    return datetime.fromtimestamp(stamp / 1000, UTC) if stamp is not None and stamp >= 0 else None


# --- the states ---------------------------------------------------------------------------------


class DossierStates:
    """The worker's `StateTable` of dossier states, and when a `Tick` is next due for each
    (`domain.next_tick_at`: the stale rules, a booking to re-send, retirement) in a `DueIndex`,
    so a scan costs what is due, never a pass over every state.

    The index follows the table's committed changes only: `put` stages each dossier's next
    moment, `settle` applies them once the handler's attempt succeeded and `discard` drops them
    when it failed (the consumer then rolls the table back). A state equal to the initial one
    holds nothing (a dossier without postal legs, a stranger's callback, a retired dossier): it
    is not kept, and a kept one is deleted (its tombstone is written before the commit)."""

    def __init__(
        self, table: StateTable[DossierState], config: PostalConfig, rebook_after: timedelta
    ) -> None:
        self.table = table
        self.config = config
        self.rebook_after = rebook_after
        self.due = DueIndex()
        self._staged: dict[str, datetime | None] = {}
        self._retiring: set[str] = set()

    def __len__(self) -> int:
        return len(self.table)

    def load(self, dossier_id: str) -> DossierState:
        state = self.table.get(dossier_id)
        return initial_state(dossier_id) if state is None else state

    def put(self, state: DossierState) -> bool:
        """Keep `state` (delete it when it holds nothing); False when nothing is to be written."""
        dossier_id = state.dossier_id
        if state == initial_state(dossier_id):
            if dossier_id not in self.table:
                return False
            self.table.delete(dossier_id)
            self._staged[dossier_id] = None
            self._retiring.add(dossier_id)
            return True
        # staged even when unchanged: the scan took the dossier out of the index to tick it
        self._staged[dossier_id] = next_tick_at(state, self.config, self.rebook_after)
        self._retiring.discard(dossier_id)
        return self.table.put(dossier_id, state)

    def settle(self) -> None:
        """The handler's attempt succeeded: its states' next moments go into the index."""
        for dossier_id, at in self._staged.items():
            self.due.set(dossier_id, at)
        STATES_RETIRED.labels(SERVICE).inc(len(self._retiring))
        STATES_LIVE.labels(SERVICE).set(len(self.table))
        self.discard()

    def discard(self) -> None:
        """The handler's attempt failed: what it staged is forgotten with its states."""
        self._staged.clear()
        self._retiring.clear()

    def restored(self) -> None:
        """After the table was restored: every state's next moment, read from its bytes."""
        self.discard()
        self.due.clear()
        for dossier_id, state in self.table.readable():
            self.due.set(dossier_id, next_tick_at(state, self.config, self.rebook_after))
        STATES_LIVE.labels(SERVICE).set(len(self.table))

    def pop_due(self, now: datetime) -> list[str]:
        """The dossiers a `Tick` at `now` has something to do for; they leave the index until
        their tick's state is put (or `due_again`)."""
        return [d for d in self.due.pop_due(now) if d in self.table]

    def due_again(self, dossier_ids: Sequence[str], at: datetime) -> None:
        """Their ticks were not sent: due again at `at` (unless an input moved them meanwhile)."""
        for dossier_id in dossier_ids:
            if dossier_id not in self.due and dossier_id in self.table:
                self.due.set(dossier_id, at)


# --- carrying out the core's decisions ------------------------------------------------------------

# (topic, key, value) of a `postal.*` event, sent once the dossier's inputs of a batch are applied
Outgoing = tuple[str, bytes, bytes]


class PostalShell:
    """Carries out the core's decisions: carrier calls, events, alerts. Holds no state."""

    def __init__(
        self,
        publisher: DurablePublisher,
        carriers: dict[str, Carrier],
        config: PostalConfig,
        rebook_after: timedelta,
        personal: PersonalData | None = None,
    ) -> None:
        self.publisher = publisher
        self.carriers = carriers
        self.config = config
        self.rebook_after = rebook_after
        self.personal = personal  # opens the sealed personal fields (CONTRACT section 10)

    async def handle(
        self, state: DossierState, inputs: Sequence[Event], outbox: list[Outgoing]
    ) -> DossierState:
        """Apply one dossier's inputs in order and everything they lead to; return the next
        state, its `postal.*` events added to `outbox` (the caller keeps the state only once
        they are acknowledged: `PostalWorker.on_batch`)."""
        now = now_utc()
        if self.personal is not None:
            inputs = await self.personal.opened_inputs(inputs)
        for event in inputs:
            state = await self._step(state, event, outbox, now)
        return state

    async def _step(
        self, state: DossierState, event: Event, outbox: list[Outgoing], now: datetime
    ) -> DossierState:
        late = from_retired(state, event, now, self.config)
        if late is not None:  # counted, not logged: reading history again brings many
            return await self._execute(state, late, outbox)
        decision = apply(state, event, self.config)
        state = decision.state
        commands: list[Command] = list(decision.commands)
        if isinstance(event, CarrierCallback):
            _CARRIER_CODES(event.carrier, event.code[:8]).inc()
        if isinstance(event, Tick):
            commands.extend(due_rebookings(state, event.now, self.rebook_after))
        elif not isinstance(event, OrderBooked | BookingFailed | CarrierCallback):
            # a redelivered dossier event after a crash: re-send what was never acknowledged
            commands.extend(unacknowledged_bookings(state))
        for command in dict.fromkeys(commands):
            state = await self._execute(state, command, outbox)
        return state

    async def _execute(
        self, state: DossierState, command: Command, outbox: list[Outgoing]
    ) -> DossierState:
        match command:
            case PostalEvent():
                outbox.append(self._envelope(command))
            case Alert():
                _ALERTS(command.kind.value).inc()
                log.warning(
                    "postal_alert",
                    kind=command.kind.value,
                    dossier_id=command.dossier_id,
                    leg=command.leg.value if command.leg else None,
                    detail=command.detail[:200],
                )
            case Ignored():
                _IGNORED_BY_REASON[command.reason].inc()
            case BookOrder():
                return await self._book(state, command, outbox)
            case CancelOrder():
                await self._cancel(command)
            case QueryOrder():
                return await self._query(state, command, outbox)
        return state

    def _envelope(self, event: PostalEvent) -> Outgoing:
        envelope = make_event(
            event.type,
            source=SOURCE,
            id=event.event_id,
            subject=event.dossier_id,
            time=event.time,
            data=event.data(),
            trace=tracing.current_attributes(),  # the trace of the input being handled
        )
        _EVENTS(event.carrier or "none", event.status.value).inc()
        return (topics.POSTAL_EVENTS, envelope.key, envelope.to_json())

    async def _book(
        self, state: DossierState, order: BookOrder, outbox: list[Outgoing]
    ) -> DossierState:
        carrier = self.carriers.get(order.carrier)
        if carrier is None:
            log.error("no_carrier_client", carrier=order.carrier, dossier_id=order.dossier_id)
            return state
        try:
            clear = order if self.personal is None else await self.personal.clear_order(order)
        except (KeyErased, SealingError) as exc:
            reason = ERASED if isinstance(exc, KeyErased) else "personal_data_unreadable"
            ORDERS.labels(order.carrier, "create", reason).inc()
            log.warning("booking_impossible", dossier_id=order.dossier_id, reason=reason)
            failed = BookingFailed(order.dossier_id, order.leg, reason, now_utc())
            return await self._step(state, failed, outbox, now_utc())
        try:
            created = await carrier.create(clear)
        except CarrierRejected as exc:
            ORDERS.labels(order.carrier, "create", "rejected").inc()
            log.warning("booking_rejected", dossier_id=order.dossier_id, leg=order.leg.value)
            failed = BookingFailed(
                order.dossier_id, order.leg, f"rejected_by_carrier_{exc.reason}", now_utc()
            )
            return await self._step(state, failed, outbox, now_utc())
        except PartnerError as exc:
            # left unacknowledged: the scan re-sends it with the same order reference
            ORDERS.labels(order.carrier, "create", "error").inc()
            log.warning(
                "booking_failed_will_retry",
                dossier_id=order.dossier_id,
                leg=order.leg.value,
                error=str(exc)[:200],
            )
            return state
        ORDERS.labels(order.carrier, "create", "ok").inc()
        booked = OrderBooked(
            order.dossier_id, order.leg, order.carrier, created.order_id, max(created.at, now_utc())
        )
        return await self._step(state, booked, outbox, now_utc())

    async def _cancel(self, order: CancelOrder) -> None:
        carrier = self.carriers.get(order.carrier)
        if carrier is None:
            return
        try:
            await carrier.cancel(order)
        except (CarrierRejected, PartnerError) as exc:
            ORDERS.labels(order.carrier, "cancel", "error").inc()
            log.warning("cancel_failed", dossier_id=order.dossier_id, error=str(exc)[:200])
        else:
            ORDERS.labels(order.carrier, "cancel", "ok").inc()

    async def _query(
        self, state: DossierState, order: QueryOrder, outbox: list[Outgoing]
    ) -> DossierState:
        carrier = self.carriers.get(order.carrier)
        if carrier is None:
            return state
        try:
            callbacks = await carrier.query(order)
        except (CarrierRejected, PartnerError, MalformedCallback) as exc:
            ORDERS.labels(order.carrier, "query", "error").inc()
            log.warning("query_failed", dossier_id=order.dossier_id, error=str(exc)[:200])
            return state
        ORDERS.labels(order.carrier, "query", "ok").inc()
        for cb in callbacks:
            if cb.dossier_id == state.dossier_id:
                state = await self._step(state, cb, outbox, now_utc())
        return state


# --- the worker ---------------------------------------------------------------------------------


class PostalWorker:
    """The consuming side: batches of inputs into the states, and the scan's ticks."""

    def __init__(
        self,
        states: DossierStates,
        shell: PostalShell,
        ticks: DurablePublisher,
        postal: PostalSettings,
    ) -> None:
        self.states = states
        self.shell = shell
        self.ticks = ticks
        self.dossier_concurrency = postal.dossier_concurrency

    async def on_batch(self, inputs: Sequence[Event]) -> None:
        """Every dossier of the batch, a bounded number at once, then their `postal.*` events
        in one publish (the consumer writes the changed states once this returns, or rolls
        them back when it raises)."""
        outbox: list[Outgoing] = []

        async def handle_dossier(dossier_id: str, inputs: Sequence[Event]) -> None:
            state = await self.shell.handle(self.states.load(dossier_id), inputs, outbox)
            self.states.put(state)

        try:
            await for_each_dossier(
                inputs,
                lambda item: item.dossier_id,
                handle_dossier,
                concurrency=self.dossier_concurrency,
            )
            if outbox:
                await self.shell.publisher.publish(outbox)
        except BaseException:
            self.states.discard()
            raise
        self.states.settle()

    async def after_restore(self, assigned: frozenset[TopicPartition]) -> None:
        self.states.restored()
        log.info("postal_states_restored", dossiers=len(self.states), partitions=len(assigned))

    async def scan(self) -> None:
        """A `Tick` on `postal.callbacks` for every dossier with something due: a leg without
        news, a booking to re-send, or a story over whose grace has passed (the consumer
        applies the tick; the scan itself changes no state)."""
        now = now_utc()
        due = self.states.pop_due(now)
        if not due:
            return
        try:
            await self.ticks.publish(
                [
                    (topics.POSTAL_CALLBACKS, d.encode(), encode_tick(Tick(dossier_id=d, now=now)))
                    for d in due
                ]
            )
        except BaseException:
            self.states.due_again(due, now)
            raise
        log.info("postal_scan", due=len(due))
