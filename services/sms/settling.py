"""The end of a message's way through the sender: what became of it, written down.

- Accepted: the claims become `s:<provider>` (one pipeline), `sms.sent` is published.
- Given up: the claims become `f:<reason>`, the original events go to their topics' DLQs with the
  reason, `sms.failed` is published.
- Failing over: the claims name the next provider (`p:<provider>`) before it is called.
- Erased (the dossier's personal data, hence its number, is gone: CONTRACT section 10): the
  claims become `f:erased`, `sms.suppressed` with reason `erased` is published.
- Unopened (a sealed number that does not open): like given up, without a provider.

Either way of leaving the stages, the news is handed to the records (`Settled`, through the
worker's `settle` callback). An outcome is announced once: the keys whose `sms.sent` /
`sms.failed` this worker published, or found published on restore (`announced_before`), are
remembered, and a claim found settled later (`sent_before`, `failed_before`: the settle news was
lost, not the announcement) hands the records the news without announcing it again.

Every step returns once its writes are acknowledged and raises when Redis or the broker is
away: the sender then leaves the message to the worker's rescan.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis

from services.common.events import CloudEvent
from services.common.latest import LatestKeys
from services.common.logging import get_logger
from services.sms.admission import Job
from services.sms.counters import FAILED, SEGMENTS, SENT, STAGE_SECONDS, SUPPRESSED
from services.sms.delivery import DeliveryStatus
from services.sms.events import message_event, send_failed_event, sent_event
from services.sms.partner import Accepted, GatewayError
from services.sms.record import Pending

log = get_logger("motcua.sms.sender")

ERASED = "erased"


def failed_event(
    message: Pending, reason: str, provider: str | None, now: datetime
) -> CloudEvent[Any]:
    """What a message that went nowhere is announced as: `sms.suppressed` when its dossier's
    personal data was erased, else `sms.failed`."""
    if reason == ERASED:
        return message_event("sms.suppressed", message, now, reason=ERASED)
    return send_failed_event(message, reason, provider, now)


@dataclass(frozen=True)
class Settled:
    """News for the records: a message left `pending` (accepted, or given up)."""

    message: Pending
    provider: str | None
    status: DeliveryStatus


Publish = Callable[[Sequence[CloudEvent[Any]]], Awaitable[None]]  # returns once all are acked
DeadLetter = Callable[[Pending, str, int], Awaitable[None]]
Settle = Callable[[Sequence[Settled]], Awaitable[None]]  # returns once durably handed over

# Keys whose outcome was announced, remembered at most (the oldest are forgotten first). They
# spare a second `sms.sent`/`sms.failed` (same id: harmless, only more) when a message is met
# again before its settle news is folded (a rescan, every 30 s): a minute of sending at 500 a
# second, at about 190 bytes a key (5.4 MiB; 100,000 held 17.7 MiB).
ANNOUNCED_KEPT = 30_000


class Settling:
    def __init__(
        self,
        redis: aioredis.Redis,
        claim_ttl_seconds: int,
        publish: Publish,
        dead_letter: DeadLetter,
        settle: Settle,
    ) -> None:
        self.redis = redis
        self.claim_ttl_seconds = claim_ttl_seconds
        self._publish = publish
        self._dead_letter = dead_letter
        self._settle = settle
        self._announced: LatestKeys[str] = LatestKeys(ANNOUNCED_KEPT)  # outcome published

    def announced(self, key: str) -> bool:
        return key in self._announced

    def _remember(self, keys: Sequence[str]) -> None:
        self._announced.add(keys)

    async def accepted(self, provider: str, accepted: list[tuple[Job, Accepted]]) -> None:
        started = time.perf_counter()
        await self._set_claims([(job, f"s:{provider}") for job, _ in accepted])
        now = datetime.now(UTC)
        events = []
        for job, outcome in accepted:
            message = job.message
            SENT.labels(message.template, provider).inc()
            SEGMENTS.labels(message.template, provider).inc(message.segments)
            events.append(sent_event(message, provider, outcome.message_id, now))
        await self._publish(events)
        self._remember([job.message.key for job, _ in accepted])
        sent = DeliveryStatus.SENT
        await self._settle([Settled(job.message, provider, sent) for job, _ in accepted])
        STAGE_SECONDS.labels("publish").observe(time.perf_counter() - started)

    async def failing_over(self, jobs: list[Job]) -> None:
        """The claims name the provider about to be called, before it is called."""
        await self._set_claims([(job, f"p:{job.attempt.provider}") for job in jobs])

    async def given_up(self, given_up: list[tuple[Job, GatewayError]]) -> None:
        reasons = [f"send_failed: {error}" for _, error in given_up]
        await self._set_claims(
            [(job, f"f:{reason}") for (job, _), reason in zip(given_up, reasons, strict=True)]
        )
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
            events.append(send_failed_event(message, reason, error.provider, now))
        await self._publish(events)
        self._remember([job.message.key for job, _ in given_up])
        failed = DeliveryStatus.PERMANENT_FAILURE
        await self._settle(
            [Settled(job.message, error.provider, failed) for job, error in given_up]
        )

    async def erased(self, jobs: list[Job]) -> None:
        await self._set_claims([(job, f"f:{ERASED}") for job in jobs])
        now = datetime.now(UTC)
        for job in jobs:
            SUPPRESSED.labels(job.message.template, ERASED).inc()
        await self._publish([failed_event(job.message, ERASED, None, now) for job in jobs])
        self._remember([job.message.key for job in jobs])
        failed = DeliveryStatus.PERMANENT_FAILURE
        await self._settle([Settled(job.message, None, failed) for job in jobs])

    async def unopened(self, jobs: list[tuple[Job, str]]) -> None:
        await self._set_claims([(job, f"f:{reason}") for job, reason in jobs])
        now = datetime.now(UTC)
        events = []
        for job, reason in jobs:
            message = job.message
            FAILED.labels(message.template, "", "unopened").inc()
            log.warning(
                "sms_number_unopened",
                dossier_id=message.dossier_id,
                template=message.template,
                reason=reason,
            )
            await self._dead_letter(message, reason, job.attempt.total)
            events.append(send_failed_event(message, reason, None, now))
        await self._publish(events)
        self._remember([job.message.key for job, _ in jobs])
        failed = DeliveryStatus.PERMANENT_FAILURE
        await self._settle([Settled(job.message, None, failed) for job, _ in jobs])

    async def sent_before(self, found: list[tuple[Job, str]]) -> None:
        """Accepted before (the claim said so): `sms.sent` again unless it is known to have been
        published, then the news for the records."""
        now = datetime.now(UTC)
        untold = [(job, p) for job, p in found if not self.announced(job.message.key)]
        if untold:
            await self._publish([sent_event(job.message, p, "", now) for job, p in untold])
            self._remember([job.message.key for job, _ in untold])
        sent = DeliveryStatus.SENT
        await self._settle([Settled(job.message, p, sent) for job, p in found])

    async def failed_before(self, found: list[tuple[Job, str]]) -> None:
        """Given up before (the claim said so): `sms.failed` again unless it is known to have
        been published, then the news for the records."""
        now = datetime.now(UTC)
        untold = [(job, r) for job, r in found if not self.announced(job.message.key)]
        if untold:
            await self._publish([failed_event(job.message, r, None, now) for job, r in untold])
            self._remember([job.message.key for job, _ in untold])
        failed = DeliveryStatus.PERMANENT_FAILURE
        await self._settle([Settled(job.message, None, failed) for job, _ in found])

    async def announced_before(self, found: list[tuple[str, str, Settled]]) -> None:
        """Outcomes found published, each with its claim key and what the claim says
        (`s:<provider>`, `f:<reason>`): the claims are written again (Redis may have lost
        them), and the news handed to the records; nothing is sent or announced."""
        pipe = self.redis.pipeline(transaction=False)
        for claim_key, claim, _ in found:
            pipe.set(claim_key, claim, ex=self.claim_ttl_seconds)
        await pipe.execute()
        self._remember([settled.message.key for _, _, settled in found])
        await self._settle([settled for _, _, settled in found])

    async def _set_claims(self, claims: list[tuple[Job, str]]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for job, value in claims:
            pipe.set(job.claim_key, value, ex=self.claim_ttl_seconds)
        await pipe.execute()
