"""When a dossier's story is over, for the retention of its personal data (CONTRACT section
10). Pure.

A dossier is closed once it is withdrawn or rejected (at that event), or once it is resolved and
its result returned (at the later of the two). Its data key is destroyed
`MOTCUA_PII_RETENTION_DAYS` after that moment (`due`). Moments are the events' own `time`
(event time), so reading the history again gives the same answer. "Now" is the wall clock in
service; a replay of history takes the `HistoryClock` instead (`MOTCUA_PII_RETENTION_CLOCK`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta


@dataclass(slots=True)
class Story:
    """What the retention needs of a dossier not closed yet: resolved or returned so far."""

    resolved_at: datetime | None = None
    returned_at: datetime | None = None


@dataclass
class Stories:
    """When each dossier closed, folded from `dossier.events` (type, dossier id, event time), in
    any order. A closed dossier costs its moment only: withdrawn or rejected ones their first
    such event (`ended`, which wins over anything else), resolved and returned ones the latest
    of those events (`done`, a later resolution or return moves it); the rest their `Story`."""

    open: dict[str, Story] = field(default_factory=dict)
    done: dict[str, datetime] = field(default_factory=dict)
    ended: dict[str, datetime] = field(default_factory=dict)

    def add(self, kind: str, dossier_id: str, at: datetime) -> None:
        if kind not in CLOSING_TYPES:
            return
        if kind in ENDING_TYPES:
            first = self.ended.get(dossier_id)
            self.ended[dossier_id] = at if first is None else min(first, at)
            self.open.pop(dossier_id, None)
            self.done.pop(dossier_id, None)
            return
        if dossier_id in self.ended:
            return
        if (latest := self.done.get(dossier_id)) is not None:
            self.done[dossier_id] = max(latest, at)
            return
        story = self.open.setdefault(dossier_id, Story())
        if kind == "dossier.resolved":
            story.resolved_at = max(story.resolved_at or at, at)
        else:
            story.returned_at = max(story.returned_at or at, at)
        if story.resolved_at is not None and story.returned_at is not None:
            self.done[dossier_id] = max(story.resolved_at, story.returned_at)
            del self.open[dossier_id]

    def closed(self) -> Mapping[str, datetime]:
        return {**self.done, **self.ended}


@dataclass
class HistoryClock:
    """The "now" of a replayed history: the latest closing moment read (`read`), whichever
    dossier it is of; None until one is read, and then nothing is due."""

    now: datetime | None = None

    def read(self, at: datetime) -> None:
        if self.now is None or at > self.now:
            self.now = at


ENDING_TYPES = frozenset({"dossier.withdrawn", "dossier.rejected"})
CLOSING_TYPES = frozenset({"dossier.resolved", "dossier.result_returned", *ENDING_TYPES})


def due(closed: Mapping[str, datetime], now: datetime, retention: timedelta) -> list[str]:
    """The dossiers closed at least `retention` before `now`, in a stable order."""
    return sorted(d for d, closed_at in closed.items() if closed_at + retention <= now)
