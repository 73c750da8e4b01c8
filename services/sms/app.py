"""The SMS service: a batch consumer, the sender and FastAPI routes around the pure core.

- One plain aiokafka consumer (`services.common.batches.BatchConsumer`, group `motcua-sms`)
  reads `dossier.events`, `payment.events`, `postal.events` and `sms.callbacks` (verified
  delivery reports, `tick` wake-ups, the sender's `settle` batches), all keyed by dossier id.
  The range assignor gives a member the same partition numbers of every topic, so it holds
  whole dossiers. Each poll is folded into the per-dossier records (`batch.fold`, pure); the
  changed records (one changelog record per dossier), the `sms.*` events and the dead letters
  are written with acks=all before the poll's offsets are committed; then the messages due are
  handed to `sender.Sender` and those deferred past quiet hours are kept for the timer.
- The records are the truth, kept in a compacted changelog written by this service (the topic
  and format of faust's `sms-dossiers` table before). On every assignment the assigned
  partitions are read back from it and every pending message and wake-up is picked up again;
  `/readyz` answers 503 until that is done. The Redis claim per message makes a second attempt
  harmless: a redelivery after SIGKILL never sends twice.
- A timer sends deferred messages when quiet hours end, asks for `tick`s when a dossier's
  wake-up is due, and rescans the in-memory records now and then for anything left pending
  (a send interrupted by Redis or the broker being away).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from aiokafka.partitioner import murmur2
from aiokafka.structs import TopicPartition
from fastapi import Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from services.common import topics
from services.common.batches import BatchConsumer
from services.common.changelog import Changelog, DecodedCache
from services.common.coordination import Keys, connect
from services.common.events import CloudEvent
from services.common.kafka import DurablePublisher
from services.common.logging import get_logger
from services.common.service import (
    DEAD_LETTERED,
    Service,
    create_service,
    dead_letter_headers,
    run_service,
)
from services.common.settings import Settings
from services.common.signing import SIGNATURE_HEADER, SignatureRejected, verify_body
from services.common.topics import TopicSpec
from services.sms.batch import Outcome, Rules, fold
from services.sms.decisions import next_wakeup
from services.sms.delivery import UnknownProviderStatusError, map_provider_status
from services.sms.inbox import (
    CONSUMED_TOPICS,
    DeliveryReport,
    Item,
    Settle,
    decode,
    settle_body,
    tick_body,
)
from services.sms.outbox import Pending, SmsRecord, decode_record, encode_record
from services.sms.partner import SmsGateway
from services.sms.sender import DELIVERED, FAILED, SUPPRESSED, Sender, Settled, SmsNotSent
from services.sms.settings import PROVIDERS, SmsSettings
from services.sms.templates import load_templates

log = get_logger("motcua.sms")

# A record with all of these has nothing pending and no wake-up: the rescan skips decoding it.
_IDLE_MARKS = (b'"pending":{}', b'"pending_overdue":null', b'"awaiting_contact":[]')

_COUNTERS = {"suppressed": SUPPRESSED, "failed": FAILED, "delivered": DELIVERED}


class SmsApp:
    """The wiring: one instance per worker process."""

    def __init__(self, settings: Settings, sms: SmsSettings) -> None:
        self.settings = settings
        self.sms = sms
        self.service: Service = create_service("sms", settings, title="motcua sms")
        self.rules = Rules(load_templates(), sms.opt_out, sms.quiet_hours, sms.policy)
        self.redis = connect(settings)
        self.keys = Keys(settings.redis_namespace)
        self.publisher = DurablePublisher(settings.kafka_bootstrap)
        self.changelog = Changelog(
            settings.kafka_bootstrap,
            TopicSpec(topics.SMS_STATE_CHANGELOG, settings.topic_partitions, compacted=True),
            self.publisher,
            replication=settings.topic_replication,
        )
        self.consumer: BatchConsumer[Item] = BatchConsumer(
            self.service,
            CONSUMED_TOPICS,
            self.on_batch,
            decode=decode,
            restore=self.restore,
            max_records=sms.max_batch,
            poll_seconds=sms.poll_seconds,
            publisher=self.publisher,
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
        # dossier id -> its record as written to (or restored from) the changelog
        self.raw: dict[str, bytes] = {}
        # the decoded records of `raw`
        self.decoded = DecodedCache(lambda _, raw: decode_record(raw), sms.record_cache_size)
        self.deferred: dict[str, Pending] = {}  # due later (quiet hours, or picked up again)
        self.wakeups: dict[str, datetime] = {}  # when a dossier needs a tick
        self._last_rescan = time.monotonic()

    # --- the records -----------------------------------------------------------------------

    def load(self, dossier_id: str) -> SmsRecord | None:
        raw = self.raw.get(dossier_id)
        return None if raw is None else self.decoded.get(dossier_id, raw)

    async def restore(self, assigned: frozenset[TopicPartition]) -> None:
        """The records of the assigned partitions, then everything they still have to do."""
        records = await self.changelog.read({tp.partition for tp in assigned})
        self.raw = {key.decode(): value for key, value in records.items()}
        self.decoded.clear()
        self.deferred.clear()
        self.wakeups.clear()
        self.rescan()
        log.info("sms_restored", dossiers=len(self.raw), pending=len(self.deferred))

    # --- consuming -------------------------------------------------------------------------

    async def on_batch(self, items: Sequence[Item]) -> None:
        """Fold a poll into the records; write what changed (acks=all), then act on it."""
        outcome = fold(self.load, items, self.rules, datetime.now(UTC))
        encoded = {dossier: encode_record(r) for dossier, r in outcome.records.items()}
        await self._write(outcome, encoded)
        # Written: the worker's own view moves on (a failed write left it as it was, and the
        # consumer restores from the changelog before it reads again).
        for dossier_id, raw in encoded.items():
            record = outcome.records[dossier_id]
            self.raw[dossier_id] = raw
            self.decoded.remember(dossier_id, raw, record)
            self._schedule_wakeup(record)
        for name, labels in outcome.counts:
            _COUNTERS[name].labels(*labels).inc()
        for key in outcome.settled:
            self.deferred.pop(key, None)
        for message in outcome.deferred:
            self.deferred[message.key] = message
        for message in outcome.due:
            await self.sender.submit(message)  # waits when the sender has too much queued

    async def _write(self, outcome: Outcome, encoded: dict[str, bytes]) -> None:
        writes = [self.changelog.write({key.encode(): raw for key, raw in encoded.items()})]
        if outcome.events:
            writes.append(self.publish_many(outcome.events))
        for dead in outcome.dead_letters:
            headers = dead_letter_headers(dead.error, 1)
            writes.append(
                self.publisher.publish([(dead.topic, dead.key, dead.value)], headers=headers)
            )
        await asyncio.gather(*writes)
        for dead in outcome.dead_letters:
            source, error_type = dead.topic.removesuffix(".dlq"), type(dead.error).__name__
            DEAD_LETTERED.labels(self.service.name, source, error_type).inc()
            log.warning(
                "dead_lettered",
                service=self.service.name,
                topic=source,
                error_type=error_type,
                error=str(dead.error)[:300],
            )

    # --- producing (the sender's callbacks) ------------------------------------------------

    async def publish_many(self, events: Sequence[CloudEvent[Any]]) -> None:
        """Every event handed to the producer first, then all the acks awaited at once."""
        await self.publisher.publish([(e.topic, e.key, e.to_json()) for e in events])

    async def settle_many(self, news: Sequence[Settled]) -> None:
        """The sender's news, one `settle` callback per partition of the dossiers concerned.

        Keyed by one of its dossiers, the batch lands on their partition (the producer's default
        partitioner, the one that placed their events), so the member holding those dossiers
        applies it.
        """
        partitions = self.settings.topic_partitions
        by_partition: dict[int, list[Settle]] = {}
        keys: dict[int, bytes] = {}
        for item in news:
            message = item.message
            key = message.dossier_id.encode()
            partition = dossier_partition(key, partitions)
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
        await self.publisher.publish(
            [
                (
                    topics.dlq(message.source_topic),
                    message.dossier_id.encode(),
                    message.origin.encode(),
                )
            ],
            headers=dead_letter_headers(SmsNotSent(reason), attempts),
        )

    # --- timers ----------------------------------------------------------------------------

    def _schedule_wakeup(self, record: SmsRecord) -> None:
        when = next_wakeup(record.state, self.sms.policy)
        if when is None:
            self.wakeups.pop(record.state.dossier_id, None)
        else:
            self.wakeups[record.state.dossier_id] = when

    async def on_timer(self) -> None:
        if not self.consumer.ready:
            return
        try:
            await self._due()
        except Exception as exc:  # Redis or the broker away for a moment: next tick retries
            log.warning("sms_timer_failed", error_type=type(exc).__name__, error=str(exc)[:200])

    async def _due(self) -> None:
        now = datetime.now(UTC)
        if time.monotonic() - self._last_rescan > self.sms.rescan_seconds:
            self._last_rescan = time.monotonic()
            self.rescan()
        for key, message in list(self.deferred.items()):
            if message.not_before <= now:
                self.deferred.pop(key, None)
                await self.sender.submit(message)
        due = [dossier_id for dossier_id, when in self.wakeups.items() if when <= now]
        if due:
            await self.publisher.publish(
                [(topics.SMS_CALLBACKS, d.encode(), tick_body(d)) for d in due]
            )
            for dossier_id in due:
                self.wakeups.pop(dossier_id, None)

    def rescan(self) -> None:
        """Every pending message and wake-up of the records held (after a restore, and now and
        then for sends that were interrupted)."""
        for raw in list(self.raw.values()):
            if all(idle in raw for idle in _IDLE_MARKS):
                continue
            record = decode_record(raw)
            self._schedule_wakeup(record)
            for key, message in record.pending.items():
                if not self.sender.busy_with(key):
                    self.deferred[key] = message  # sent by the timer when due

    # --- the webhook -----------------------------------------------------------------------

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
            await self.publisher.publish(
                [(topics.SMS_CALLBACKS, report.dossier_id.encode(), orjson.dumps(payload))]
            )
        except Exception as exc:  # not durably written: the provider must retry
            log.warning("sms_report_not_written", error_type=type(exc).__name__)
            return JSONResponse({"status": "unavailable"}, status_code=503)
        await self.redis.set(seen, b"1", ex=self.sms.claim_ttl_seconds)
        return JSONResponse({"status": "accepted"})

    # --- wiring ----------------------------------------------------------------------------

    def wire(self) -> None:
        service = self.service
        self.consumer.attach()
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


def build(settings: Settings, sms: SmsSettings | None = None) -> SmsApp:
    app = SmsApp(settings, sms or SmsSettings())
    app.wire()
    return app


def run(settings: Settings) -> None:
    app = build(settings)
    log.info("sms_starting", port=settings.sms_port, weights=app.sender.weights.as_dict())
    run_service(app.service, settings.sms_port)
