"""Sending a pending message, exactly once as far as the applicant can tell. I/O lives here.

1. Claim the message's idempotency key in Redis *before* calling anyone, recording the provider
   about to be called (`p:<provider>`). A redelivery after a crash finds the claim: `s:` means it
   was accepted (only `sms.sent` is republished), `p:` means the outcome is unknown, so the same
   provider is asked again with the same `Idempotency-Key` and answers "replayed" if it had it.
2. Wait for the per-number and global token buckets (they delay, never drop).
3. Try providers in weighted order. A definite failure (5xx, 429, refused connection) fails over
   after `attempts_per_provider` tries with backoff; a timeout is ambiguous, so the same provider
   is asked up to `ambiguous_attempts` times before failing over. Weight moves away from a
   provider that failed or was slow.
4. Accepted: claim becomes `s:<provider>`, `sms.sent` is published. Given up: claim becomes `f:`,
   the original event goes to its topic's DLQ with the reason, `sms.failed` is published.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram

from services.common.coordination import Keys, TokenBucket
from services.common.events import CloudEvent, make_event
from services.common.logging import get_logger
from services.sms.outbox import SMS_SOURCE, Pending
from services.sms.partner import Accepted, Failure, GatewayError, OutboundSms, SmsGateway
from services.sms.providers import ProviderWeights, failover_order, shift_weight_away
from services.sms.settings import SmsSettings

log = get_logger("motcua.sms.sender")

SENT = Counter("motcua_sms_sent_total", "SMS accepted by a provider", ["template", "provider"])
SEGMENTS = Counter(
    "motcua_sms_segments_total", "Segments accepted by a provider", ["template", "provider"]
)
DELIVERED = Counter("motcua_sms_delivered_total", "SMS delivered", ["template", "provider"])
FAILED = Counter("motcua_sms_failed_total", "SMS failed", ["template", "provider", "kind"])
SUPPRESSED = Counter("motcua_sms_suppressed_total", "SMS not sent", ["template", "reason"])
PROVIDER_CALLS = Counter(
    "motcua_sms_provider_calls_total", "Calls to SMS providers", ["provider", "outcome"]
)
STAGE_SECONDS = Histogram(
    "motcua_sms_stage_seconds", "Time spent per stage of sending one SMS", ["stage"]
)
PROVIDER_SECONDS = Histogram(
    "motcua_sms_provider_seconds", "Time of one call to a provider", ["provider"]
)

# Claim the key unless held; return what it held ("" when we claimed it). One round trip.
_CLAIM = """
local held = redis.call('GET', KEYS[1])
if held then return held end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
return ''
"""

Publish = Callable[[CloudEvent[Any]], Awaitable[None]]
DeadLetter = Callable[[Pending, str, int], Awaitable[None]]


class SmsNotSent(Exception):
    """The reason a message went to the dead-letter topic."""


def sms_event(
    type_: str, message: Pending, *, suffix: str, now: datetime, **data: Any
) -> CloudEvent[Any]:
    """An `sms.*` event with a deterministic id, so a redelivery republishes the same event."""
    return make_event(
        type_,
        source=SMS_SOURCE,
        id=f"{message.key}:{suffix}",
        subject=message.dossier_id,
        time=now,
        data={
            "dossier_id": message.dossier_id,
            "template": message.template,
            "segments": message.segments,
            "key": message.key,
            **data,
        },
    )


class Sender:
    def __init__(
        self,
        settings: SmsSettings,
        redis: aioredis.Redis,
        keys: Keys,
        gateways: Mapping[str, SmsGateway],
        publish: Publish,
        dead_letter: DeadLetter,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self.gateways = dict(gateways)
        self.weights = ProviderWeights.of(
            {name: w for name, w in settings.weights.items() if name in self.gateways}
        )
        self._publish = publish
        self._dead_letter = dead_letter
        self._claim = redis.register_script(_CLAIM)
        self._per_number = TokenBucket(
            redis,
            keys("sms", "bucket", "number"),
            settings.per_number_rate,
            settings.per_number_burst,
        )
        self._global = TokenBucket(
            redis, keys("sms", "bucket", "global"), settings.global_rate, settings.global_burst
        )
        self._calls = asyncio.Semaphore(settings.concurrency)
        self._room = asyncio.Semaphore(settings.max_pending)
        self._chains: dict[str, asyncio.Task[None]] = {}
        self.inflight: set[str] = set()
        self.recently_done: dict[str, float] = {}

    def busy_with(self, key: str) -> bool:
        return key in self.inflight or key in self.recently_done

    async def submit(self, message: Pending) -> None:
        """Queue a message for sending; waits (backpressure) when too many are queued already.

        Messages of one dossier go out in the order they were submitted.
        """
        if self.busy_with(message.key):
            return
        self.inflight.add(message.key)
        await self._room.acquire()
        previous = self._chains.get(message.dossier_id)
        task = asyncio.create_task(self._run(message, previous))
        self._chains[message.dossier_id] = task

        def forget(done: asyncio.Task[None], dossier: str = message.dossier_id) -> None:
            if self._chains.get(dossier) is done:
                del self._chains[dossier]

        task.add_done_callback(forget)

    async def _run(self, message: Pending, previous: asyncio.Task[None] | None) -> None:
        queued = time.perf_counter()
        try:
            if previous is not None:
                await asyncio.wait([previous])
            async with self._calls:
                STAGE_SECONDS.labels("queue").observe(time.perf_counter() - queued)
                await self.deliver(message)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # Redis or Kafka trouble: the periodic rescan tries again
            log.warning(
                "sms_send_interrupted",
                dossier_id=message.dossier_id,
                template=message.template,
                error_type=type(exc).__name__,
                error=str(exc)[:200],
            )
        else:
            self._remember_done(message.key)
        finally:
            self.inflight.discard(message.key)
            self._room.release()

    def _remember_done(self, key: str) -> None:
        now = time.monotonic()
        self.recently_done[key] = now
        if len(self.recently_done) > 50000:
            cutoff = now - 120
            self.recently_done = {k: t for k, t in self.recently_done.items() if t > cutoff}

    async def deliver(self, message: Pending) -> None:
        claim_key = self.keys("sms", "claim", message.key)
        order = failover_order(self.weights, random.random())
        started = time.perf_counter()
        held = await self._claim(
            keys=[claim_key], args=[f"p:{order[0]}", self.settings.claim_ttl_seconds]
        )
        held = held.decode() if isinstance(held, bytes) else str(held)
        if held.startswith("s:"):  # accepted before a crash: only the news was lost
            await self._announce_sent(message, held[2:], "")
            return
        if held.startswith("f:"):
            await self._announce_failed(message, held[2:] or "send_failed", None)
            return
        if held.startswith("p:") and held[2:] in self.gateways:
            first = held[2:]  # outcome unknown: the same provider, the same key, first
            order = (first, *(name for name in order if name != first))

        STAGE_SECONDS.labels("claim").observe(time.perf_counter() - started)
        started = time.perf_counter()
        waits = await asyncio.gather(
            self._per_number.take(_number_id(message.to), reserve=True),
            self._global.take("all", reserve=True),
        )
        if max(waits) > 0:
            await asyncio.sleep(max(waits))
        STAGE_SECONDS.labels("rate_limit").observe(time.perf_counter() - started)

        sms = OutboundSms(
            to=message.to,
            text=message.text,
            sender=self.settings.sender,
            reference=message.key,
            dossier_id=message.dossier_id,
            template=message.template,
        )
        last: GatewayError | None = None
        attempts = 0
        for index, provider in enumerate(order):
            if index > 0:
                await self.redis.set(claim_key, f"p:{provider}", ex=self.settings.claim_ttl_seconds)
            outcome, tries = await self._try(provider, sms, message.key)
            attempts += tries
            if isinstance(outcome, Accepted):
                await self.redis.set(claim_key, f"s:{provider}", ex=self.settings.claim_ttl_seconds)
                SENT.labels(message.template, provider).inc()
                SEGMENTS.labels(message.template, provider).inc(message.segments)
                started = time.perf_counter()
                await self._announce_sent(message, provider, outcome.message_id)
                STAGE_SECONDS.labels("publish").observe(time.perf_counter() - started)
                return
            last = outcome
        assert last is not None
        reason = f"send_failed: {last}"
        await self.redis.set(claim_key, f"f:{reason}", ex=self.settings.claim_ttl_seconds)
        FAILED.labels(message.template, last.provider, "send").inc()
        log.warning(
            "sms_not_sent",
            dossier_id=message.dossier_id,
            template=message.template,
            reason=reason,
            attempts=attempts,
        )
        await self._dead_letter(message, reason, attempts)
        await self._announce_failed(message, reason, last.provider)

    async def _try(
        self, provider: str, sms: OutboundSms, key: str
    ) -> tuple[Accepted | GatewayError, int]:
        gateway = self.gateways[provider]
        settings = self.settings
        ambiguous = False
        tries = 0
        while True:
            tries += 1
            try:
                accepted = await gateway.send(sms, key)
            except GatewayError as exc:
                PROVIDER_CALLS.labels(provider, exc.failure.value).inc()
                PROVIDER_SECONDS.labels(provider).observe(exc.seconds)
                ambiguous = ambiguous or exc.failure is Failure.AMBIGUOUS
                limit = settings.ambiguous_attempts if ambiguous else settings.attempts_per_provider
                if (exc.failure is Failure.REJECTED and not ambiguous) or tries >= limit:
                    self._shift_away(provider)
                    return exc, tries
                ceiling = min(
                    settings.backoff_max_seconds, settings.backoff_base_seconds * 2**tries
                )
                await asyncio.sleep(ceiling * (0.5 + random.random() / 2))
                continue
            PROVIDER_CALLS.labels(provider, "replayed" if accepted.replayed else "accepted").inc()
            PROVIDER_SECONDS.labels(provider).observe(accepted.seconds)
            if accepted.seconds > settings.slow_seconds:
                self._shift_away(provider)
            return accepted, tries

    def _shift_away(self, provider: str) -> None:
        before = self.weights
        self.weights = shift_weight_away(
            before,
            provider,
            datetime.now(UTC),
            step=self.settings.weight_step,
            floor=self.settings.weight_floor,
            cooldown=timedelta(seconds=self.settings.weight_cooldown_seconds),
        )
        if self.weights is not before:
            log.info("sms_weights_changed", away_from=provider, weights=self.weights.as_dict())

    async def _announce_sent(self, message: Pending, provider: str, message_id: str) -> None:
        await self._publish(
            sms_event(
                "sms.sent",
                message,
                suffix="sent",
                now=datetime.now(UTC),
                provider=provider,
                message_id=message_id or None,
            )
        )

    async def _announce_failed(self, message: Pending, reason: str, provider: str | None) -> None:
        await self._publish(
            sms_event(
                "sms.failed",
                message,
                suffix="failed",
                now=datetime.now(UTC),
                provider=provider,
                reason=reason[:500],
                stage="send",
            )
        )

    async def aclose(self) -> None:
        for task in list(self._chains.values()):
            task.cancel()
        for gateway in self.gateways.values():
            with contextlib.suppress(Exception):
                await gateway.aclose()


def _number_id(e164: str) -> str:
    """Bucket names never hold a number in clear."""
    return hashlib.sha256(e164.encode()).hexdigest()[:24]


def _backoff(settings: SmsSettings, tries: int) -> float:
    """Exponential backoff with jitter (half to all of the ceiling) before the next try."""
    ceiling = min(settings.backoff_max_seconds, settings.backoff_base_seconds * 2**tries)
    return float(ceiling * (0.5 + random.random() / 2))
