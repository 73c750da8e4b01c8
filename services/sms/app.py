"""The SMS service: faust agents and FastAPI routes around the pure core. Thin on purpose.

Agents (all topics keyed by dossier id, co-partitioned with the `sms-dossiers` table):
- `dossier.events`, `payment.events`, `postal.events`: `decisions.apply` → `outbox.plan`; the
  table keeps the new state and the pending messages, then the sender is handed what is due.
- `sms.callbacks`: verified delivery reports (→ `sms.delivered` / `sms.failed`), `tick`
  wake-ups for overdue apologies (`decisions.tick`), and `settle` batches from the sender (the
  messages it got accepted or gave up on leave `pending`; one batch per partition, so the table
  is written from the partition that holds those dossiers).
A timer sends deferred messages when quiet hours end, and rescans the table after a restart so
nothing pending is forgotten; the Redis claim makes a second attempt harmless.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka.partitioner import murmur2
from fastapi import Request
from fastapi.responses import JSONResponse
from faust.streams import current_event
from pydantic import AwareDatetime, BaseModel, Field, ValidationError

from services.common import topics
from services.common.coordination import Keys, connect
from services.common.events import CloudEvent, make_event
from services.common.logging import get_logger
from services.common.service import (
    PoisonMessage,
    Service,
    create_service,
    dead_letter_headers,
    run_service,
)
from services.common.settings import Settings
from services.common.signing import SIGNATURE_HEADER, SignatureRejected, verify_body
from services.sms.decisions import (
    Decision,
    DossierState,
    InvalidEventError,
    SmsIntent,
    apply,
    event_from_envelope,
    next_wakeup,
    tick,
)
from services.sms.delivery import (
    DeliveryStatus,
    UnknownProviderStatusError,
    map_provider_status,
    sms_event_type,
)
from services.sms.outbox import (
    SMS_SOURCE,
    Pending,
    Plan,
    SmsRecord,
    decode_record,
    encode_record,
    plan,
    settle,
)
from services.sms.partner import SmsGateway
from services.sms.sender import (
    DELIVERED,
    FAILED,
    SUPPRESSED,
    Sender,
    Settled,
    SmsNotSent,
    sms_event,
)
from services.sms.settings import PROVIDERS, SmsSettings
from services.sms.templates import load_templates

log = get_logger("motcua.sms")

# A record with all of these has nothing pending and no wake-up: the rescan skips decoding it.
_IDLE_MARKS = (b'"pending":{}', b'"pending_overdue":null', b'"awaiting_contact":[]')

INPUT_TOPICS = (topics.DOSSIER_EVENTS, topics.PAYMENT_EVENTS, topics.POSTAL_EVENTS)


class DeliveryReport(BaseModel):
    event_id: str = Field(min_length=1, max_length=200)
    message_id: str = Field(default="", max_length=200)
    reference: str = Field(min_length=1, max_length=200)
    dossier_id: str = Field(min_length=1, max_length=200)
    status: str = Field(min_length=1, max_length=40)
    occurred_at: AwareDatetime | None = None


class SmsApp:
    """The wiring: one instance per worker process."""

    def __init__(self, settings: Settings, sms: SmsSettings) -> None:
        self.settings = settings
        self.sms = sms
        self.service: Service = create_service("sms", settings, title="motcua sms")
        self.templates = load_templates()
        self.redis = connect(settings)
        self.keys = Keys(settings.redis_namespace)
        self.table = self.service.app.Table(
            "sms-dossiers",
            partitions=settings.topic_partitions,
            key_type=bytes,
            value_type=bytes,  # bytes key and value types make faust use the raw codec
        )
        urls = {"primary": settings.sms_primary_url, "secondary": settings.sms_secondary_url}
        gateways = {
            name: SmsGateway(name, urls[name], timeout=sms.request_timeout_seconds)
            for name in PROVIDERS
            if name in sms.weights
        }
        self.sender = Sender(
            sms,
            self.redis,
            self.keys,
            gateways,
            self.publish_many,
            self.dead_letter_pending,
            self.settle_many,
        )
        self.deferred: dict[str, Pending] = {}  # due later (quiet hours), by key
        self.wakeups: dict[str, datetime] = {}  # when a dossier needs a tick
        self._last_rescan = 0.0

    # --- the table -----------------------------------------------------------------------

    def load(self, dossier_id: str) -> SmsRecord | None:
        raw = self.table.get(dossier_id.encode())
        return None if raw is None else decode_record(raw)

    def save(self, record: SmsRecord) -> None:
        self.table[record.state.dossier_id.encode()] = encode_record(record)

    # --- producing -----------------------------------------------------------------------

    async def publish(self, event: CloudEvent[Any]) -> None:
        await self.service.publish(event)

    async def publish_many(self, events: Sequence[CloudEvent[Any]]) -> None:
        """Hand every event to the producer first, then wait for all the acks at once."""
        futures = []
        for event in events:
            topic = self.service.topic(event.topic)
            futures.append(await topic.send(key=event.key, value=event.to_json()))
        await asyncio.gather(*futures)

    async def settle_many(self, news: Sequence[Settled]) -> None:
        """The sender's news, one `settle` callback per partition of the dossiers concerned.

        Keyed by one of its dossiers, the batch lands on their partition (the producer's default
        partitioner, the one that placed their events), so the agent writes their records there.
        """
        partitions = self.settings.topic_partitions
        by_partition: dict[int, list[dict[str, Any]]] = {}
        keys: dict[int, bytes] = {}
        for item in news:
            key = item.message.dossier_id.encode()
            partition = dossier_partition(key, partitions)
            keys.setdefault(partition, key)
            by_partition.setdefault(partition, []).append(
                {
                    "dossier_id": item.message.dossier_id,
                    "key": item.message.key,
                    "template": item.message.template,
                    "segments": item.message.segments,
                    "provider": item.provider,
                    "status": item.status.value,
                }
            )
        topic = self.service.topic(topics.SMS_CALLBACKS)
        futures = [
            await topic.send(
                key=keys[partition], value=orjson.dumps({"kind": "settle", "items": items})
            )
            for partition, items in by_partition.items()
        ]
        await asyncio.gather(*futures)

    async def dead_letter_pending(self, message: Pending, reason: str, attempts: int) -> None:
        dlq = self.service.topic(topics.dlq(message.source_topic))
        future = await dlq.send(
            key=message.dossier_id.encode(),
            value=message.origin.encode(),
            headers=dead_letter_headers(SmsNotSent(reason), attempts),
        )
        await future

    async def dead_letter_intent(self, intent: SmsIntent, reason: str) -> None:
        prefix = intent.template.split("_", 1)[0]
        topic = {"payment": topics.PAYMENT_EVENTS, "postal": topics.POSTAL_EVENTS}.get(
            prefix, topics.DOSSIER_EVENTS
        )
        body = {
            "source": intent.source,
            "id": intent.event_id,
            "dossier_id": intent.dossier_id,
            "template": intent.template,
        }
        future = await self.service.topic(topics.dlq(topic)).send(
            key=intent.dossier_id.encode(),
            value=orjson.dumps(body),
            headers=dead_letter_headers(SmsNotSent(reason), 1),
        )
        await future

    # --- agents --------------------------------------------------------------------------

    async def on_input(self, topic: str, event: CloudEvent[Any]) -> None:
        current = current_event()
        raw = current.value if current is not None else None
        origin = bytes(raw).decode() if isinstance(raw, bytes | bytearray) else ""
        try:
            core_event = event_from_envelope(event.to_dict())
            dossier_id = core_event.dossier_id
            record = self.load(dossier_id)
            decision = apply(record.state if record else None, core_event, self.sms.policy)
        except InvalidEventError as exc:
            raise PoisonMessage(str(exc)) from exc
        if record is not None and decision.state == record.state and not decision.outgoing:
            return  # nothing this service cares about
        origin = origin or event.to_json().decode()
        await self.carry_out(record, decision, topic, origin, event_id=event.id)

    async def carry_out(
        self,
        record: SmsRecord | None,
        decision: Decision,
        topic: str,
        origin: str,
        *,
        event_id: str | None = None,
    ) -> None:
        now = datetime.now(UTC)
        result: Plan = plan(
            record,
            decision,
            templates=self.templates,
            opted_out=self.sms.opt_out,
            quiet=self.sms.quiet_hours,
            now=now,
            source_topic=topic,
            origin=origin,
        )
        self.save(result.record)  # no await between load and save: one writer per dossier
        self._schedule_wakeup(result.record)
        events: list[CloudEvent[Any]] = []
        for suppressed in result.suppressed:
            SUPPRESSED.labels(suppressed.intent.template, suppressed.reason).inc()
            events.append(_intent_event("sms.suppressed", suppressed.intent, suppressed.reason))
        for intent, reason in result.unrenderable:
            FAILED.labels(intent.template, "none", "render").inc()
            events.append(_intent_event("sms.failed", intent, reason))
        for message in result.queued:
            if message.not_before > now:  # only a message that waits is announced as queued
                events.append(
                    sms_event(
                        "sms.queued",
                        message,
                        suffix="queued",
                        now=now,
                        not_before=message.not_before.isoformat(),
                        reason="quiet_hours",
                    )
                )
        for event in events:
            await self.service.publish(event, wait=False)
        for message in result.queued:
            if message.not_before > now:
                self.deferred[message.key] = message
            else:
                await self.sender.submit(message)
        poison = []
        for intent, reason in result.unrenderable:
            if intent.event_id == event_id:
                poison.append(reason)
            else:  # decided earlier (waiting for the phone number): dead-letter that intent
                await self.dead_letter_intent(intent, reason)
        if poison:
            raise PoisonMessage("; ".join(poison))  # this event goes to its topic's DLQ

    async def on_settle(self, items: list[dict[str, Any]]) -> None:
        """Messages the sender got accepted or gave up on: no longer pending."""
        for item in items:
            key = str(item["key"])
            self.deferred.pop(key, None)
            record = self.load(str(item["dossier_id"]))
            if record is None:
                continue
            new, _ = settle(
                record,
                key,
                template=str(item.get("template") or ""),
                segments=int(item.get("segments") or 0),
                provider=item.get("provider"),
                status=DeliveryStatus(item["status"]),
            )
            self.save(new)

    async def on_callback(self, key: bytes | None, value: bytes) -> None:
        try:
            message = orjson.loads(value)
            kind = message["kind"]
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise PoisonMessage(f"not a callback: {exc}") from exc
        if kind == "tick":
            await self.on_tick(str(message["dossier_id"]))
        elif kind == "settle":
            await self.on_settle(message["items"])
        elif kind == "report":
            await self.on_report(message)
        else:
            raise PoisonMessage(f"unknown callback kind {kind!r}")

    async def on_tick(self, dossier_id: str) -> None:
        record = self.load(dossier_id)
        if record is None:
            return
        decision = tick(record.state, datetime.now(UTC), self.sms.policy)
        origin = orjson.dumps({"kind": "tick", "dossier_id": dossier_id}).decode()
        await self.carry_out(record, decision, topics.DOSSIER_EVENTS, origin)

    async def on_report(self, message: dict[str, Any]) -> None:
        try:
            report = DeliveryReport.model_validate(message)
            status = map_provider_status(report.status)
        except (ValidationError, UnknownProviderStatusError) as exc:
            raise PoisonMessage(str(exc)) from exc
        provider = str(message.get("provider") or "")
        record = self.load(report.dossier_id) or SmsRecord(
            state=DossierState(dossier_id=report.dossier_id)
        )
        before = record.sent.get(report.reference)
        new, moved = settle(
            record,
            report.reference,
            template=before.template if before else "",
            segments=before.segments if before else 0,
            provider=provider,
            status=status,
        )
        self.save(new)
        if moved is None or moved is DeliveryStatus.SENT:
            return  # a duplicate, or late or out-of-order news: nothing moves back
        entry = new.sent[report.reference]
        kind = sms_event_type(moved)
        if kind == "sms.delivered":
            DELIVERED.labels(entry.template, provider).inc()
        else:
            FAILED.labels(entry.template, provider, moved.value).inc()
        await self.publish(
            make_event(
                kind,
                source=SMS_SOURCE,
                id=f"{report.reference}:{moved.value}",
                subject=report.dossier_id,
                time=report.occurred_at or datetime.now(UTC),
                data={
                    "dossier_id": report.dossier_id,
                    "template": entry.template or None,
                    "segments": entry.segments or None,
                    "provider": provider,
                    "key": report.reference,
                    "reason": None if moved is DeliveryStatus.DELIVERED else moved.value,
                    "provider_status": report.status,
                },
            )
        )

    # --- timers --------------------------------------------------------------------------

    def _schedule_wakeup(self, record: SmsRecord) -> None:
        when = next_wakeup(record.state, self.sms.policy)
        if when is None:
            self.wakeups.pop(record.state.dossier_id, None)
        else:
            self.wakeups[record.state.dossier_id] = when

    async def on_timer(self) -> None:
        shorten_fetch_wait(self.service, self.sms.fetch_max_wait_ms)
        try:
            await self._due()
        except Exception as exc:  # Redis or the broker away for a moment: next tick retries
            log.warning("sms_timer_failed", error_type=type(exc).__name__, error=str(exc)[:200])

    async def _due(self) -> None:
        ok, _ = await self.service.ready()
        if not ok:
            return
        now = datetime.now(UTC)
        if time.monotonic() - self._last_rescan > self.sms.rescan_seconds:
            self._last_rescan = time.monotonic()
            self.rescan()
        for key, message in list(self.deferred.items()):
            if message.not_before <= now:
                self.deferred.pop(key, None)
                await self.sender.submit(message)
        for dossier_id, when in list(self.wakeups.items()):
            if when <= now:
                self.wakeups.pop(dossier_id, None)
                body = orjson.dumps({"kind": "tick", "dossier_id": dossier_id})
                await self.service.send(topics.SMS_CALLBACKS, dossier_id.encode(), body)

    def rescan(self) -> None:
        """After a restart or a rebalance: every pending message and wake-up in the table."""
        for raw in list(self.table.values()):
            if not isinstance(raw, bytes | bytearray) or all(idle in raw for idle in _IDLE_MARKS):
                continue
            record = decode_record(bytes(raw))
            self._schedule_wakeup(record)
            for key, message in record.pending.items():
                if not self.sender.busy_with(key):
                    self.deferred[key] = message  # sent by the loop above when due

    # --- the webhook ---------------------------------------------------------------------

    async def webhook(self, provider: str, request: Request) -> JSONResponse:
        body = await request.body()
        try:
            verify_body(
                body,
                request.headers.get(SIGNATURE_HEADER),
                self.settings.sms_secrets,
                tolerance_seconds=self.settings.webhook_tolerance_seconds,
            )
        except SignatureRejected as exc:
            return JSONResponse({"status": "rejected", "reason": exc.reason}, status_code=401)
        if provider not in PROVIDERS:
            return JSONResponse({"status": "unknown provider"}, status_code=404)
        try:
            report = DeliveryReport.model_validate_json(body)
            map_provider_status(report.status)
        except (ValidationError, UnknownProviderStatusError) as exc:
            return JSONResponse({"status": "malformed", "detail": str(exc)[:500]}, status_code=422)
        seen = self.keys("sms", "report", provider, report.event_id)
        if await self.redis.exists(seen):
            return JSONResponse({"status": "duplicate"})
        payload = {"kind": "report", "provider": provider, **report.model_dump(mode="json")}
        try:
            await self.service.send(
                topics.SMS_CALLBACKS, report.dossier_id.encode(), orjson.dumps(payload)
            )
        except Exception as exc:  # not durably written: the provider must retry
            log.warning("sms_report_not_written", error_type=type(exc).__name__)
            return JSONResponse({"status": "unavailable"}, status_code=503)
        await self.redis.set(seen, b"1", ex=self.sms.claim_ttl_seconds)
        return JSONResponse({"status": "accepted"})

    # --- wiring --------------------------------------------------------------------------

    def wire(self) -> None:
        service = self.service
        for topic in INPUT_TOPICS:

            async def handler(event: CloudEvent[Any], topic: str = topic) -> None:
                await self.on_input(topic, event)

            service.consume(topic, handler)
        service.consume_raw(topics.SMS_CALLBACKS, self.on_callback)
        service.app.timer(self.sms.timer_seconds)(self.on_timer)

        async def redis_reachable() -> bool:
            try:
                return bool(await self.redis.ping())
            except Exception:
                return False

        service.add_ready_check(redis_reachable)

        @service.api.post("/v1/webhooks/sms/{provider}")
        async def sms_report(provider: str, request: Request) -> JSONResponse:
            return await self.webhook(provider, request)


def dossier_partition(key: bytes, partitions: int) -> int:
    """The partition the producers' default partitioner (Kafka's murmur2) gives a dossier id."""
    return int(murmur2(key) & 0x7FFFFFFF) % partitions


def shorten_fetch_wait(service: Service, milliseconds: int) -> None:
    """Cap how long the worker's Kafka fetch may wait for data.

    faust builds its aiokafka consumer with `fetch_max_wait_ms=1500` and no setting for it. Kafka
    answers a waiting fetch as soon as data arrives, but Tansu (the dev and test broker) answers
    only when the wait is over, so an event could sit up to 1.5 s before the worker saw it
    (measured: p50 402 ms at 1500, 16 ms at 100). The fetcher reads the value for every request,
    so setting it on the running consumer takes effect with the next fetch. Does nothing when
    faust or aiokafka changed their insides.
    """
    thread = getattr(service.app.consumer, "_thread", None)
    consumer = getattr(thread, "_consumer", None)
    fetcher = getattr(consumer, "_fetcher", None)
    if fetcher is not None and getattr(fetcher, "_fetch_max_wait_ms", None) != milliseconds:
        fetcher._fetch_max_wait_ms = milliseconds


def _intent_event(type_: str, intent: SmsIntent, reason: str) -> CloudEvent[Any]:
    return make_event(
        type_,
        source=SMS_SOURCE,
        id=f"{intent.key}:{type_.removeprefix('sms.')}",
        subject=intent.dossier_id,
        time=datetime.now(UTC),
        data={
            "dossier_id": intent.dossier_id,
            "template": intent.template,
            "key": intent.key,
            "reason": reason[:500],
        },
    )


def build(settings: Settings, sms: SmsSettings | None = None) -> SmsApp:
    app = SmsApp(settings, sms or SmsSettings())
    app.wire()
    return app


def run(settings: Settings) -> None:
    app = build(settings)
    # The worker allocates a few hundred short-lived objects per event and keeps few cycles:
    # collecting the youngest generation every 700 allocations (the default) cost about a fifth
    # of its CPU (bench/sms.py: 1.55 → 1.25 ms per SMS). Startup objects are frozen so the rarer
    # full collections skip them.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    log.info("sms_starting", port=settings.sms_port, weights=app.sender.weights.as_dict())
    run_service(app.service, settings.sms_port)
