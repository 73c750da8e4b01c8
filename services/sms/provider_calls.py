"""Stage 2 of sending: one call to a provider with a batch (`POST /v1/messages/batch`, a key per
message), and where each message goes next.

Each message's outcome decides its next step (`attempts.after_failure`): retry after backoff,
fail over (to the next provider of its order), or give up. Weight moves away from a provider
that failed, or that was slow while accepting.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from services.common import tracing
from services.sms.admission import Job
from services.sms.attempts import FailOver, GiveUp, Retry, RetryRules, after_failure
from services.sms.counters import (
    BATCH_SIZE,
    FAILOVERS,
    PROVIDER_CALLS,
    PROVIDER_SECONDS,
    STAGE_SECONDS,
)
from services.sms.partner import Accepted, GatewayError, SmsGateway


@dataclass
class Answered:
    """One call's messages, sorted by their next step."""

    provider: str
    seconds: float
    accepted: list[tuple[Job, Accepted]] = field(default_factory=list)
    retry: list[tuple[Job, float]] = field(default_factory=list)  # (job, seconds to wait)
    failing_over: list[Job] = field(default_factory=list)  # their attempt names the next one
    given_up: list[tuple[Job, GatewayError]] = field(default_factory=list)
    # providers to move weight away from, in the order their failures came
    away_from: list[str] = field(default_factory=list)


async def call_provider(
    gateway: SmsGateway,
    batch: list[Job],
    *,
    sender: str,
    rules: RetryRules,
    slow_seconds: float,
    numbers: Mapping[str, str] | None = None,
) -> Answered:
    """Offer `batch` to `gateway`; every job's attempt moves on by what became of it.
    `numbers`: each message's number opened for this call (by message key)."""
    provider = gateway.name
    started = time.perf_counter()
    opened = numbers or {}
    with tracing.span_under(
        f"sms send {provider}",
        tracing.contexts_in(job.message.origin for job in batch),
        attributes={"sms.provider": provider, "sms.batch_size": len(batch)},
    ):
        outcomes = await gateway.send_batch(
            [(job.outbound(sender, opened.get(job.message.key)), job.message.key) for job in batch]
        )
    seconds = time.perf_counter() - started
    STAGE_SECONDS.labels("send").observe(seconds)
    PROVIDER_SECONDS.labels(provider).observe(seconds)
    BATCH_SIZE.labels("send").observe(len(batch))
    answered = Answered(provider, seconds)
    for job, outcome in zip(batch, outcomes, strict=True):
        if isinstance(outcome, Accepted):
            PROVIDER_CALLS.labels(provider, "replayed" if outcome.replayed else "accepted").inc()
            answered.accepted.append((job, outcome))
            continue
        PROVIDER_CALLS.labels(provider, outcome.failure.value).inc()
        step = after_failure(job.attempt, outcome.failure, rules)
        job.attempt = step.attempt
        if isinstance(step, Retry):
            answered.retry.append((job, step.delay))
        elif isinstance(step, FailOver):
            FAILOVERS.labels(step.away_from).inc()
            answered.away_from.append(step.away_from)
            answered.failing_over.append(job)
        else:
            assert isinstance(step, GiveUp)
            answered.away_from.append(step.away_from)
            answered.given_up.append((job, outcome))
    if answered.accepted and seconds > slow_seconds:
        answered.away_from.append(provider)
    return answered
