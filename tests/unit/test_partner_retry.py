"""Backoff of the partner client, pure."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.common.partner import RetryPolicy, idempotency_key


@given(attempt=st.integers(min_value=1, max_value=30), r=st.floats(min_value=0, max_value=1))
def test_delay_is_full_jitter_under_an_exponential_ceiling(attempt: int, r: float) -> None:
    policy = RetryPolicy(attempts=5, base_delay=0.1, max_delay=3.0)
    ceiling = min(3.0, 0.1 * 2 ** (attempt - 1))
    assert policy.delay(attempt, rand=lambda: r) == ceiling * r  # the draw scales the ceiling
    assert policy.delay(attempt, rand=lambda: 1.0) == ceiling  # and the top draw reaches it


def test_the_ceiling_doubles_until_the_cap() -> None:
    policy = RetryPolicy(attempts=5, base_delay=0.1, max_delay=3.0)
    tops = [policy.delay(attempt, rand=lambda: 1.0) for attempt in range(1, 9)]
    assert tops == [0.1, 0.2, 0.4, 0.8, 1.6, 3.0, 3.0, 3.0]


def test_idempotency_key_is_stable_and_distinct() -> None:
    key = idempotency_key("portal/dev", "e-1", "order")
    assert key == idempotency_key("portal/dev", "e-1", "order")
    assert key != idempotency_key("portal/dev", "e-1", "sms")
    assert key != idempotency_key("portal/dev", "e-2", "order")
    assert key != idempotency_key("portal/dev2", "e-1", "order")
