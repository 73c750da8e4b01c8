"""The postal consumer: its inputs applied to the dossiers' states, and the decisions carried out.

One batch consumer (`Service.consume`, group `motcua-postal`) reads both inputs of a dossier's
state, keyed by dossier id and co-partitioned, so a member holds whole dossiers:

- `dossier.events`: submitted, resolved, withdrawn, rejected (the other types are skipped before
  validation);
- `postal.callbacks` (ours, not CloudEvents, see `messages.py`): the carrier callbacks the
  webhook wrote, and the `Tick`s of the stale scan, so states change only in the consumer.

A batch is grouped by dossier; dossiers are handled concurrently (`dossier_concurrency`), one
dossier's inputs in order: load the state, `domain.apply`, carry out the commands
(`PostalShell`: carrier calls feed their results back into `apply`), publish the `postal.*`
events (acks=all), and keep the state in the `StateTable`. The consumer writes the changed
states to `topics.POSTAL_STATE_CHANGELOG` after the handler and only then commits. A crash
anywhere before that replays the inputs: bookings are idempotent by order reference at the
carrier and event ids are deterministic, so nothing happens twice.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from aiokafka.structs import ConsumerRecord, TopicPartition
from prometheus_client import Counter

from services.common import topics
from services.common.consumer import Decoder, event_decoder, for_each_dossier
from services.common.dead_letters import PoisonMessage
from services.common.events import CloudEvent, make_event
from services.common.kafka import DurablePublisher
from services.common.logging import get_logger
from services.common.partner import PartnerError
from services.common.state import StateTable
from services.postal.callback_bodies import MalformedCallback
from services.postal.commands import (
    Alert,
    BookOrder,
    CancelOrder,
    Command,
    Ignored,
    PostalEvent,
    QueryOrder,
)
from services.postal.domain import PostalConfig, apply
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
from services.postal.settings import PostalSettings
from services.postal.shipments import DossierState, initial_state
from services.postal.stale import (
    StalePolicy,
    due_rebookings,
    needs_scan,
    unacknowledged_bookings,
    watched,
)

log = get_logger("motcua.postal")

SOURCE = "motcua/postal"
DOSSIER_TYPES = frozenset(
    {"dossier.submitted", "dossier.resolved", "dossier.withdrawn", "dossier.rejected"}
)
# The scan decodes states between yields to the loop (heartbeats, webhooks) in chunks this big.
SCAN_CHUNK = 2000

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


def now_utc() -> datetime:
    return datetime.now(UTC)


# --- the consumer's inputs ------------------------------------------------------------------------


def dossier_input(event: CloudEvent[Any]) -> Event:
    """A `dossier.*` envelope as the core's input; a value the core refuses is poison."""
    data = event.data.model_dump(mode="json")
    try:
        match event.type:
            case "dossier.submitted":
                return DossierSubmitted.from_data(data)
            case "dossier.resolved":
                return DossierResolved.from_data(data)
            case "dossier.withdrawn":
                return DossierWithdrawn.from_data(data)
            case "dossier.rejected":
                return DossierRejected.from_data(data)
    except (KeyError, TypeError, ValueError) as exc:
        raise PoisonMessage(f"{type(exc).__name__}: {exc}"[:300]) from None
    raise PoisonMessage(f"unexpected type {event.type}")


_dossier_envelope: Decoder[CloudEvent[Any]] = event_decoder(DOSSIER_TYPES)


def decode_input(record: ConsumerRecord) -> Event | None:
    """A record of either input as the core's input; None for the dossier events postal has no
    business with. What can never be applied raises `PoisonMessage` (dead-lettered at once)."""
    if record.topic == topics.POSTAL_CALLBACKS:
        try:
            return decode(record.value or b"")
        except BadMessage as exc:
            raise PoisonMessage(str(exc)) from exc
    envelope = _dossier_envelope(record)
    return None if envelope is None else dossier_input(envelope)


# --- the states ---------------------------------------------------------------------------------


