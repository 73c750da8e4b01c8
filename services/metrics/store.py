"""The aggregate store: the deltas of every dossier summed in numpy, answering for 1M dossiers.

Deltas (cell, counter, value) are interned, a combo being one distinct (agency_code, tier,
sector) triple, and kept as:
- per UTC day, the raw rows (minute of day int16, combo int32, counter int8, value int64),
  compacted (identical keys summed, zeros dropped, sorted by minute) before a query reads them:
  a ragged first or last day of a range is a row slice found by binary search, a whole day all
  its rows (a day holds only the cells it counts: a dense `combo x counter` matrix per day
  would hold every combo's every counter, most of them zero, for every day of the history);
- per block of 8 UTC days, the block's sum as a dense matrix `combo x counter` (int64), and
  lazily the prefix sums of the blocks (the sum of every block before): whole days [a, b) are
  prefix(b) - prefix(a), each prefix one block-prefix plus the rows of at most 7 days, so a
  range costs a few matrix additions and the rows of a few dozen days whatever its length. A
  new delta only marks the block-prefixes after its block stale (live data: the last one or
  two).
The result is a `combo x counter` matrix, reduced by a boolean mask over the combos
(summary) or grouped with one `np.add.at` (breakdown, all groups in one pass). An operator's
agency scope (CONTRACT section 8) is one more condition of that mask: a scoped summary is the sum
of its agencies' figures, a scoped breakdown groups only their dossiers.

Semantics are exactly those of the tests' reference store (`tests/support/aggregate_oracle.py`,
itself checked against a naive recount of the events): a range [from, to) counts the minutes
whose start lies in it; the gauge flows are summed over all minutes before `to`. Sums are exact
int64.
"""

from __future__ import annotations

import bisect
import itertools
import math
from array import array
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from services.metrics.domain import (
    COUNTERS,
    DIMENSIONS,
    GAUGE_FLOWS,
    Cell,
    Dimension,
    dossiers_block,
    summary_of,
)

Matrix = npt.NDArray[np.int64]
DAY = 1440
BLOCK = 8  # days per block of the block-prefix sums
_INDEX = {name: index for index, name in enumerate(COUNTERS)}
_WIDTH = len(COUNTERS)
_GAUGES = np.array([_INDEX[name] for name in GAUGE_FLOWS])
_AGENCY = DIMENSIONS.index("agency_code")
_MAX_COMBOS = 1 << 24  # a packed key keeps the combo in 24 bits

# Deltas in the store's own terms, as one flat array of int64: key, value, key, value... where a
# key is `minute << 32 | combo << 8 | counter index`: 16 bytes a cell where a `Deltas` entry (a
# Cell, its minute, a key tuple and a dict slot) costs about ten times that.
Packed = array


