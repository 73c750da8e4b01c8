"""Sending pending messages, many at a time, exactly once as far as the applicant can tell.

Messages go through two stages, each working on batches of whatever has piled up meanwhile (so a
quiet service sends one message at once, a busy one a few hundred per call):

1. Admission, one Redis round trip per batch (`coordination.ClaimGate`): claim each message's
   idempotency key *before* calling anyone, recording the provider about to be called
   (`p:<provider>`), and reserve a token from the message's per-number bucket and the global
   bucket. A claim found `s:` was accepted before a crash (only the news was lost: `sms.sent` is
   announced again), `f:` was given up; `p:` means the outcome is unknown, so that provider is
   asked again first, with the same key. A message that must wait for tokens is sent when they
   are there (delayed, never dropped).
2. Sending, one call per provider and batch (`POST /v1/messages/batch`, a key per message), a few
   calls in flight per provider. Each message's outcome decides its next step
   (`attempts.after_failure`): retry after backoff, fail over (the claim names the next provider
   before it is called), or give up. Weight moves away from a provider that failed or was slow.
   Accepted: the claims become `s:<provider>` (one pipeline), `sms.sent` is published. Given up:
   the claims become `f:<reason>`, the original events go to their topics' DLQs with the reason,
   `sms.failed` is published. Either way the news is handed to the records (`Settle`).

One message per dossier is in the stages at a time, so a dossier's messages go out in the order
they were submitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import redis.asyncio as aioredis
from prometheus_client import Counter, Histogram

from services.common.coordination import ClaimGate, Keys, Ticket, TokenBucket
from services.common.events import CloudEvent, make_event
from services.common.logging import get_logger
from services.sms.attempts import (
    Attempt,
    FailOver,
    GiveUp,
    Retry,
    RetryRules,
    after_failure,
    first_provider,
)
from services.sms.delivery import DeliveryStatus
from services.sms.outbox import SMS_SOURCE, Pending
from services.sms.partner import MAX_BATCH, Accepted, GatewayError, OutboundSms, SmsGateway
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
    "motcua_sms_provider_calls_total", "Messages offered to SMS providers", ["provider", "outcome"]
)
STAGE_SECONDS = Histogram(
    "motcua_sms_stage_seconds",
    "Time per stage of sending: queue and rate_limit per message; claim, send, publish per batch",
    ["stage"],
)
PROVIDER_SECONDS = Histogram(
    "motcua_sms_provider_seconds", "Time of one call to a provider", ["provider"]
)
BATCH_SIZE = Histogram(
    "motcua_sms_batch_size",
    "Messages per admission or provider call",
    ["stage"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
)

Publish = Callable[[Sequence[CloudEvent[Any]]], Awaitable[None]]  # returns once all are acked
DeadLetter = Callable[[Pending, str, int], Awaitable[None]]


@dataclass(frozen=True)
class Settled:
    """News for the records: a message left `pending` (accepted, or given up)."""

    message: Pending
    provider: str | None
    status: DeliveryStatus


Settle = Callable[[Sequence[Settled]], Awaitable[None]]  # returns once durably handed over


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


@dataclass
class Job:
    """One message on its way through the stages."""

    message: Pending
    attempt: Attempt
    claim_key: str
    since: float  # perf_counter when it entered its current stage

    def outbound(self, sender: str) -> OutboundSms:
        message = self.message
        return OutboundSms(
            to=message.to,
            text=message.text,
            sender=sender,
            reference=message.key,
            dossier_id=message.dossier_id,
            template=message.template,
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
        settle: Settle,
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.keys = keys
        self.gateways = dict(gateways)
        self.weights = ProviderWeights.of(
            {name: w for name, w in settings.weights.items() if name in self.gateways}
        )
        self.rules = RetryRules(
            attempts_per_provider=settings.attempts_per_provider,
            ambiguous_attempts=settings.ambiguous_attempts,
            backoff_base_seconds=settings.backoff_base_seconds,
            backoff_max_seconds=settings.backoff_max_seconds,
        )
        self._publish = publish
        self._dead_letter = dead_letter
        self._settle = settle
        per_number = TokenBucket(
            redis,
            keys("sms", "bucket", "number"),
            settings.per_number_rate,
            settings.per_number_burst,
        )
        everyone = TokenBucket(
            redis, keys("sms", "bucket", "global"), settings.global_rate, settings.global_burst
        )
        self._gate = ClaimGate(
            redis,
            (per_number, everyone),
            claim_ttl_seconds=settings.claim_ttl_seconds,
            retake_prefix="p:",
        )
        self._batch_size = min(settings.batch_size, MAX_BATCH)
        self._room = asyncio.Semaphore(settings.max_pending)
        self._to_admit: deque[Job] = deque()
        self._admit_ready = asyncio.Event()
        self._to_send: dict[str, deque[Job]] = {name: deque() for name in self.gateways}
        self._send_ready = {name: asyncio.Event() for name in self.gateways}
        self._calls = {name: asyncio.Semaphore(settings.calls_in_flight) for name in self.gateways}
        self._busy_dossiers: dict[str, deque[Job]] = {}  # dossier -> its next messages
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self.inflight: set[str] = set()
        self.recently_done: dict[str, float] = {}

    def busy_with(self, key: str) -> bool:
        return key in self.inflight or key in self.recently_done

    async def submit(self, message: Pending) -> None:
        """Queue a message for sending; waits (backpressure) when too many are queued already."""
        if self.busy_with(message.key):
            return
        self.inflight.add(message.key)
        await self._room.acquire()
        self._start()
        order = failover_order(self.weights, random.random())
        job = Job(
            message, Attempt(order), self.keys("sms", "claim", message.key), time.perf_counter()
        )
        waiting = self._busy_dossiers.get(message.dossier_id)
        if waiting is not None:
            waiting.append(job)  # after the dossier's message in flight
            return
        self._busy_dossiers[message.dossier_id] = deque()
        self._admit(job)

    # --- stage 1: claim and tokens ----------------------------------------------------------

    def _admit(self, job: Job) -> None:
        job.since = time.perf_counter()
        self._to_admit.append(job)
        self._admit_ready.set()

    async def _admit_loop(self) -> None:
        while True:
            await self._admit_ready.wait()
            await self._linger(self._to_admit)
            self._admit_ready.clear()
            while self._to_admit:
                batch = _take(self._to_admit, self._batch_size)
                try:
                    await self._claim(batch)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # Redis away: the periodic rescan tries again
                    self._interrupted(batch, exc)

    async def _claim(self, batch: list[Job]) -> None:
        started = time.perf_counter()
        for job in batch:
            STAGE_SECONDS.labels("queue").observe(started - job.since)
        tickets = [
            Ticket(job.claim_key, f"p:{job.attempt.provider}", (_number_id(job.message.to), "all"))
            for job in batch
        ]
        admissions = await self._gate.admit(tickets)
        now = time.perf_counter()
        STAGE_SECONDS.labels("claim").observe(now - started)
        BATCH_SIZE.labels("claim").observe(len(batch))
        known = frozenset(self.gateways)
        sent_before: list[tuple[Job, str]] = []
        failed_before: list[tuple[Job, str]] = []
        loop = asyncio.get_running_loop()
        for job, admission in zip(batch, admissions, strict=True):
            held = admission.held
            if held.startswith("s:"):  # accepted before a crash: only the news was lost
                sent_before.append((job, held[2:]))
                continue
            if held.startswith("f:"):
                failed_before.append((job, held[2:] or "send_failed"))
                continue
            order = first_provider(job.attempt.order, held, known)
            if order != job.attempt.order:
                job.attempt = Attempt(order)
            STAGE_SECONDS.labels("rate_limit").observe(admission.wait)
            job.since = now
            if admission.wait > 0:  # the tokens are reserved: go when they are there
                loop.call_later(admission.wait, self._queue_send, job)
            else:
                self._queue_send(job)
        if sent_before:
            self._spawn(self._announce_sent_before(sent_before))
        if failed_before:
            self._spawn(self._announce_failed_before(failed_before))

    # --- stage 2: providers -----------------------------------------------------------------

    def _queue_send(self, job: Job) -> None:
        provider = job.attempt.provider
        self._to_send[provider].append(job)
        self._send_ready[provider].set()

    async def _send_loop(self, provider: str) -> None:
        queue, ready, calls = (
            self._to_send[provider],
            self._send_ready[provider],
            self._calls[provider],
        )
        while True:
            await ready.wait()
            ready.clear()
            while queue:
                await calls.acquire()  # meanwhile, more messages pile up for this call
                await self._linger(queue)
                batch = _take(queue, self._batch_size)
                task = self._spawn(self._call(provider, batch))
                task.add_done_callback(lambda _: calls.release())

    async def _call(self, provider: str, batch: list[Job]) -> None:
        sender = self.settings.sender
        started = time.perf_counter()
        try:
            outcomes = await self.gateways[provider].send_batch(
                [(job.outbound(sender), job.message.key) for job in batch]
            )
        except Exception as exc:  # a bug, not a provider's answer: the rescan tries again
            self._interrupted(batch, exc)
            return
        seconds = time.perf_counter() - started
        STAGE_SECONDS.labels("send").observe(seconds)
        PROVIDER_SECONDS.labels(provider).observe(seconds)
        BATCH_SIZE.labels("send").observe(len(batch))
        accepted: list[tuple[Job, Accepted]] = []
        moved: list[Job] = []
        given_up: list[tuple[Job, GatewayError]] = []
        loop = asyncio.get_running_loop()
        for job, outcome in zip(batch, outcomes, strict=True):
            if isinstance(outcome, Accepted):
                outcome_name = "replayed" if outcome.replayed else "accepted"
                PROVIDER_CALLS.labels(provider, outcome_name).inc()
                accepted.append((job, outcome))
                continue
            PROVIDER_CALLS.labels(provider, outcome.failure.value).inc()
            step = after_failure(job.attempt, outcome.failure, self.rules)
            job.attempt = step.attempt
            if isinstance(step, Retry):
                loop.call_later(step.delay, self._queue_send, job)
            elif isinstance(step, FailOver):
                self._shift_away(step.away_from)
                moved.append(job)
            else:
                assert isinstance(step, GiveUp)
                self._shift_away(step.away_from)
                given_up.append((job, outcome))
        if accepted and seconds > self.settings.slow_seconds:
            self._shift_away(provider)
        await asyncio.gather(
            self._finish_accepted(provider, accepted),
            self._fail_over(moved),
            self._finish_given_up(given_up),
        )

    async def _finish_accepted(self, provider: str, accepted: list[tuple[Job, Accepted]]) -> None:
        if not accepted:
            return
        jobs = [job for job, _ in accepted]
        try:
            started = time.perf_counter()
            await self._set_claims(jobs, f"s:{provider}")
            now = datetime.now(UTC)
            events = []
            for job, outcome in accepted:
                message = job.message
                SENT.labels(message.template, provider).inc()
                SEGMENTS.labels(message.template, provider).inc(message.segments)
                events.append(_sent_event(message, provider, outcome.message_id, now))
            await self._publish(events)
            await self._settle(
                [Settled(job.message, provider, DeliveryStatus.SENT) for job in jobs]
            )
            STAGE_SECONDS.labels("publish").observe(time.perf_counter() - started)
        except Exception as exc:  # Redis or Kafka trouble: the periodic rescan tries again
            self._interrupted(jobs, exc)
        else:
            self._done(jobs)

    async def _fail_over(self, jobs: list[Job]) -> None:
        if not jobs:
            return
        try:  # the claim names the provider about to be called, before it is called
            pipe = self.redis.pipeline(transaction=False)
            ttl = self.settings.claim_ttl_seconds
            for job in jobs:
                pipe.set(job.claim_key, f"p:{job.attempt.provider}", ex=ttl)
            await pipe.execute()
        except Exception as exc:
            self._interrupted(jobs, exc)
            return
        for job in jobs:
            self._queue_send(job)

    async def _finish_given_up(self, given_up: list[tuple[Job, GatewayError]]) -> None:
        if not given_up:
            return
        jobs = [job for job, _ in given_up]
        try:
            pipe = self.redis.pipeline(transaction=False)
            ttl = self.settings.claim_ttl_seconds
            reasons = [f"send_failed: {error}" for _, error in given_up]
            for job, reason in zip(jobs, reasons, strict=True):
                pipe.set(job.claim_key, f"f:{reason}", ex=ttl)
            await pipe.execute()
            now = datetime.now(UTC)
            events = []
            for (job, error), reason in zip(given_up, reasons, strict=True):
                message = job.message
                FAILED.labels(message.template, error.provider, "send").inc()
                log.warning(
                    "sms_not_sent",
                    dossier_id=message.dossier_id,
                    template=message.template,
                    reason=reason,
                    attempts=job.attempt.total,
                )
                await self._dead_letter(message, reason, job.attempt.total)
                events.append(_failed_event(message, reason, error.provider, now))
            await self._publish(events)
            await self._settle(
                [
                    Settled(job.message, error.provider, DeliveryStatus.PERMANENT_FAILURE)
                    for job, error in given_up
                ]
            )
        except Exception as exc:
            self._interrupted(jobs, exc)
        else:
            self._done(jobs)

    async def _announce_sent_before(self, found: list[tuple[Job, str]]) -> None:
        jobs = [job for job, _ in found]
        try:
            now = datetime.now(UTC)
            await self._publish([_sent_event(job.message, p, "", now) for job, p in found])
            await self._settle([Settled(job.message, p, DeliveryStatus.SENT) for job, p in found])
        except Exception as exc:
            self._interrupted(jobs, exc)
        else:
            self._done(jobs)

    async def _announce_failed_before(self, found: list[tuple[Job, str]]) -> None:
        jobs = [job for job, _ in found]
        try:
            now = datetime.now(UTC)
            await self._publish([_failed_event(job.message, r, None, now) for job, r in found])
            failed = DeliveryStatus.PERMANENT_FAILURE
            await self._settle([Settled(job.message, None, failed) for job in jobs])
        except Exception as exc:
            self._interrupted(jobs, exc)
        else:
            self._done(jobs)

    async def _set_claims(self, jobs: list[Job], value: str) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for job in jobs:
            pipe.set(job.claim_key, value, ex=self.settings.claim_ttl_seconds)
        await pipe.execute()

    # --- bookkeeping ------------------------------------------------------------------------

    async def _linger(self, queue: deque[Job]) -> None:
        if len(queue) < self._batch_size and self.settings.batch_linger_seconds > 0:
            await asyncio.sleep(self.settings.batch_linger_seconds)

    def _done(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        for job in jobs:
            self.recently_done[job.message.key] = now
            self._release(job)
        if len(self.recently_done) > 50000:
            cutoff = now - 120
            self.recently_done = {k: t for k, t in self.recently_done.items() if t > cutoff}

    def _interrupted(self, jobs: list[Job], exc: BaseException) -> None:
        log.warning(
            "sms_send_interrupted",
            messages=len(jobs),
            error_type=type(exc).__name__,
            error=str(exc)[:200],
        )
        for job in jobs:
            self._release(job)

    def _release(self, job: Job) -> None:
        """The job left the stages: the dossier's next message may go."""
        self.inflight.discard(job.message.key)
        self._room.release()
        dossier = job.message.dossier_id
        waiting = self._busy_dossiers.get(dossier)
        if waiting:
            self._admit(waiting.popleft())
        else:
            self._busy_dossiers.pop(dossier, None)

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

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _start(self) -> None:
        if self._loops:
            return
        self._loops = [asyncio.create_task(self._admit_loop())]
        self._loops += [asyncio.create_task(self._send_loop(name)) for name in self.gateways]

    async def aclose(self) -> None:
        for task in [*self._loops, *self._tasks]:
            task.cancel()
        for gateway in self.gateways.values():
            with contextlib.suppress(Exception):
                await gateway.aclose()


def _take(queue: deque[Job], limit: int) -> list[Job]:
    return [queue.popleft() for _ in range(min(limit, len(queue)))]


def _sent_event(message: Pending, provider: str, message_id: str, now: datetime) -> CloudEvent[Any]:
    return sms_event(
        "sms.sent",
        message,
        suffix="sent",
        now=now,
        provider=provider,
        message_id=message_id or None,
    )


def _failed_event(
    message: Pending, reason: str, provider: str | None, now: datetime
) -> CloudEvent[Any]:
    return sms_event(
        "sms.failed",
        message,
        suffix="failed",
        now=now,
        provider=provider,
        reason=reason[:500],
        stage="send",
    )


def _number_id(e164: str) -> str:
    """Bucket names never hold a number in clear."""
    return hashlib.sha256(e164.encode()).hexdigest()[:24]
