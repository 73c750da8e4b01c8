"""Postal: post-office pickup of dossiers, delivery of results, COD, carrier status webhooks.

The imperative shell around `domain.apply`. One plain aiokafka consumer (`BatchConsumer`, group
`motcua-postal`) reads both inputs of a dossier's state, keyed by dossier id and co-partitioned,
so a member holds whole dossiers:

- `dossier.events`: submitted, resolved, withdrawn, rejected (the other types are skipped before
  validation);
- `postal.callbacks` (ours, not CloudEvents): carrier webhooks, verified on the raw bytes,
  deduplicated and written there (acks=all) before the 200; and the `Tick`s of the stale scan
  (a faust timer over the in-memory states), so states change only in the consumer.

A batch is grouped by dossier; dossiers are handled concurrently (`dossier_concurrency`), one
dossier's inputs in order: load the state, apply, carry out the commands (carrier calls feed
their results back into `apply`), publish the `postal.*` events (acks=all), and keep the state.
The changed states are written to the service's own changelog (`states.PostalStates`) last,
before the offsets are committed. A crash anywhere before that replays the inputs: bookings are
idempotent by order reference at the carrier and event ids are deterministic, so nothing
happens twice.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from contextlib import suppress
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from aiokafka.structs import ConsumerRecord, TopicPartition
from fastapi import Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from redis.exceptions import RedisError

from services.common import topics
from services.common.batches import INFRASTRUCTURE_ERRORS, BatchConsumer, Decoder, event_decoder
from services.common.changelog import Changelog
from services.common.claims import Claims
from services.common.coordination import Keys, connect
from services.common.events import CloudEvent, make_event
from services.common.kafka import BrokerUnavailable, DurablePublisher, ensure_topics
from services.common.logging import configure_logging, get_logger
from services.common.partner import PartnerError, RetryPolicy
from services.common.service import PoisonMessage, Service, create_service, run_service
from services.common.settings import Settings
from services.common.signing import SIGNATURE_HEADER, SignatureRejected, verify_body
from services.common.topics import TopicSpec
from services.postal.domain import (
    Alert,
    BookingFailed,
    BookOrder,
    CancelOrder,
    CarrierCallback,
    Command,
    DossierRejected,
    DossierResolved,
    DossierState,
    DossierSubmitted,
    DossierWithdrawn,
    Event,
    Ignored,
    OrderBooked,
    PostalConfig,
    PostalEvent,
    QueryOrder,
    Tick,
    apply,
    unacknowledged_bookings,
)
from services.postal.messages import BadMessage, decode, encode_callback, encode_tick
from services.postal.partner import (
    Carrier,
    CarrierRejected,
    MalformedCallback,
    VNPostClient,
    parse_callback,
)
from services.postal.settings import PostalSettings
from services.postal.states import PostalStates

log = get_logger("motcua.postal")

SOURCE = "motcua/postal"
DOSSIER_TYPES = frozenset(
    {"dossier.submitted", "dossier.resolved", "dossier.withdrawn", "dossier.rejected"}
)
MAX_CALLBACK_BYTES = 64 * 1024

CALLBACKS = Counter(
    "motcua_postal_callbacks_total", "Carrier webhook calls by outcome", ["carrier", "outcome"]
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


def now_utc() -> datetime:
    return datetime.now(UTC)


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


def callback_dedupe_id(cb: CarrierCallback) -> str:
    """(carrier, order, status, carrier time) as one short id; equal instants, equal ids."""
    instant = cb.carrier_time.astimezone(UTC).isoformat()
    text = f"{cb.carrier}\x00{cb.order_id}\x00{cb.code}\x00{instant}"
    return hashlib.sha256(text.encode()).hexdigest()[:40]


# (topic, key, value) of a `postal.*` event, sent once the dossier's inputs of a batch are applied
Outgoing = tuple[str, bytes, bytes]


class PostalShell:
    """Carries out the core's decisions: carrier calls, events, alerts. Holds no state."""

    def __init__(
        self,
        publisher: DurablePublisher,
        carriers: dict[str, Carrier],
        config: PostalConfig,
        postal_settings: PostalSettings,
    ) -> None:
        self.publisher = publisher
        self.carriers = carriers
        self.config = config
        self.postal_settings = postal_settings

    async def handle(self, state: DossierState, inputs: Sequence[Event]) -> DossierState:
        """Apply one dossier's inputs in order and everything they lead to; return the next
        state once every `postal.*` event is acknowledged (the caller stores it after that)."""
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
            stale_for = event.now - self.postal_settings.rebook_after
            commands.extend(
                b
                for b in unacknowledged_bookings(state)
                if (sh := state.shipment(b.leg)) is not None and sh.last_update_at <= stale_for
            )
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

    def _carrier(self, name: str) -> Carrier | None:
        return self.carriers.get(name)

    async def _book(
        self, state: DossierState, order: BookOrder, outbox: list[Outgoing]
    ) -> DossierState:
        carrier = self._carrier(order.carrier)
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
        carrier = self._carrier(order.carrier)
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
        carrier = self._carrier(order.carrier)
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


