"""Where one message goes next after a provider answered: retry, fail over, or give up. Pure.

A definite failure (5xx, 429, refused connection) is retried on the same provider up to
`attempts_per_provider` times with backoff, then the next provider in the failover order is
tried. A rejection (4xx) fails over at once. A timeout is ambiguous (the provider may have
accepted): the same provider is asked again, with the same idempotency key, up to
`ambiguous_attempts` times before failing over, because another provider would send a second copy.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import StrEnum


class Failure(StrEnum):
    """How a call to a provider failed, as far as one message is concerned."""

    AMBIGUOUS = "timeout"  # the request may have reached the provider
    UNAVAILABLE = "unavailable"  # it certainly was not accepted; worth another try
    REJECTED = "rejected"  # it never will be accepted


@dataclass(frozen=True)
class RetryRules:
    attempts_per_provider: int = 3
    ambiguous_attempts: int = 8
    backoff_base_seconds: float = 0.1
    backoff_max_seconds: float = 3.0

    def backoff(self, tries: int, rand: Callable[[], float] = random.random) -> float:
        """Exponential backoff with jitter (half to all of the ceiling) before the next try."""
        ceiling = min(self.backoff_max_seconds, self.backoff_base_seconds * 2**tries)
        return float(ceiling * (0.5 + rand() / 2))


@dataclass(frozen=True)
class Attempt:
    """Where a message stands: the providers in failover order, and tries on the current one."""

    order: tuple[str, ...]
    index: int = 0
    tries: int = 0  # calls to the current provider so far
    ambiguous: bool = False  # a call to the current provider timed out
    total: int = 0  # calls to every provider so far

    def __post_init__(self) -> None:
        if not self.order or not 0 <= self.index < len(self.order):
            raise ValueError("an attempt needs a provider")

    @property
    def provider(self) -> str:
        return self.order[self.index]


@dataclass(frozen=True)
class Retry:
    attempt: Attempt
    delay: float


@dataclass(frozen=True)
class FailOver:
    attempt: Attempt  # already pointing at the next provider
    away_from: str


@dataclass(frozen=True)
class GiveUp:
    attempt: Attempt
    away_from: str


Step = Retry | FailOver | GiveUp


def after_failure(
    attempt: Attempt,
    failure: Failure,
    rules: RetryRules,
    rand: Callable[[], float] = random.random,
) -> Step:
    """The next step for a message whose call to `attempt.provider` failed with `failure`."""
    tries = attempt.tries + 1
    ambiguous = attempt.ambiguous or failure is Failure.AMBIGUOUS
    counted = replace(attempt, tries=tries, ambiguous=ambiguous, total=attempt.total + 1)
    limit = rules.ambiguous_attempts if ambiguous else rules.attempts_per_provider
    if (failure is Failure.REJECTED and not ambiguous) or tries >= limit:
        if attempt.index + 1 >= len(attempt.order):
            return GiveUp(counted, away_from=attempt.provider)
        moved = replace(counted, index=attempt.index + 1, tries=0, ambiguous=False)
        return FailOver(moved, away_from=attempt.provider)
    return Retry(counted, rules.backoff(tries, rand))


def first_provider(order: tuple[str, ...], held: str, known: frozenset[str]) -> tuple[str, ...]:
    """A claim held as `p:<provider>` (outcome unknown after a crash) puts that provider first:
    the same provider, asked with the same key, answers "replayed" if it had the message."""
    if held.startswith("p:") and held[2:] in known:
        first = held[2:]
        return (first, *(name for name in order if name != first))
    return order
