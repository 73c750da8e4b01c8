"""The reference aggregate store: the tests' oracle for `services.metrics.store.ColumnarStore`.

It adds deltas (`services.metrics.domain.contributions` and `difference`) up per hour and day for
every combination of the filters (and per minute, unprojected, for the edges of a range), in plain
Python, and answers CONTRACT section 5's summary and breakdown. Its unit tests check it against a
naive recount of the events; the columnar store must give the same answers.

A range [from, to) counts the minutes whose start lies in it; the gauge flows are summed over all
minutes before `to`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from datetime import datetime
from itertools import product
from typing import Any

from services.metrics.domain import (
    COUNTERS,
    DIMENSIONS,
    GAUGE_FLOWS,
    Cell,
    Dimension,
    dossiers_block,
    summary_of,
)

_INDEX = {name: index for index, name in enumerate(COUNTERS)}
_WIDTH = len(COUNTERS)
_LEVELS = (1, 60, 1440)  # minute, hour, day: a range is at most ~2x59 minutes + 2x23 hours + days
_MASKS = tuple(product((False, True), repeat=3))  # which of the dimensions a projection keeps

Series = tuple[str, ...]  # the kept dimension values of a projection, in DIMENSIONS order
Vector = list[int]


def _series_of(cell: Cell) -> tuple[Series, ...]:
    """The series a cell adds to, one per projection in _MASKS order (spelled out: hot path)."""
    agency, tier, sector = cell.agency_code, cell.tier, cell.sector
    return (
        (),
        (sector,),
        (tier,),
        (tier, sector),
        (agency,),
        (agency, sector),
        (agency, tier),
        (agency, tier, sector),
    )


class _Sums:
    """One series: hour and day buckets (index -> vector), plus the all-time total."""

    __slots__ = ("levels",)

    def __init__(self) -> None:
        self.levels: tuple[dict[int, Vector], ...] = ({}, {}, {})  # hours, days, {0: total}

    def add(self, indexes: tuple[int, ...], vector: tuple[tuple[int, int], ...]) -> None:
        for buckets, index in zip(self.levels, indexes, strict=True):
            bucket = buckets.get(index)
            if bucket is None:
                bucket = buckets[index] = [0] * _WIDTH
            for position, value in vector:
                bucket[position] += value


def _decompose(start: int, end: int) -> Iterator[tuple[int, int]]:
    """Aligned buckets (level, index) covering [start, end): small ones at the edges only."""
    minute = start
    for level, size in enumerate(_LEVELS[:-1]):  # climb: finish the partial hour, then day
        parent = _LEVELS[level + 1]
        while minute < end and minute % parent and minute + size <= end:
            yield level, minute // size
            minute += size
    for level in reversed(range(len(_LEVELS))):  # descend: whole days, then hours, then minutes
        size = _LEVELS[level]
        while minute + size <= end:
            yield level, minute // size
            minute += size


class AggregateStore:
    """Counters summed per hour and day for each of the 8 combinations of the filters, plus the raw
    cells per minute for the ragged edges: any filtered range costs one series, a few hundred
    bucket look-ups and the cells of at most ~2x59 edge minutes."""

    def __init__(self) -> None:
        self._projections: dict[tuple[bool, ...], dict[Series, _Sums]] = {m: {} for m in _MASKS}
        self._ordered = tuple(self._projections.values())
        self._span: tuple[int, int] | None = None  # first and last minute ever counted
        # Minutes are kept once, unprojected: only a range's edges need them, and copying them
        # into all 8 projections would more than double the memory.
        self._minutes: dict[int, dict[tuple[str, str, str], Vector]] = {}

    def apply(self, deltas: Mapping[tuple[Cell, str], int]) -> None:
        by_cell: dict[Cell, dict[int, int]] = {}
        for (cell, counter), value in deltas.items():
            vector = by_cell.setdefault(cell, {})
            vector[_INDEX[counter]] = vector.get(_INDEX[counter], 0) + value
        for cell, vector in by_cell.items():
            minute = cell.minute
            indexes = (minute // 60, minute // 1440, 0)
            items = tuple(vector.items())
            cells = self._minutes.setdefault(minute, {})
            raw = cells.get(cell[1:])
            if raw is None:
                raw = cells[cell[1:]] = [0] * _WIDTH
            for position, value in items:
                raw[position] += value
            for projection, series in zip(self._ordered, _series_of(cell), strict=True):
                sums = projection.get(series)
                if sums is None:
                    sums = projection[series] = _Sums()
                sums.add(indexes, items)
            first, last = self._span or (minute, minute)
            self._span = (min(first, minute), max(last, minute))

    def counters(
        self,
        start: datetime,
        end: datetime,
        agency_code: str | None = None,
        tier: str | None = None,
        sector: str | None = None,
    ) -> dict[str, int]:
        """Every counter over [start, end); gauge flows summed from the beginning up to `end`."""
        mask, series = _selection(agency_code, tier, sector)
        return self._counters(mask, series, start, end)

    def summary(
        self,
        start: datetime,
        end: datetime,
        agency_code: str | None = None,
        tier: str | None = None,
        sector: str | None = None,
    ) -> dict[str, Any]:
        """CONTRACT section 5's summary for the half-open event-time range [start, end)."""
        return summary_of(self.counters(start, end, agency_code, tier, sector), start, end)

    def breakdown(
        self,
        by: Dimension,
        start: datetime,
        end: datetime,
        agency_code: str | None = None,
        tier: str | None = None,
        sector: str | None = None,
    ) -> dict[str, dict[str, Any]]:
        """The dossiers block per value of `by` (groups with nothing at all are left out)."""
        filters: dict[Dimension, str | None] = {
            "agency_code": agency_code,
            "tier": tier,
            "sector": sector,
        }
        mask = tuple(filters[name] is not None or name == by for name in DIMENSIONS)
        kept = [name for name, keep in zip(DIMENSIONS, mask, strict=True) if keep]
        groups: dict[str, dict[str, Any]] = {}
        for series in sorted(self._projections[mask]):
            named = dict(zip(kept, series, strict=True))
            if all(named[name] == value for name, value in filters.items() if value is not None):
                counts = self._counters(mask, series, start, end)
                if any(counts.values()):
                    groups[named[by]] = dossiers_block(counts)
        return groups

    def _counters(
        self, mask: tuple[bool, ...], series: Series, start: datetime, end: datetime
    ) -> dict[str, int]:
        sums = self._projections[mask].get(series)
        if sums is None or self._span is None:
            return dict.fromkeys(COUNTERS, 0)
        # clamp to the whole days ever counted: a range from year 1 costs nothing extra, and
        # the prefix sums of the gauges start on a day boundary (no ragged edge there)
        first, last = self._span
        first, last = first - first % 1440, last - last % 1440 + 1439
        start_minute = max(_minute_bound(start), first)
        end_minute = min(_minute_bound(end), last + 1)
        flows = self._sum(mask, series, sums, start_minute, end_minute)
        until_end = self._before(mask, series, sums, min(max(_minute_bound(end), first), last + 1))
        counts = dict(zip(COUNTERS, flows, strict=True))
        for name in GAUGE_FLOWS:
            counts[name] = until_end[_INDEX[name]]
        return counts

    def _sum(
        self, mask: tuple[bool, ...], series: Series, sums: _Sums, start: int, end: int
    ) -> Vector:
        """Sums of one series over the minutes [start, end)."""
        total = [0] * _WIDTH
        for level, index in _decompose(start, end):
            if level:
                bucket = sums.levels[level - 1].get(index)
                if bucket is not None:
                    total = [a + b for a, b in zip(total, bucket, strict=True)]
                continue
            for dims, raw in self._minutes.get(index, {}).items():
                if _project(mask, dims) == series:
                    total = [a + b for a, b in zip(total, raw, strict=True)]
        return total

    def _before(self, mask: tuple[bool, ...], series: Series, sums: _Sums, end: int) -> Vector:
        """Sums over every minute before `end`, from whichever side of `end` is shorter."""
        assert self._span is not None
        first, last = self._span
        first, last = first - first % 1440, last - last % 1440 + 1439
        if end - first <= last + 1 - end:
            return self._sum(mask, series, sums, first, end)
        after = self._sum(mask, series, sums, end, last + 1)
        return [a - b for a, b in zip(sums.levels[-1][0], after, strict=True)]


def _project(mask: tuple[bool, ...], dims: tuple[str, ...]) -> Series:
    return tuple(value for keep, value in zip(mask, dims, strict=True) if keep)


def _selection(
    agency_code: str | None, tier: str | None, sector: str | None
) -> tuple[tuple[bool, ...], Series]:
    values = (agency_code, tier, sector)
    mask = tuple(value is not None for value in values)
    return mask, tuple(value for value in values if value is not None)


def _minute_bound(moment: datetime) -> int:
    """The first minute whose start is at or after `moment`."""
    return math.ceil(moment.timestamp() / 60)