def make_carriers(settings: Settings, postal: PostalSettings) -> dict[str, Carrier]:
    retry = RetryPolicy(
        attempts=postal.carrier_attempts, base_delay=postal.carrier_retry_base_seconds
    )
    vnpost = VNPostClient(
        settings.vnpost_url,
        postal.vnpost_client_id,
        postal.vnpost_client_secret,
        timeout=postal.carrier_timeout_seconds,
        retry=retry,
    )
    return {vnpost.name: vnpost}


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


class PostalWorker:
    """The consuming side: batches of inputs into the states, their changelog, the stale scan."""

    def __init__(
        self,
        service: Service,
        carriers: dict[str, Carrier],
        postal: PostalSettings,
        ticks: DurablePublisher,
    ) -> None:
        settings = service.settings
        self.postal = postal
        self.config = postal.config()
        # the consumer's dead letters, the postal.* events and the changelog share one producer
        publisher = DurablePublisher(settings.kafka_bootstrap)
        self.shell = PostalShell(publisher, carriers, self.config, postal)
        self.states = PostalStates(
            Changelog(
                settings.kafka_bootstrap,
                TopicSpec(topics.POSTAL_STATE_CHANGELOG, settings.topic_partitions, compacted=True),
                publisher,
                replication=settings.topic_replication,
            )
        )
        self.ticks = ticks
        self.consumer: BatchConsumer[Event] = BatchConsumer(
            service,
            (topics.DOSSIER_EVENTS, topics.POSTAL_CALLBACKS),
            self.on_batch,
            decode=decode_input,
            restore=self.restore,
            max_records=postal.max_batch,
            poll_seconds=postal.batch_within_seconds,
            publisher=publisher,
        )

    async def on_batch(self, inputs: Sequence[Event]) -> None:
        """Every dossier of the batch, a bounded number at once; then the changed states."""
        by_dossier: dict[str, list[Event]] = {}
        for item in inputs:
            by_dossier.setdefault(item.dossier_id, []).append(item)
        pending = iter(by_dossier.items())
        errors: list[Exception] = []

        async def work_through() -> None:
            for dossier_id, items in pending:  # the workers share the iterator
                try:
                    await self._handle_dossier(dossier_id, items)
                except Exception as exc:  # the other dossiers go on: less to redo on retry
                    errors.append(exc)

        workers = min(self.postal.dossier_concurrency, len(by_dossier))
        await asyncio.gather(*(work_through() for _ in range(workers)))
        if errors:
            # the consumer retries the batch, then one input at a time; a broker error instead
            # starts it again from the committed offsets
            infrastructure = [e for e in errors if isinstance(e, INFRASTRUCTURE_ERRORS)]
            raise (infrastructure or errors)[0]
        await self.states.save()

    async def _handle_dossier(self, dossier_id: str, inputs: Sequence[Event]) -> None:
        state = await self.shell.handle(self.states.load(dossier_id), inputs)
        self.states.put(state)

    async def restore(self, assigned: frozenset[TopicPartition]) -> None:
        await self.states.restore({tp.partition for tp in assigned})
        log.info("postal_states_restored", dossiers=len(self.states))

    async def scan(self) -> None:
        """A `Tick` on `postal.callbacks` for every dossier with something to do."""
        if not self.consumer.ready:  # states being restored: the next scan looks
            return
        now = now_utc()
        due = await self.states.due_for_scan(now, self.config.stale, self.postal.rebook_after)
        if not due:
            return
        try:
            await self.ticks.publish(
                [
                    (topics.POSTAL_CALLBACKS, d.encode(), encode_tick(Tick(dossier_id=d, now=now)))
                    for d in due
                ]
            )
        except Exception as exc:  # the broker away for a moment: the next scan finds them again
            log.warning("stale_scan_failed", due=len(due), error=str(exc)[:200])
            return
        log.info("stale_scan", due=len(due))