class DossierStates:
    """The worker's `StateTable` of dossier states, and the dossiers the stale scan watches:
    every restored one until a scan decoded it, and every one kept with an open leg since (most
    dossiers never have one, or no longer)."""

    def __init__(self, table: StateTable[DossierState]) -> None:
        self.table = table
        self.watched: set[str] = set()

    def __len__(self) -> int:
        return len(self.table)

    def load(self, dossier_id: str) -> DossierState:
        state = self.table.get(dossier_id)
        return initial_state(dossier_id) if state is None else state

    def put(self, state: DossierState) -> bool:
        """Keep `state`; False (nothing to write) when it is unchanged, or the initial state of
        a dossier postal never planned for (a callback or tick about a stranger)."""
        dossier_id = state.dossier_id
        if self.table.raw(dossier_id) is None and state == initial_state(dossier_id):
            return False
        if not self.table.put(dossier_id, state):
            return False
        if watched(state):
            self.watched.add(dossier_id)
        else:
            self.watched.discard(dossier_id)
        return True

    def restored(self) -> None:
        """After the table was restored: watch every dossier until a scan looked at it."""
        self.watched = set(self.table)

    async def due_for_scan(
        self, now: datetime, policy: StalePolicy, rebook_after: timedelta
    ) -> list[str]:
        """The watched dossiers a `Tick` at `now` would move; forgets those with no open leg."""
        due: list[str] = []
        for count, dossier_id in enumerate(list(self.watched), start=1):
            if count % SCAN_CHUNK == 0:
                await asyncio.sleep(0)
            raw = self.table.raw(dossier_id)
            if raw is None:  # revoked meanwhile
                self.watched.discard(dossier_id)
                continue
            try:
                state = self.table.decode(dossier_id, raw)
            except Exception:  # a state we cannot read is not the scan's to fix
                log.warning("unreadable_state", dossier_id=dossier_id)
                self.watched.discard(dossier_id)
                continue
            if not watched(state):
                self.watched.discard(dossier_id)
            elif needs_scan(state, now, policy, rebook_after):
                due.append(dossier_id)
        return due


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
    ) -> None:
        self.publisher = publisher
        self.carriers = carriers
        self.config = config
        self.rebook_after = rebook_after

    async def handle(self, state: DossierState, inputs: Sequence[Event]) -> DossierState:
        """Apply one dossier's inputs in order and everything they lead to; return the next
        state once every `postal.*` event is acknowledged (the caller keeps it after that)."""
        outbox: list[Outgoing] = []
        for event in inputs:
            state = await self._step(state, event, outbox)
        if outbox:
            await self.publisher.publish(outbox)
        return state

    async def _step(
        self, state: DossierState, event: Event, outbox: list[Outgoing]
    ) -> DossierState:
        decision = apply(state, event, self.config)
        state = decision.state
        commands: list[Command] = list(decision.commands)
        if isinstance(event, CarrierCallback):
            CARRIER_CODES.labels(event.carrier, event.code[:8]).inc()
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
                ALERTS.labels(command.kind.value).inc()
                log.warning(
                    "postal_alert",
                    kind=command.kind.value,
                    dossier_id=command.dossier_id,
                    leg=command.leg.value if command.leg else None,
                    detail=command.detail[:200],
                )
            case Ignored():
                IGNORED.labels(command.reason.value).inc()
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
        )
        EVENTS.labels(event.carrier or "none", event.status.value).inc()
        return (topics.POSTAL_EVENTS, envelope.key, envelope.to_json())

    async def _book(
        self, state: DossierState, order: BookOrder, outbox: list[Outgoing]
    ) -> DossierState:
        carrier = self.carriers.get(order.carrier)
        if carrier is None:
            log.error("no_carrier_client", carrier=order.carrier, dossier_id=order.dossier_id)
            return state
        try:
            created = await carrier.create(order)
        except CarrierRejected as exc:
            ORDERS.labels(order.carrier, "create", "rejected").inc()
            log.warning("booking_rejected", dossier_id=order.dossier_id, leg=order.leg.value)
            failed = BookingFailed(
                order.dossier_id, order.leg, f"rejected_by_carrier_{exc.reason}", now_utc()
            )
            return await self._step(state, failed, outbox)
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
        return await self._step(state, booked, outbox)

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
                state = await self._step(state, cb, outbox)
        return state


# --- the worker ---------------------------------------------------------------------------------


class PostalWorker:
    """The consuming side: batches of inputs into the states, and the stale scan's ticks."""

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
        self.stale = postal.config().stale
        self.rebook_after = postal.rebook_after
        self.dossier_concurrency = postal.dossier_concurrency

    async def on_batch(self, inputs: Sequence[Event]) -> None:
        """Every dossier of the batch, a bounded number at once (the consumer writes the
        changed states once this returns)."""
        await for_each_dossier(
            inputs,
            lambda item: item.dossier_id,
            self._handle_dossier,
            concurrency=self.dossier_concurrency,
        )

    async def _handle_dossier(self, dossier_id: str, inputs: Sequence[Event]) -> None:
        state = await self.shell.handle(self.states.load(dossier_id), inputs)
        self.states.put(state)

    async def after_restore(self, assigned: frozenset[TopicPartition]) -> None:
        self.states.restored()
        log.info("postal_states_restored", dossiers=len(self.states), partitions=len(assigned))

    async def scan(self) -> None:
        """A `Tick` on `postal.callbacks` for every dossier with something to do."""
        now = now_utc()
        due = await self.states.due_for_scan(now, self.stale, self.rebook_after)
        if not due:
            return
        await self.ticks.publish(
            [
                (topics.POSTAL_CALLBACKS, d.encode(), encode_tick(Tick(dossier_id=d, now=now)))
                for d in due
            ]
        )
        log.info("stale_scan", due=len(due))
