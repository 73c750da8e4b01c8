"""Keys by the moment something is due for them: a heap with lazy deletion, so that finding what
is due is O(log n) per due key, never a scan of every key.

Used for what must happen to a dossier at a moment of (event or wall) time: the overdue
announcement of metrics, and the retirement of a dossier whose story is over for a service (its
state leaves memory and the changelog once its grace period has passed). The index holds only
keys and moments; the caller re-checks the key's current state after popping it.
"""

from __future__ import annotations

import heapq
from datetime import datetime


class DueIndex:
    """key → the moment it is due; `pop_due(clock)` hands out each key due before `clock` once."""

    def __init__(self) -> None:
        self._heap: list[tuple[datetime, str]] = []
        self._due: dict[str, datetime] = {}

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def due_at(self, key: str) -> datetime | None:
        return self._due.get(key)

    def set(self, key: str, at: datetime | None) -> None:
        """`key` is due at `at` (replacing any earlier moment); None: nothing is due for it."""
        if at is None:
            self._due.pop(key, None)
        elif self._due.get(key) != at:
            self._due[key] = at
            heapq.heappush(self._heap, (at, key))
        if len(self._heap) > 2 * len(self._due) + 64:
            self._compact()

    def pop_due(self, clock: datetime, most: int | None = None) -> list[str]:
        """The keys due before `clock` (the `most` due earliest, when given), each once, in
        order of their moments; they leave, the others stay due."""
        out: list[str] = []
        while self._heap and self._heap[0][0] < clock and (most is None or len(out) < most):
            at, key = heapq.heappop(self._heap)
            if self._due.get(key) == at:
                del self._due[key]
                out.append(key)
        return out

    def pop_beyond(self, most: int, clock: datetime) -> list[str]:
        """While more than `most` keys are held, the key due earliest leaves if it is due before
        `clock`: those keys, each once, in order of their moments."""
        out: list[str] = []
        while len(self._due) > most and self._heap and self._heap[0][0] < clock:
            at, key = heapq.heappop(self._heap)
            if self._due.get(key) == at:
                del self._due[key]
                out.append(key)
        return out

    def clear(self) -> None:
        self._heap.clear()
        self._due.clear()

    def _compact(self) -> None:
        """Drop the entries that were replaced or removed, so the heap follows the live keys."""
        self._heap = [(at, key) for key, at in self._due.items()]
        heapq.heapify(self._heap)
