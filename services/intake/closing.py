"""When a dossier's story is over, for the retention of its personal data (CONTRACT section
10). Pure.

A dossier is closed once it is withdrawn or rejected (at that event), or once it is resolved and
its result returned (at the later of the two). Its data key is destroyed
`MOTCUA_PII_RETENTION_DAYS` after that moment (`due`). Moments are the events' own `time`
(event time), so reading the history again gives the same answer. "Now" is the wall clock in
service; a replay of history takes the `HistoryClock` instead (`MOTCUA_PII_RETENTION_CLOCK`).
"""

from __future__ import annotations

from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta


@dataclass
class Story:
    """What the retention needs of one dossier's events."""

    resolved_at: datetime | None = None
    returned_at: datetime | None = None
    ended_at: datetime | None = None  # withdrawn or rejected

    @property
    def closed_at(self) -> datetime | None:
        if self.ended_at is not None:
            return self.ended_at
        if self.resolved_at is not None and self.returned_at is not None:
            return max(self.resolved_at, self.returned_at)
        return None


@dataclass
class Stories:
    """Every dossier's `Story`, folded from `dossier.events` (type, dossier id, event time)."""

    by_dossier: dict[str, Story] = field(default_factory=dict)

    def add(self, kind: str, dossier_id: str, at: datetime) -> None:
        if kind not in CLOSING_TYPES:
            return
        story = self.by_dossier.setdefault(dossier_id, Story())
        if kind == "dossier.resolved":
            story.resolved_at = max(story.resolved_at or at, at)
        elif kind == "dossier.result_returned":
            story.returned_at = max(story.returned_at or at, at)
        else:
            story.ended_at = min(story.ended_at or at, at)

    def keep(self, dossier_ids: Container[str]) -> None:
        """Forget every dossier not in `dossier_ids` (those whose key is gone)."""
        self.by_dossier = {d: s for d, s in self.by_dossier.items() if d in dossier_ids}

    def closed(self) -> Mapping[str, datetime]:
        return {
            dossier_id: closed_at
            for dossier_id, story in self.by_dossier.items()
            if (closed_at := story.closed_at) is not None
        }


@dataclass
class HistoryClock:
    """The "now" of a replayed history: the latest closing moment read (`read`), whichever
    dossier it is of; None until one is read, and then nothing is due."""

    now: datetime | None = None

    def read(self, at: datetime) -> None:
        if self.now is None or at > self.now:
            self.now = at


CLOSING_TYPES = frozenset(
    {"dossier.resolved", "dossier.result_returned", "dossier.withdrawn", "dossier.rejected"}
)


def due(closed: Mapping[str, datetime], now: datetime, retention: timedelta) -> list[str]:
    """The dossiers closed at least `retention` before `now`, in a stable order."""
    return sorted(d for d, closed_at in closed.items() if closed_at + retention <= now)


def due_with_keys(
    closed: Mapping[str, datetime], live: Iterable[str], now: datetime, retention: timedelta
) -> list[str]:
    """Of the dossiers whose key is still there (`live`), those whose key is due for
    destruction."""
    alive = set(live)
    return [d for d in due(closed, now, retention) if d in alive]