def build(settings: Settings, postal: PostalSettings | None = None) -> Service:
    """The postal worker and its HTTP app."""
    postal = postal or PostalSettings()
    service = create_service("postal", settings, title="motcua postal")
    # Webhook callbacks and scan ticks go to postal.callbacks straight through aiokafka
    # (acks=all): a callback answered 200 must already be on the log.
    callbacks = DurablePublisher(settings.kafka_bootstrap)
    worker = PostalWorker(service, make_carriers(settings, postal), postal, callbacks)
    worker.consumer.attach()
    service.app.timer(postal.scan_interval_seconds)(worker.scan)
    secrets = {"vnpost": list(settings.vnpost_secrets)}
    keys = Keys(settings.redis_namespace)
    redis_holder: dict[str, aioredis.Redis] = {}

    def redis() -> aioredis.Redis:
        if "client" not in redis_holder:
            redis_holder["client"] = connect(settings)
        return redis_holder["client"]

    async def redis_reachable() -> bool:
        try:
            return bool(await redis().ping())
        except (RedisError, OSError):
            return False

    service.add_ready_check(redis_reachable)

    claims_holder: dict[str, Claims] = {}

    def claims() -> Claims:
        if "claims" not in claims_holder:
            claims_holder["claims"] = Claims(redis(), postal.callback_dedupe_ttl_seconds)
        return claims_holder["claims"]

    @service.app.on_before_shutdown.connect
    async def close_publisher(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
        await callbacks.close()

    async def webhook(request: Request) -> JSONResponse:
        """A carrier's status callback (CONTRACT section 6): durable in Kafka before the 200."""
        carrier = request.path_params["carrier"]
        active = secrets.get(carrier)
        if active is None:
            CALLBACKS.labels("unknown", "unknown_carrier").inc()
            return JSONResponse({"status": "rejected", "reason": "unknown carrier"}, 404)
        body = await request.body()
        if len(body) > MAX_CALLBACK_BYTES:
            CALLBACKS.labels(carrier, "too_large").inc()
            return JSONResponse({"status": "rejected", "reason": "body too large"}, 413)
        try:
            verify_body(
                body,
                request.headers.get(SIGNATURE_HEADER),
                active,
                tolerance_seconds=settings.webhook_tolerance_seconds,
            )
        except SignatureRejected as exc:
            CALLBACKS.labels(carrier, "unauthorized").inc()
            return JSONResponse({"status": "rejected", "reason": exc.reason}, 401)
        try:
            cb = parse_callback(carrier, body)
        except MalformedCallback as exc:
            CALLBACKS.labels(carrier, "malformed").inc()
            return JSONResponse({"status": "rejected", "reason": str(exc)}, 422)
        dedupe_key = keys("postal", "cb", callback_dedupe_id(cb))
        try:
            claimed = (await claims().claim(dedupe_key)).claimed
        except (RedisError, OSError):
            claimed = True  # the dossier state dedupes too: accepting twice costs nothing
        if not claimed:
            CALLBACKS.labels(carrier, "duplicate").inc()
            return JSONResponse({"status": "duplicate"})
        try:
            await callbacks.publish(
                [(topics.POSTAL_CALLBACKS, cb.dossier_id.encode(), encode_callback(cb))]
            )
        except BrokerUnavailable as exc:
            CALLBACKS.labels(carrier, "unavailable").inc()
            log.warning("callback_not_durable", error=str(exc))
            with suppress(RedisError, OSError):
                await claims().release(dedupe_key)  # the carrier's retry must get through
            return JSONResponse({"status": "unavailable"}, 503)
        CALLBACKS.labels(carrier, "accepted").inc()
        return JSONResponse({"status": "accepted"})

    # A plain Starlette route: the webhook reads the raw body itself, and FastAPI's parameter
    # solving was a tenth of its cost.
    service.api.add_route("/v1/webhooks/postal/{carrier}", webhook, methods=["POST"])

    return service


def run(settings: Settings) -> None:
    configure_logging(settings.log_level, settings.log_json)
    asyncio.run(
        ensure_topics(
            settings.kafka_bootstrap,
            topics.declared_topics(settings.topic_partitions),
            settings.topic_replication,
        )
    )
    run_service(build(settings), settings.postal_port)


__all__: Sequence[str] = (
    "PostalShell",
    "PostalWorker",
    "build",
    "decode_input",
    "dossier_input",
    "run",
)
