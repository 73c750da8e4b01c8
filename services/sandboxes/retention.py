"""How long a sandbox keeps an order or message once it is finished (nothing left to send or to
walk). Pure.

It is kept `seconds` after its last change (`SANDBOX_RETAIN_SECONDS`). Beyond `most` finished
ones (`SANDBOX_RETAIN_FINISHED`), the longest finished go earlier, but never less than
`min_seconds` after their last change (`SANDBOX_RETAIN_MIN_SECONDS`), so a client's retry with the
same reference still finds it: postal sends a booking again at its next scan (every 5 minutes),
the SMS sender asks a gateway again within seconds, or after a restart within a minute.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from services.common.due import DueIndex
from services.common.settings import Settings


@dataclass(frozen=True)
class Retention:
    seconds: float = 86400.0
    most: int | None = None  # None: no bound on the count
    min_seconds: float = 900.0

    @classmethod
    def of(cls, settings: Settings) -> Retention:
        return cls(
            settings.sandbox_retain_seconds,
            settings.sandbox_retain_finished,
            settings.sandbox_retain_min_seconds,
        )

    def due(self, changed_at: datetime) -> datetime:
        """When something finished that last changed at `changed_at` is forgotten."""
        return changed_at + timedelta(seconds=self.seconds)

    def forget(self, finished: DueIndex, now: datetime) -> list[str]:
        """The keys to forget now, out of `finished` (each due at `due` of its last change)."""
        out = finished.pop_due(now)
        if self.most is not None:
            # due before now + seconds - min_seconds: changed more than min_seconds ago
            early = now + timedelta(seconds=self.seconds - self.min_seconds)
            out += finished.pop_beyond(self.most, early)
        return out
