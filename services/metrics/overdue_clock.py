"""The overdue clock of a dossier, which pauses while the applicant owes documents. Pure.

A dossier's clock runs from its receipt (`dossier.received`, due at its `due_at`) to its first
closing event (resolved, withdrawn, rejected). `dossier.supplement_requested` stops it: the
applicant owes documents, so the dossier is neither overdue nor a reason for an apology.
`dossier.supplement_received` starts it again, due at the `new_due_at` it carries, or, without
one, at the due date moved by the working days the clock stood still
(`working_days_between(requested, received)` working days later, same time of day: a request on
Friday answered on Tuesday moves a Thursday 09:00 due date to the next Tuesday 09:00).

The clock is kept in event time (each event's `time`): the dossier is overdue over every stretch
where the clock runs and its due date has passed. Those stretches are what the metrics count as
`overdue_open` (their starts and ends are gauge flows).

The classification of a resolved dossier (CONTRACT section 2) is a separate date:
`classification_due`, the `due_at` of the receipt or the `new_due_at` of the latest
`dossier.supplement_received` that carries one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

from services.metrics.calendar import add_working_days, working_days_between

REQUESTED = "dossier.supplement_requested"
RECEIVED_BACK = "dossier.supplement_received"


@dataclass(frozen=True, slots=True)
class ClockEvent:
    """A supplement event as the clock sees it: its event time, the moment it names
    (`requested_at` / `received_at`, else its time) and a `new_due_at` (received back only)."""

    type: str
    time: datetime
    at: datetime
    new_due_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Clock:
    """Where a dossier's clock stands after its events."""

    due_at: datetime  # the due date the clock runs (or will run again) to
    waiting: bool  # stopped: the applicant owes documents
    overdue: tuple[tuple[datetime, datetime | None], ...]  # [start, end) in event time


def moved_due(
    due_at: datetime,
    requested_at: datetime,
    received_at: datetime,
    shift: Callable[[datetime, int], datetime] = add_working_days,
    between: Callable[[datetime, datetime], int] = working_days_between,
) -> datetime:
    """The due date after a pause without `new_due_at`: later by the working days paused."""
    paused = between(requested_at, received_at)
    return shift(due_at, paused) if paused > 0 else due_at


def run_clock(
    received_time: datetime,
    due_at: datetime,
    supplements: Iterable[ClockEvent],
    closed_time: datetime | None,
) -> Clock:
    """The clock of a dossier received at event time `received_time`, due at `due_at`, with its
    supplement events (in event-time order) and the event time of its closing (None: open).

    A second request while waiting, or a receipt with no request before it, changes nothing but
    the due date (a receipt's `new_due_at` is the new due date whenever it comes)."""
    due = due_at
    running_from: datetime | None = received_time
    paused_at: ClockEvent | None = None
    runs: list[tuple[datetime, datetime | None, datetime]] = []  # start, end, due
    for event in supplements:
        if closed_time is not None and event.time >= closed_time:
            break
        if event.type == REQUESTED and running_from is not None:
            runs.append((running_from, max(event.time, running_from), due))
            running_from, paused_at = None, event
        elif event.type == RECEIVED_BACK:
            if event.new_due_at is not None:
                due = event.new_due_at
            elif paused_at is not None:
                due = moved_due(due, paused_at.at, event.at)
            if running_from is None:
                running_from, paused_at = max(event.time, received_time), None
    if running_from is not None:
        runs.append((running_from, closed_time, due))
    overdue: list[tuple[datetime, datetime | None]] = []
    for start, end, deadline in runs:
        begin = max(start, deadline)
        if end is None or end > begin:
            overdue.append((begin, end))
    return Clock(due, running_from is None, tuple(overdue))


def classification_due(due_at: datetime, supplements: Iterable[ClockEvent]) -> datetime:
    """The due date a resolution is classified against (CONTRACT section 2)."""
    latest = due_at
    for event in supplements:
        if event.type == RECEIVED_BACK and event.new_due_at is not None:
            latest = event.new_due_at
    return latest
