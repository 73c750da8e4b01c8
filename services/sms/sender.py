"""Sending pending messages, many at a time, exactly once as far as the applicant can tell.

Messages go through two stages, each working on batches of whatever has piled up meanwhile (so a
quiet service sends one message at once, a busy one a few hundred per call):

1. `admission`: claim each message's idempotency key and reserve its tokens, one Redis round
   trip per batch; a message that must wait for tokens goes when they are there.
2. `provider_calls`: one call per provider and batch, a few calls in flight per provider; each
   message retries, fails over or gives up by its outcome.

Right before a provider call each message's number is opened (`open_number`: the records hold
it sealed, CONTRACT section 10); one whose dossier's personal data was erased is suppressed
(`sms.suppressed`, `erased`) instead, one that does not open is given up.

`settling` writes down what became of each message (claims, `sms.sent` / `sms.failed`, dead
letters, the news for the records). This module runs the stages: the queues, the loops, and
the bookkeeping of what is in flight. One message per dossier is in the stages at a time, so
a dossier's messages go out in the order they were submitted.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta

import redis.asyncio as aioredis

from services.common.coordination import Keys
from services.common.data_keys import KeyErased
from services.common.logging import get_logger
from services.common.sealing import SealingError
from services.sms.admission import Admission, Job
from services.sms.announced import SendOutcome
from services.sms.attempts import Attempt, RetryRules
from services.sms.counters import FAILOVERS
from services.sms.delivery import DeliveryStatus
from services.sms.partner import MAX_BATCH, SmsGateway
from services.sms.provider_calls import Answered, call_provider
from services.sms.providers import (
    ProviderWeights,
    failover_order,
    key_point,
    shift_weight_away,
)
from services.sms.record import Pending
from services.sms.settings import SmsSettings
from services.sms.settling import DeadLetter, Publish, Settle, Settled, Settling

log = get_logger("motcua.sms.sender")

# A message's number in clear, for the provider call: (dossier id, number as held) -> number.
OpenNumber = Callable[[str, str], Awaitable[str]]


async def as_held(_: str, to: str) -> str:
    return to


# How long a message done stays busy: its settle news reaches its record well within this.
RECENT_SECONDS = 120.0


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
        open_number: OpenNumber = as_held,
        refresh_numbers: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.settings = settings
        self._open_number = open_number
        self._refresh_numbers = refresh_numbers
        self.keys = keys
        self.gateways = dict(gateways)
        for name in self.gateways:  # every provider's series from the start (alerts on increase)
            FAILOVERS.labels(name)
        self.weights = ProviderWeights.of(
            {name: w for name, w in settings.weights.items() if name in self.gateways}
        )
        self.rules = RetryRules(
            attempts_per_provider=settings.attempts_per_provider,
            ambiguous_attempts=settings.ambiguous_attempts,
            backoff_base_seconds=settings.backoff_base_seconds,
            backoff_max_seconds=settings.backoff_max_seconds,
        )
        self._admission = Admission(redis, keys, settings)
        self._settling = Settling(redis, settings.claim_ttl_seconds, publish, dead_letter, settle)
        self._batch_size = min(settings.batch_size, MAX_BATCH)
        self._room = asyncio.Semaphore(settings.max_pending)
        self._to_admit: deque[Job] = deque()
        self._admit_ready = asyncio.Event()
        self._to_send: dict[str, deque[Job]] = {name: deque() for name in self.gateways}
        self._send_ready = {name: asyncio.Event() for name in self.gateways}
        self._calls = {name: asyncio.Semaphore(settings.calls_in_flight) for name in self.gateways}
        # dossier -> its next messages (None until a second one comes: most dossiers have one)
        self._busy_dossiers: dict[str, deque[Job] | None] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self.inflight: set[str] = set()
        # key -> when it was done, oldest first, until its record learnt it (`learnt`) or for
        # RECENT_SECONDS at most (news folded by another member after a rebalance)
        self.recently_done: OrderedDict[str, float] = OrderedDict()

    @property
    def backlog(self) -> int:
        """Messages in the stages, or done and not yet learnt by their records: what the
        records hold pending besides the messages deferred past quiet hours."""
        return len(self.inflight) + len(self.recently_done)

    def busy_with(self, key: str) -> bool:
        """In the stages, or done so lately that its record may not know yet (`learnt`)."""
        if key in self.inflight:
            return True
        done = self.recently_done.get(key)
        return done is not None and time.monotonic() - done < RECENT_SECONDS

    def learnt(self, key: str) -> None:
        """The message's record learnt that it left `pending` (its settle news is folded in and
        written): the rescan no longer finds it, so it need not stay busy."""
        self.recently_done.pop(key, None)

    async def submit(self, message: Pending, *, decided_now: bool = False) -> None:
        """Queue a message for sending; waits (backpressure) when too many are queued already.

        `decided_now`: the poll that decided it had no record of it (a retired dossier's event
        read again), so only a copy in the stages stops it; its claim in Redis says whether it
        went before.
        """
        if message.key in self.inflight or (not decided_now and self.busy_with(message.key)):
            return
        self.inflight.add(message.key)
        await self._room.acquire()
        self._start()
        order = failover_order(self.weights, key_point(message.key))  # the same gateway again
        job = Job(
            message, Attempt(order), self.keys("sms", "claim", message.key), time.perf_counter()
        )
        dossier = message.dossier_id
        if dossier in self._busy_dossiers:  # after the dossier's message in flight
            waiting = self._busy_dossiers[dossier]
            if waiting is None:
                waiting = self._busy_dossiers[dossier] = deque()
            waiting.append(job)
            return
        self._busy_dossiers[dossier] = None
        self._admit(job)

    async def announced_before(self, found: list[tuple[Pending, SendOutcome]]) -> None:
        """Messages whose outcome `sms.events` already holds (read on restore): their claims
        say so again and the records get the news; none is sent or announced. They stay busy
        (`busy_with`) while the news is on its way to their records."""
        if not found:
            return
        claims = []
        for message, outcome in found:
            sent = outcome.status is DeliveryStatus.SENT
            claim = f"s:{outcome.provider or ''}" if sent else f"f:{outcome.reason}"
            settled = Settled(message, outcome.provider, outcome.status)
            claims.append((self.keys("sms", "claim", message.key), claim, settled))
        await self._settling.announced_before(claims)
        now = time.monotonic()
        for message, _ in found:
            self._mark_done(message.key, now)
        self._forget_done(now)

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
        admitted = await self._admission.admit(batch, frozenset(self.gateways))
        loop = asyncio.get_running_loop()
        for job, wait in admitted.go:
            if wait > 0:  # the tokens are reserved: go when they are there
                loop.call_later(wait, self._queue_send, job)
            else:
                self._queue_send(job)
        if admitted.sent_before:
            jobs = [job for job, _ in admitted.sent_before]
            self._spawn(self._finish(jobs, self._settling.sent_before(admitted.sent_before)))
        if admitted.failed_before:
            jobs = [job for job, _ in admitted.failed_before]
            self._spawn(self._finish(jobs, self._settling.failed_before(admitted.failed_before)))

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
        try:
            batch, numbers = await self._open_numbers(batch)
        except Exception as exc:  # the keys cannot be read now: the rescan tries again
            self._interrupted(batch, exc)
            return
        if not batch:
            return
        try:
            answered = await call_provider(
                self.gateways[provider],
                batch,
                sender=self.settings.sender,
                rules=self.rules,
                slow_seconds=self.settings.slow_seconds,
                numbers=numbers,
            )
        except Exception as exc:  # a bug, not a provider's answer: the rescan tries again
            self._interrupted(batch, exc)
            return
        loop = asyncio.get_running_loop()
        for job, delay in answered.retry:
            loop.call_later(delay, self._queue_send, job)
        for away_from in answered.away_from:
            self._shift_away(away_from)
        await asyncio.gather(*self._settle_answered(answered))

    async def _open_numbers(self, batch: list[Job]) -> tuple[list[Job], dict[str, str]]:
        """The jobs that can go, with their numbers opened; the others leave the stages:
        suppressed (`erased`), or given up (a number that does not open)."""
        if self._refresh_numbers is not None:
            await self._refresh_numbers()
        numbers: dict[str, str] = {}
        sendable: list[Job] = []
        erased: list[Job] = []
        unopened: list[tuple[Job, str]] = []
        for job in batch:
            message = job.message
            try:
                numbers[message.key] = await self._open_number(message.dossier_id, message.to)
            except KeyErased:
                erased.append(job)
            except SealingError as exc:
                unopened.append((job, f"{type(exc).__name__}: {exc}"))
            else:
                sendable.append(job)
        if erased:
            self._spawn(self._finish(erased, self._settling.erased(erased)))
        if unopened:
            jobs = [job for job, _ in unopened]
            self._spawn(self._finish(jobs, self._settling.unopened(unopened)))
        return sendable, numbers

    def _settle_answered(self, answered: Answered) -> list[Awaitable[None]]:
        steps: list[Awaitable[None]] = []
        if answered.accepted:
            jobs = [job for job, _ in answered.accepted]
            accepted = self._settling.accepted(answered.provider, answered.accepted)
            steps.append(self._finish(jobs, accepted))
        if answered.failing_over:
            steps.append(self._fail_over(answered.failing_over))
        if answered.given_up:
            jobs = [job for job, _ in answered.given_up]
            steps.append(self._finish(jobs, self._settling.given_up(answered.given_up)))
        return steps

    async def _fail_over(self, jobs: list[Job]) -> None:
        try:
            await self._settling.failing_over(jobs)
        except Exception as exc:
            self._interrupted(jobs, exc)
            return
        for job in jobs:
            self._queue_send(job)

    async def _finish(self, jobs: list[Job], settling: Awaitable[None]) -> None:
        """The jobs leave the stages once `settling` is written; when Redis or Kafka is away,
        the worker's periodic rescan tries them again."""
        try:
            await settling
        except Exception as exc:
            self._interrupted(jobs, exc)
        else:
            self._done(jobs)

    # --- bookkeeping ------------------------------------------------------------------------

    async def _linger(self, queue: deque[Job]) -> None:
        if len(queue) < self._batch_size and self.settings.batch_linger_seconds > 0:
            await asyncio.sleep(self.settings.batch_linger_seconds)

    def _done(self, jobs: list[Job]) -> None:
        now = time.monotonic()
        for job in jobs:
            self._mark_done(job.message.key, now)
            self._release(job)
        self._forget_done(now)

    def _mark_done(self, key: str, now: float) -> None:
        self.recently_done[key] = now
        self.recently_done.move_to_end(key)

    def _forget_done(self, now: float) -> None:
        """Drop what was done longer than RECENT_SECONDS ago: the oldest, and only those."""
        cutoff = now - RECENT_SECONDS
        done = self.recently_done
        while done and next(iter(done.values())) <= cutoff:
            done.popitem(last=False)

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
