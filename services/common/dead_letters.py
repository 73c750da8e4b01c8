"""What a consumer does with a message that fails: retry it, or give it up as a dead letter.

Pure: the retry schedule, the marker exception for messages that can never succeed, and the
headers of CONTRACT section 3 that a dead letter carries beside the original bytes. The one
consumer that applies them is `services.common.consumer.BatchConsumer`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime


class PoisonMessage(Exception):
    """Raised for a message that can never succeed: dead-lettered at once, without retries."""


@dataclass(frozen=True)
class RetrySchedule:
    """How often a handler is retried on one message before it is dead-lettered."""

    attempts: int = 3
    base_delay: float = 0.2

    def delay(self, attempt: int) -> float:
        return float(self.base_delay * (2 ** (attempt - 1)))


def dead_letter_headers(
    error: BaseException, attempts: int, *, now: datetime | None = None
) -> dict[str, bytes]:
    """The headers of CONTRACT section 3, added to the original bytes of a dead letter."""
    return {
        "error": str(error)[:1000].encode(),
        "error_type": type(error).__name__.encode(),
        "attempts": str(attempts).encode(),
        "failed_at": (now or datetime.now(UTC)).isoformat().encode(),
    }
