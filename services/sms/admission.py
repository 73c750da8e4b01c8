"""Stage 1 of sending: claim each message and reserve its tokens, one Redis round trip per batch.

Each message's idempotency key is claimed *before* anyone is called, recording the provider about
to be called (`p:<provider>`), and a token is reserved from the message's per-number bucket and
the global bucket (`coordination.ClaimGate`). What the claim held before says where the message
stands:

- `s:<provider>`: accepted before, only the news for the record was lost (`sms.sent` is announced
  again unless this worker knows it was published: `settling.Settling.announced`);
- `f:<reason>`: given up before (likewise `sms.failed`);
- `p:<provider>`: the outcome is unknown, so that provider is asked again first, with the same
  key (it answers "replayed" if it had the message);
- nothing: a new message, or one whose claim Redis lost: its first provider is drawn from its
  key (`providers.key_point`), so a message sent before goes to the gateway that had it.

A message that must wait for its tokens goes when they are there: delayed, never dropped.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from services.common.coordination import ClaimGate, Keys, Ticket, TokenBucket
from services.sms.attempts import Attempt, first_provider
from services.sms.counters import BATCH_SIZE, STAGE_SECONDS
from services.sms.partner import OutboundSms
from services.sms.record import Pending
from services.sms.settings import SmsSettings


@dataclass
class Job:
    """One message on its way through the stages."""

    message: Pending
    attempt: Attempt
    claim_key: str
    since: float  # perf_counter when it entered its current stage

    def outbound(self, sender: str, to: str | None = None) -> OutboundSms:
        """The message for the provider, to `to` (its number opened for this call) or else to
        the number it holds."""
        message = self.message
        return OutboundSms(
            to=message.to if to is None else to,
            text=message.text,
            sender=sender,
            reference=message.key,
            dossier_id=message.dossier_id,
            template=message.template,
        )


@dataclass
class Admitted:
    """A batch after its claims: what goes to a provider, and what was settled before."""

    go: list[tuple[Job, float]] = field(default_factory=list)  # (job, seconds to wait)
    sent_before: list[tuple[Job, str]] = field(default_factory=list)  # (job, provider)
    failed_before: list[tuple[Job, str]] = field(default_factory=list)  # (job, reason)


class Admission:
    """The claims and token buckets every worker shares (in Redis)."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, settings: SmsSettings) -> None:
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

    async def admit(self, batch: list[Job], providers: frozenset[str]) -> Admitted:
        """Claim and take tokens for `batch`; a job that goes has its provider order set
        (`p:<provider>` held before puts that provider first)."""
        started = time.perf_counter()
        for job in batch:
            STAGE_SECONDS.labels("queue").observe(started - job.since)
        tickets = [
            Ticket(job.claim_key, f"p:{job.attempt.provider}", (number_id(job.message.to), "all"))
            for job in batch
        ]
        admissions = await self._gate.admit(tickets)
        now = time.perf_counter()
        STAGE_SECONDS.labels("claim").observe(now - started)
        BATCH_SIZE.labels("claim").observe(len(batch))
        admitted = Admitted()
        for job, admission in zip(batch, admissions, strict=True):
            held = admission.held
            if held.startswith("s:"):  # accepted before a crash: only the news was lost
                admitted.sent_before.append((job, held[2:]))
                continue
            if held.startswith("f:"):
                admitted.failed_before.append((job, held[2:] or "send_failed"))
                continue
            order = first_provider(job.attempt.order, held, providers)
            if order != job.attempt.order:
                job.attempt = Attempt(order)
            STAGE_SECONDS.labels("rate_limit").observe(admission.wait)
            job.since = now
            admitted.go.append((job, admission.wait))
        return admitted


def number_id(e164: str) -> str:
    """Bucket names never hold a number in clear."""
    return hashlib.sha256(e164.encode()).hexdigest()[:24]