class _DayRows:
    """The raw rows of one day: appended chunks, compacted on demand."""

    __slots__ = ("chunks", "combo", "counter", "minute", "value")

    def __init__(self) -> None:
        self.chunks: list[tuple[npt.NDArray[Any], ...]] = []
        self.minute: npt.NDArray[np.int16] = np.zeros(0, np.int16)
        self.combo: npt.NDArray[np.int32] = np.zeros(0, np.int32)
        self.counter: npt.NDArray[np.int8] = np.zeros(0, np.int8)
        self.value: npt.NDArray[np.int64] = np.zeros(0, np.int64)

    def compact(self) -> None:
        if not self.chunks:
            return
        minute = np.concatenate([self.minute, *(c[0] for c in self.chunks)]).astype(np.int64)
        combo = np.concatenate([self.combo, *(c[1] for c in self.chunks)]).astype(np.int64)
        counter = np.concatenate([self.counter, *(c[2] for c in self.chunks)]).astype(np.int64)
        value = np.concatenate([self.value, *(c[3] for c in self.chunks)])
        self.chunks = []
        key = (minute << 40) | (combo << 8) | counter
        order = np.argsort(key, kind="stable")
        key, value = key[order], value[order]
        starts = np.flatnonzero(np.concatenate(([True], key[1:] != key[:-1])))
        sums = np.add.reduceat(value, starts) if len(value) else value
        key = key[starts] if len(value) else key
        keep = sums != 0
        key, sums = key[keep], sums[keep]
        self.minute = (key >> 40).astype(np.int16)
        self.combo = ((key >> 8) & 0xFFFFFFFF).astype(np.int32)
        self.counter = (key & 0xFF).astype(np.int8)
        self.value = sums.astype(np.int64)

    def add_range(self, out: Matrix, start: int, end: int) -> None:
        """Add the rows of minutes-of-day [start, end) into `out` (combo x counter)."""
        self.compact()
        lo, hi = np.searchsorted(self.minute, [start, end], side="left")
        if hi > lo:
            np.add.at(out, (self.combo[lo:hi], self.counter[lo:hi]), self.value[lo:hi])

    def add_all(self, out: Matrix) -> None:
        """Add every row of the day into `out` (combo x counter)."""
        self.compact()
        if len(self.value):
            np.add.at(out, (self.combo, self.counter), self.value)

    def counters_of(self, mask: npt.NDArray[np.bool_], before: int = DAY) -> Matrix:
        """The counter sums of the rows of the combos in `mask`, of minutes-of-day before
        `before`."""
        self.compact()
        hi = int(np.searchsorted(self.minute, before, side="left"))
        kept = mask[self.combo[:hi]]
        out: Matrix = np.zeros(_WIDTH, np.int64)
        np.add.at(out, self.counter[:hi][kept].astype(np.int64), self.value[:hi][kept])
        return out

    @property
    def nbytes(self) -> int:
        arrays = (self.minute, self.combo, self.counter, self.value)
        return sum(a.nbytes for a in arrays) + sum(a.nbytes for c in self.chunks for a in c)


class Rows(NamedTuple):
    """Rows of a store: (minute since the epoch, interned combo, counter index) and value,
    each column of its `ROW_DTYPES` type."""

    minute: npt.NDArray[np.int64]
    combo: npt.NDArray[np.int32]
    counter: npt.NDArray[np.int8]
    value: npt.NDArray[np.int64]


# The type of each column of `Rows` (what a snapshot writes and reads back as raw bytes).
ROW_DTYPES: dict[str, type[np.generic]] = {
    "minute": np.int64,
    "combo": np.int32,
    "counter": np.int8,
    "value": np.int64,
}


