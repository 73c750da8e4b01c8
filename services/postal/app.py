"""Postal: post-office pickup of dossiers, delivery of results, COD, carrier status webhooks.

The imperative shell around `domain.apply`. Inputs reach one dossier's state in a faust table
(keyed by dossier id, co-partitioned with `dossier.events` and `postal.callbacks`):

- `dossier.events` (submitted, resolved, withdrawn, rejected) → the dossier agent;
- carrier webhooks → verified on the raw bytes, deduplicated, written to `postal.callbacks`
  (acks=all), then answered; the callback agent applies them;
- the stale scan (a faust timer) writes a `Tick` to `postal.callbacks` for every dossier with
  something to do, so the table is only ever written from an agent.

One input is handled under the dossier's lock: load the state, apply, carry out the commands
(carrier calls feed their results back into `apply`), publish the `postal.*` events, and store
the state last. A crash anywhere before the store replays the input: bookings are idempotent by
order reference at the carrier and event ids are deterministic, so nothing happens twice.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson
import redis.asyncio as aioredis
from fastapi import Request
from fastapi.responses import JSONResponse
from prometheus_client import Counter
from redis.exceptions import RedisError

from services.common import topics
from services.common.claims import Claims
from services.common.coordination import Keys, connect
from services.common.events import CloudEvent, make_event
from services.common.kafka import BrokerUnavailable, DurablePublisher, ensure_topics
from services.common.logging import configure_logging, get_logger
from services.common.partner import PartnerError, RetryPolicy
from services.common.service import PoisonMessage, Service, create_service, run_service
from services.common.settings import Settings
from services.common.signing import SIGNATURE_HEADER, SignatureRejected, verify_body
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
    initial_state,
    needs_scan,
    state_from_json,
    state_to_json,
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


@dataclass
class _Locks:
    """One asyncio lock per dossier in flight, dropped when nobody holds or waits on it."""

    _locks: dict[str, tuple[asyncio.Lock, int]] = field(default_factory=dict)

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)


class PostalShell:
    """Carries out the core's decisions: carrier calls, events, alerts, the state table."""

    def __init__(
        self,
        service: Service,
        table: Any,
        carriers: dict[str, Carrier],
        config: PostalConfig,
        postal_settings: PostalSettings,
    ) -> None:
        self.service = service
        self.table = table
        self.carriers = carriers
        self.config = config
        self.postal_settings = postal_settings
        self._locks = _Locks()

    def load(self, dossier_id: str) -> DossierState:
        raw = self.table.get(dossier_id.encode())
        if raw is None:
            return initial_state(dossier_id)
        return state_from_json(orjson.loads(raw))

    async def handle(self, event: Event) -> None:
        """Apply one input and everything it leads to; store the state only at the end."""
        async with self._locks.hold(event.dossier_id):
            state = self.load(event.dossier_id)
            pending: list[Any] = []
            state = await self._step(state, event, pending)
            if pending:
                await asyncio.gather(*pending)  # every postal event acked before the store
            self.table[event.dossier_id.encode()] = orjson.dumps(state_to_json(state))

    async def _step(self, state: DossierState, event: Event, pending: list[Any]) -> DossierState:
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
            state = await self._execute(state, command, pending)
        return state

    async def _execute(
        self, state: DossierState, command: Command, pending: list[Any]
    ) -> DossierState:
        match command:
            case PostalEvent():
                pending.append(await self._publish(command))
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
                return await self._book(state, command, pending)
            case CancelOrder():
                await self._cancel(command)
            case QueryOrder():
                return await self._query(state, command, pending)
        return state

    async def _publish(self, event: PostalEvent) -> Any:
        envelope = make_event(
            event.type,
            source=SOURCE,
            id=event.event_id,
            subject=event.dossier_id,
            time=event.time,
            data=event.data(),
        )
        EVENTS.labels(event.carrier or "none", event.status.value).inc()
        return await self.service.topic(topics.POSTAL_EVENTS).send(
            key=envelope.key, value=envelope.to_json()
        )

    def _carrier(self, name: str) -> Carrier | None:
        return self.carriers.get(name)

    async def _book(
        self, state: DossierState, order: BookOrder, pending: list[Any]
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
            return await self._step(state, failed, pending)
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
        return await self._step(state, booked, pending)

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
        self, state: DossierState, order: QueryOrder, pending: list[Any]
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
                state = await self._step(state, cb, pending)
        return state

    def due_for_scan(self, now: datetime) -> Iterable[str]:
        policy, rebook_after = self.config.stale, self.postal_settings.rebook_after
        for key, raw in list(self.table.items()):
            try:
                state = state_from_json(orjson.loads(raw))
            except Exception:  # a state we cannot read is not the scan's to fix
                log.warning("unreadable_state", dossier_id=bytes(key).decode(errors="replace"))
                continue
            if needs_scan(state, now, policy, rebook_after):
                yield state.dossier_id


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


def build(settings: Settings, postal: PostalSettings | None = None) -> Service:
    """The postal worker and its HTTP app."""
    postal = postal or PostalSettings()
    config = postal.config()
    service = create_service("postal", settings, title="motcua postal")
    # many webhook requests await their acks at once: a few ms of linger batches them together
    service.app.conf.producer_linger = postal.producer_linger_seconds
    # bytes key and value types make faust use the raw codec, on writes and in recovery alike
    # (it refuses `key_serializer=`, and a Schema's serializers are not used in recovery);
    # use_partitioner: the changelog partition is the key's, as on the input topics
    table = service.app.Table(
        "postal_state",
        partitions=settings.topic_partitions,
        key_type=bytes,
        value_type=bytes,
        use_partitioner=True,
    )
    carriers = make_carriers(settings, postal)
    shell = PostalShell(service, table, carriers, config, postal)
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

    limit = asyncio.Semaphore(postal.dossier_concurrency)

    async def one_dossier(inputs: list[Event]) -> None:
        async with limit:
            for item in inputs:  # one dossier's events stay in order
                await shell.handle(item)

    async def on_dossier_events(events: Sequence[CloudEvent[Any]]) -> None:
        # a poison event fails the batch at once; the factory then goes one event at a time
        by_dossier: dict[str, list[Event]] = {}
        for event in events:
            item = dossier_input(event)
            by_dossier.setdefault(item.dossier_id, []).append(item)
        await asyncio.gather(*(one_dossier(items) for items in by_dossier.values()))

    async def on_internal(key: bytes | None, value: bytes) -> None:
        try:
            message = decode(value)
        except BadMessage as exc:
            raise PoisonMessage(str(exc)) from None
        await shell.handle(message)

    service.consume_batches(
        topics.DOSSIER_EVENTS, on_dossier_events, types=DOSSIER_TYPES, max_batch=200, within=0.05
    )
    service.consume_raw(topics.POSTAL_CALLBACKS, on_internal)

    @service.app.timer(postal.scan_interval_seconds)  # type: ignore[untyped-decorator]
    async def stale_scan() -> None:
        app = service.app
        if app.rebalancing or app.in_recovery:
            return
        now = now_utc()
        due = list(shell.due_for_scan(now))
        for dossier_id in due:
            tick = Tick(dossier_id=dossier_id, now=now)
            await service.send(topics.POSTAL_CALLBACKS, dossier_id.encode(), encode_tick(tick))
        if due:
            log.info("stale_scan", due=len(due))

    claims_holder: dict[str, Claims] = {}
    # Webhook writes go straight through aiokafka (acks=all): faust's producer path costs more
    # per message, and a callback answered 200 must already be on the log.
    callbacks = DurablePublisher(settings.kafka_bootstrap)

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


__all__: Sequence[str] = ("PostalShell", "build", "dossier_input", "run")
