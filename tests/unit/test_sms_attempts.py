"""Where a message goes after a provider failed: retries, failover and giving up, as pure
properties (no provider is ever asked twice after failing over, a timeout never fails over early,
every message ends in a bounded number of calls); and where the sender's settle batches land."""

from __future__ import annotations

from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given
from hypothesis import strategies as st

from services.common.kafka import dossier_partition
from services.sms.attempts import (
    Attempt,
    FailOver,
    Failure,
    GiveUp,
    Retry,
    RetryRules,
    Step,
    after_failure,
    first_provider,
)

RULES = RetryRules(attempts_per_provider=3, ambiguous_attempts=8, backoff_base_seconds=0.1)
ORDER = ("primary", "secondary")


def run(failures: list[Failure], rules: RetryRules = RULES) -> list[Step]:
    """Feed failures until the message is given up or the failures run out."""
    attempt = Attempt(ORDER)
    steps: list[Step] = []
    for failure in failures:
        step = after_failure(attempt, failure, rules, rand=lambda: 0.5)
        steps.append(step)
        attempt = step.attempt
        if isinstance(step, GiveUp):
            break
    return steps


def test_a_definite_failure_is_retried_then_fails_over_then_gives_up() -> None:
    steps = run([Failure.UNAVAILABLE] * 10)
    kinds = [type(s).__name__ for s in steps]
    assert kinds == ["Retry", "Retry", "FailOver", "Retry", "Retry", "GiveUp"]
    assert isinstance(steps[2], FailOver) and steps[2].attempt.provider == "secondary"
    assert steps[-1].attempt.total == 6


def test_a_rejection_fails_over_at_once() -> None:
    [step] = run([Failure.REJECTED])[:1]
    assert isinstance(step, FailOver) and step.away_from == "primary"


def test_a_timeout_keeps_asking_the_same_provider_before_failing_over() -> None:
    steps = run([Failure.AMBIGUOUS] + [Failure.REJECTED] * 20)
    first_failover = next(i for i, s in enumerate(steps) if isinstance(s, FailOver))
    assert first_failover == RULES.ambiguous_attempts - 1  # a 4xx after a timeout is no proof
    assert all(s.attempt.provider == "primary" for s in steps[:first_failover])


def test_backoff_grows_and_is_capped() -> None:
    rules = RetryRules(backoff_base_seconds=0.1, backoff_max_seconds=0.5)
    delays = [rules.backoff(tries, rand=lambda: 1.0) for tries in range(1, 8)]
    assert delays == sorted(delays) and max(delays) == 0.5 and delays[0] == 0.2


@given(st.lists(st.sampled_from(list(Failure)), min_size=1, max_size=40))
def test_every_message_ends_within_bounded_calls_and_never_goes_back(
    failures: list[Failure],
) -> None:
    steps = run(failures)
    indexes = [s.attempt.index for s in steps]
    assert indexes == sorted(indexes)  # failover only moves forward
    limit = len(ORDER) * max(RULES.attempts_per_provider, RULES.ambiguous_attempts)
    assert steps[-1].attempt.total == len(steps) <= limit
    for step in steps:
        if isinstance(step, Retry):
            assert 0 < step.delay <= RULES.backoff_max_seconds
        if isinstance(step, GiveUp):
            assert step.attempt.index == len(ORDER) - 1


def test_a_claim_of_unknown_outcome_puts_its_provider_first() -> None:
    known = frozenset(ORDER)
    assert first_provider(ORDER, "p:secondary", known) == ("secondary", "primary")
    assert first_provider(ORDER, "p:primary", known) == ORDER
    assert first_provider(ORDER, "", known) == ORDER
    assert first_provider(ORDER, "p:gone", known) == ORDER


@given(st.text(min_size=1, max_size=60), st.integers(min_value=1, max_value=64))
def test_settle_batches_go_to_the_partition_the_producers_gave_the_dossier(
    dossier_id: str, partitions: int
) -> None:
    key = dossier_id.encode()
    every = list(range(partitions))
    assert dossier_partition(key, partitions) == DefaultPartitioner()(key, every, every)