class ColumnarStore:
    """The deltas of every dossier, summed: apply, counters, summary, breakdown, totals_by."""

    def __init__(self, flush_rows: int = 50_000) -> None:
        self._combo_ids: dict[tuple[str, str, str], int] = {}
        self._combos: list[tuple[str, str, str]] = []
        self._capacity = 64
        self._blocks: dict[int, Matrix] = {}  # block -> sum of its days
        self._prefix: dict[int, Matrix] = {}  # block -> sum of every block before it
        self._stale_from: int | None = None  # the first block whose prefix is stale
        self._rows: dict[int, _DayRows] = {}
        self._total: Matrix = np.zeros((self._capacity, _WIDTH), np.int64)
        self._pending: tuple[list[int], list[int], list[int], list[int]] = ([], [], [], [])
        self._flush_rows = flush_rows

    # --- writing ---------------------------------------------------------------------------

    def apply(self, deltas: Mapping[tuple[Cell, str], int]) -> None:
        minutes, combos, counters, values = self._pending
        for (cell, counter), value in deltas.items():
            combo = self._combo((cell.agency_code, cell.tier, cell.sector))
            minutes.append(cell.minute)
            combos.append(combo)
            counters.append(_INDEX[counter])
            values.append(value)
        if len(minutes) >= self._flush_rows:
            self.flush()

    def pack(self, deltas: Mapping[tuple[Cell, str], int]) -> Packed[int]:
        """`deltas` packed (see `Packed`), its combos interned: what `apply_packed` and
        `apply_change` take."""
        flat: list[int] = []
        for (cell, counter), value in deltas.items():
            combo = self._combo((cell.agency_code, cell.tier, cell.sector))
            flat.append((cell.minute << 32) | (combo << 8) | _INDEX[counter])
            flat.append(value)
        return array("q", flat)

    def apply_and_pack(self, deltas: Mapping[tuple[Cell, str], int]) -> Packed[int]:
        """`apply(deltas)`, and `deltas` packed."""
        packed = self.pack(deltas)
        self.apply_packed(packed)
        return packed

    def pack_cells(self, cells: Iterable[Sequence[Any]]) -> Packed[int]:
        """Cells as `cells` gives them ([minute, agency, tier, sector, counter, value] each),
        packed."""
        flat: list[int] = []
        for minute, agency, tier, sector, counter, value in cells:
            combo = self._combo((str(agency), str(tier), str(sector)))
            flat.append((int(minute) << 32) | (combo << 8) | _INDEX[counter])
            flat.append(int(value))
        return array("q", flat)

    def cells(self, packed: Packed[int]) -> list[list[Any]]:
        """Packed deltas as [minute, agency, tier, sector, counter, value] each."""
        combos = self._combos
        out: list[list[Any]] = []
        for index in range(0, len(packed), 2):
            key = packed[index]
            agency, tier, sector = combos[(key >> 8) & 0xFFFFFF]
            out.append([key >> 32, agency, tier, sector, COUNTERS[key & 0xFF], packed[index + 1]])
        return out

    def apply_packed(self, packed: Packed[int], sign: int = 1) -> None:
        """Add packed deltas (`sign` -1: take them back)."""
        self._apply_keyed(zip(packed[::2], packed[1::2], strict=True), sign)

    def apply_change(self, before: Packed[int], after: Packed[int]) -> None:
        """Add `after` and take back `before` (a dossier's contributions replaced): only the
        cells whose sum moves."""
        change = dict(zip(after[::2], after[1::2], strict=True))
        for key, value in zip(before[::2], before[1::2], strict=True):
            change[key] = change.get(key, 0) - value
        self._apply_keyed(((key, value) for key, value in change.items() if value), 1)

    def _apply_keyed(self, items: Iterable[tuple[int, int]], sign: int) -> None:
        minutes, combos, counters, values = self._pending
        for key, value in items:
            minutes.append(key >> 32)
            combos.append((key >> 8) & 0xFFFFFF)
            counters.append(key & 0xFF)
            values.append(sign * value)
        if len(minutes) >= self._flush_rows:
            self.flush()

    def _combo(self, dims: tuple[str, str, str]) -> int:
        """The interned number of a combo (agency_code, tier, sector)."""
        combo = self._combo_ids.get(dims)
        return self._intern(dims) if combo is None else combo

    def _intern(self, dims: tuple[str, str, str]) -> int:
        if len(self._combos) >= _MAX_COMBOS:
            raise ValueError(f"more than {_MAX_COMBOS} combos (agency, tier, sector)")
        combo = self._combo_ids[dims] = len(self._combos)
        self._combos.append(dims)
        if len(self._combos) > self._capacity:
            grow = self._capacity
            self._capacity *= 2
            pad = ((0, grow), (0, 0))
            self._blocks = {block: np.pad(m, pad) for block, m in self._blocks.items()}
            self._prefix, self._stale_from = {}, None
            self._total = np.pad(self._total, pad)
        return combo

    def flush(self) -> None:
        """Move the pending deltas into the day matrices and the day rows."""
        minutes_l, combos_l, counters_l, values_l = self._pending
        if not minutes_l:
            return
        minute = np.array(minutes_l, np.int64)
        combo = np.array(combos_l, np.int32)
        counter = np.array(counters_l, np.int8)
        value = np.array(values_l, np.int64)
        self._pending = ([], [], [], [])
        self._add(minute, combo, counter, value)

    def _add(
        self,
        minute: npt.NDArray[np.int64],
        combo: npt.NDArray[np.int32],
        counter: npt.NDArray[np.int8],
        value: npt.NDArray[np.int64],
    ) -> None:
        """Add rows (minute since the epoch, interned combo, counter index, value)."""
        if not len(minute):
            return
        np.add.at(self._total, (combo, counter), value)
        day = minute // DAY
        order = np.argsort(day, kind="stable")
        day, minute, combo, counter, value = (
            day[order],
            minute[order],
            combo[order],
            counter[order],
            value[order],
        )
        bounds = np.flatnonzero(np.concatenate(([True], day[1:] != day[:-1], [True])))
        for lo, hi in itertools.pairwise(bounds):
            d = int(day[lo])
            block = d // BLOCK
            sums = self._blocks.get(block)
            if sums is None:
                sums = self._blocks[block] = np.zeros((self._capacity, _WIDTH), np.int64)
            np.add.at(sums, (combo[lo:hi], counter[lo:hi]), value[lo:hi])
            if self._stale_from is None or block + 1 < self._stale_from:
                self._stale_from = block + 1
            rows = self._rows.get(d)
            if rows is None:
                rows = self._rows[d] = _DayRows()
            rows.chunks.append(
                (
                    (minute[lo:hi] - d * DAY).astype(np.int16),
                    combo[lo:hi].copy(),
                    counter[lo:hi].copy(),
                    value[lo:hi].copy(),
                )
            )

    # --- whole ----------------------------------------------------------------------------

    def day_rows(self) -> Iterator[Rows]:
        """Every row the store holds, compacted, one day at a time in order: what a snapshot
        compresses (and `from_rows` builds the same store from) without holding every row a
        second time at once. The combos are `combos`."""
        self.flush()
        for day in sorted(self._rows):
            rows = self._rows[day]
            rows.compact()
            yield Rows(
                rows.minute.astype(np.int64) + day * DAY, rows.combo, rows.counter, rows.value
            )

    @property
    def combos(self) -> list[tuple[str, str, str]]:
        """The combos (agency_code, tier, sector) in interning order."""
        return list(self._combos)

    @classmethod
    def from_rows(
        cls, combos: Iterable[tuple[str, str, str]], rows: Iterable[Rows]
    ) -> ColumnarStore:
        """The store of `combos` (in interning order) holding `rows`, added a part at a time."""
        store = cls()
        for dims in combos:
            store._intern(dims)
        for part in rows:
            store._add(part.minute, part.combo, part.counter, part.value)
        return store

    # --- reading ---------------------------------------------------------------------------

    def _range(self, start: int, end: int) -> Matrix:
        """combo x counter sums over the minutes [start, end)."""
        out: Matrix = np.zeros((self._capacity, _WIDTH), np.int64)
        if end <= start:
            return out
        first_day, last_day = start // DAY, (end - 1) // DAY
        if first_day == last_day:
            self._partial(out, first_day, start - first_day * DAY, end - first_day * DAY)
            return out
        whole_from, whole_to = first_day, last_day + 1  # whole days [whole_from, whole_to)
        if start % DAY:
            self._partial(out, first_day, start % DAY, DAY)
            whole_from += 1
        if end % DAY:
            self._partial(out, last_day, 0, end % DAY)
            whole_to -= 1
        if whole_to - whole_from <= 2 * BLOCK:
            for d in range(whole_from, whole_to):
                self._whole_day(out, d)
        elif whole_to > whole_from:
            out += self._days_before(whole_to)
            out -= self._days_before(whole_from)
        return out

    def _days_before(self, day: int) -> Matrix:
        """The sum of the whole days before `day`: a block-prefix plus the days of its block."""
        block = day // BLOCK
        out = self._block_prefix(block).copy()
        for d in range(block * BLOCK, day):
            self._whole_day(out, d)
        return out

    def _block_prefix(self, block: int) -> Matrix:
        """The sum of every block before `block`. Kept only for the blocks that hold days, and
        for the end (a block without days has the prefix of the next one that has some: the
        years between a replayed history and live reports cost nothing); recomputed from the
        first stale one."""
        if not self._blocks:
            return np.zeros((self._capacity, _WIDTH), np.int64)
        held = sorted(self._blocks)
        end = held[-1] + 1
        if self._stale_from is not None or end not in self._prefix:
            stale = held[0] if self._stale_from is None else self._stale_from
            start = bisect.bisect_left(held, stale)
            while start > 0 and held[start - 1] not in self._prefix:
                start -= 1  # blocks added after the last prefix computed
            running = (
                np.zeros((self._capacity, _WIDTH), np.int64)
                if start == 0
                else self._prefix[held[start - 1]] + self._blocks[held[start - 1]]
            )
            for b in held[start:]:
                self._prefix[b] = running
                running = running + self._blocks[b]
            self._prefix[end] = running
            kept = {*held, end}
            for b in [b for b in self._prefix if b not in kept]:
                del self._prefix[b]
            self._stale_from = None
        at = bisect.bisect_left(held, block)
        return self._prefix[held[at] if at < len(held) else end]

    def _partial(self, out: Matrix, day: int, start: int, end: int) -> None:
        rows = self._rows.get(day)
        if rows is not None:
            rows.add_range(out, start, end)

    def _whole_day(self, out: Matrix, day: int) -> None:
        rows = self._rows.get(day)
        if rows is not None:
            rows.add_all(out)

    def _before(self, end: int) -> Matrix:
        """Sums over every minute before `end`, from whichever side is shorter."""
        if not self._rows:
            return np.zeros((self._capacity, _WIDTH), np.int64)
        first, last = min(self._rows) * DAY, (max(self._rows) + 1) * DAY
        end = min(max(end, first), last)
        if end - first <= last - end:
            return self._range(first, end)
        return self._total - self._range(end, last)

    def _matrices(self, start: datetime, end: datetime) -> Matrix:
        """combo x counter: the flows over [start, end), the gauge flows up to `end`."""
        self.flush()
        end_minute = _minute_bound(end)
        flows = self._range(_minute_bound(start), end_minute)
        flows[:, _GAUGES] = self._before(end_minute)[:, _GAUGES]
        return flows[: len(self._combos)]

    def _mask(
        self, filters: Mapping[Dimension, str | None], agencies: Collection[str] | None
    ) -> npt.NDArray[np.bool_]:
        """The combos matching every filter, and of one of `agencies` unless it is None."""
        mask = np.ones(len(self._combos), bool)
        for position, name in enumerate(DIMENSIONS):
            wanted = filters.get(name)
            if wanted is not None:
                mask &= np.array([dims[position] == wanted for dims in self._combos], bool)
        if agencies is not None:
            mask &= np.array([dims[_AGENCY] in agencies for dims in self._combos], bool)
        return mask

    def counters(
        self,
        start: datetime,
        end: datetime,
        agency_code: str | None = None,
        tier: str | None = None,
        sector: str | None = None,
        *,
        agencies: Collection[str] | None = None,
    ) -> dict[str, int]:
        """Every counter over [start, end), counting only the dossiers of `agencies` (an
        operator's scope; None counts every agency)."""
        matrix = self._matrices(start, end)
        mask = self._mask({"agency_code": agency_code, "tier": tier, "sector": sector}, agencies)
        vector = matrix[mask].sum(axis=0, dtype=np.int64)
        return dict(zip(COUNTERS, (int(v) for v in vector), strict=True))

    def summary(
        self,
        start: datetime,
        end: datetime,
        agency_code: str | None = None,
        tier: str | None = None,
        sector: str | None = None,
        *,
        agencies: Collection[str] | None = None,
    ) -> dict[str, Any]:
        counts = self.counters(start, end, agency_code, tier, sector, agencies=agencies)
        return summary_of(counts, start, end)

    def breakdown(
        self,
        by: Dimension,
        start: datetime,
        end: datetime,
        agency_code: str | None = None,
        tier: str | None = None,
        sector: str | None = None,
        *,
        agencies: Collection[str] | None = None,
    ) -> dict[str, dict[str, Any]]:
        """The dossiers block per value of `by` (`breakdown_counters`)."""
        groups = self.breakdown_counters(
            by, start, end, agency_code, tier, sector, agencies=agencies
        )
        return {name: dossiers_block(counts) for name, counts in groups.items()}

    def breakdown_counters(
        self,
        by: Dimension,
        start: datetime,
        end: datetime,
        agency_code: str | None = None,
        tier: str | None = None,
        sector: str | None = None,
        *,
        agencies: Collection[str] | None = None,
    ) -> dict[str, dict[str, int]]:
        """Every counter per value of `by`, all groups in one pass over the combos; only the
        dossiers of `agencies` count (None: every agency), so only their groups appear."""
        matrix = self._matrices(start, end)
        mask = self._mask({"agency_code": agency_code, "tier": tier, "sector": sector}, agencies)
        position = DIMENSIONS.index(by)
        names = sorted({dims[position] for dims in self._combos})
        group_of = {name: index for index, name in enumerate(names)}
        groups = np.array([group_of[dims[position]] for dims in self._combos], np.int64)
        sums: Matrix = np.zeros((len(names), _WIDTH), np.int64)
        np.add.at(sums, groups[mask], matrix[mask])
        out: dict[str, dict[str, int]] = {}
        for index, name in enumerate(names):
            row = sums[index]
            if row.any():
                out[name] = dict(zip(COUNTERS, (int(v) for v in row), strict=True))
        return out

    def series(
        self,
        bounds: Sequence[datetime],
        agency_code: str | None = None,
        tier: str | None = None,
        sector: str | None = None,
        *,
        agencies: Collection[str] | None = None,
    ) -> list[dict[str, int]]:
        """`counters` of each range [bounds[i], bounds[i+1]), in one pass: the masked sums of
        everything before each bound (whole days from a prefix of day sums, then the rows of
        the bound's own day), each range the difference of two, its gauges those of its end."""
        self.flush()
        mask = self._mask({"agency_code": agency_code, "tier": tier, "sector": sector}, agencies)
        days = sorted(self._rows)
        prefix = np.zeros((len(days) + 1, _WIDTH), np.int64)
        for index, day in enumerate(days):
            prefix[index + 1] = prefix[index] + self._rows[day].counters_of(mask)
        before = []
        for bound in bounds:
            minute = _minute_bound(bound)
            day = minute // DAY
            vector = prefix[bisect.bisect_left(days, day)].copy()
            rows = self._rows.get(day)
            if rows is not None:
                vector += rows.counters_of(mask, minute - day * DAY)
            before.append(vector)
        out = []
        for start, end in itertools.pairwise(before):
            flows = end - start
            flows[_GAUGES] = end[_GAUGES]
            out.append(dict(zip(COUNTERS, (int(v) for v in flows), strict=True)))
        return out

    def totals_by(self, dims: tuple[Dimension, ...]) -> dict[tuple[str, ...], dict[str, int]]:
        """All-time counters per combination of `dims` (for Prometheus)."""
        self.flush()
        positions = [DIMENSIONS.index(name) for name in dims]
        out: dict[tuple[str, ...], dict[str, int]] = {}
        for combo, row in zip(self._combos, self._total[: len(self._combos)], strict=True):
            key = tuple(combo[p] for p in positions)
            into = out.setdefault(key, dict.fromkeys(COUNTERS, 0))
            for name, value in zip(COUNTERS, row, strict=True):
                into[name] += int(value)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes held by the arrays (the figure the benchmark reports besides RSS)."""
        blocks = sum(m.nbytes for m in (*self._blocks.values(), *self._prefix.values()))
        rows = sum(r.nbytes for r in self._rows.values())
        return blocks + rows + self._total.nbytes


def _minute_bound(moment: datetime) -> int:
    """The first minute whose start is at or after `moment`."""
    return math.ceil(moment.timestamp() / 60)
