"""Backoff of the partner client, pure."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from services.common.partner import RetryPolicy, idempotency_key


@given(attempt=st.integers(min_value=1, max_value=30), r=st.floats(min_value=0, max_value=1))
def test_delay_is_full_jitter_under_an_exponential_ceiling(attempt: int, r: float) -> None:
    policy = RetryPolicy(attempts=5, base_delay=0.1, max_delay=3.0)
    delay = policy.delay(attempt, rand=lambda: r)
    assert 0 <= delay <= min(3.0, 0.1 * 2 ** (attempt - 1))


def test_idempotency_key_is_stable_and_distinct() -> None:
    key = idempotency_key("portal/dev", "e-1", "order")
    assert key == idempotency_key("portal/dev", "e-1", "order")
    assert key != idempotency_key("portal/dev", "e-1", "sms")
    assert key != idempotency_key("portal/dev", "e-2", "order")
    assert key != idempotency_key("portal/dev2", "e-1", "order")
