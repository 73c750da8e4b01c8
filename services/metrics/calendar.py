"""Vietnamese working days: weekends and public holidays off, announced swaps applied.

Built on the `holidays` package (Vietnam) and corrected by `calendar_overrides.toml`, which pins the
calendar each year as the government announced it (exact Tết days, observed and swapped days,
make-up Saturdays).

Deadline convention (Decree 61/2018: time limits count in working days from the receipt of a
complete dossier; the receipt slip gives the appointment as hour and date):
- the *day of receipt* is the Asia/Ho_Chi_Minh calendar day of the receipt, if it is a working day;
  a dossier received on a day off (online, a weekend) is deemed received when the office opens on
  the next working day (`OFFICE_OPENS`);
- the appointment (`due_at`) is the n-th working day after the day of receipt, at the same time of
  day as the (deemed) receipt: received Monday 09:00 with 3 working days is due Thursday 09:00. So a
  dossier has n full working days, and `working_days_between(received, due) == n`.
"""

from __future__ import annotations

import tomllib
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from functools import cache
from pathlib import Path
from typing import Any

import holidays

from services.common.tz import VIETNAM_TZ

OFFICE_OPENS = time(7, 30)
OVERRIDES_PATH = Path(__file__).with_name("calendar_overrides.toml")


@dataclass(frozen=True, slots=True)
class YearOverride:
    days_off: frozenset[date] = frozenset()
    working_days: frozenset[date] = frozenset()
    authoritative: bool = False


def local_date(moment: datetime) -> date:
    """The Asia/Ho_Chi_Minh calendar day of an aware datetime, whatever offset it carries."""
    if moment.utcoffset() is None:
        raise ValueError(f"naive datetime {moment.isoformat()}: an offset is required")
    return moment.astimezone(VIETNAM_TZ).date()


def parse_overrides(document: Mapping[str, Any]) -> dict[int, YearOverride]:
    """The parsed TOML document (year tables) as overrides keyed by year."""
    overrides: dict[int, YearOverride] = {}
    for key, table in document.items():
        year = int(key)
        days_off = frozenset(_dates(table.get("days_off", [])))
        working = frozenset(_dates(table.get("working_days", [])))
        if days_off & working:
            raise ValueError(f"{year}: days both off and worked: {sorted(days_off & working)}")
        overrides[year] = YearOverride(days_off, working, bool(table.get("authoritative", False)))
    return overrides


def load_overrides(path: Path = OVERRIDES_PATH) -> dict[int, YearOverride]:
    with path.open("rb") as file:
        return parse_overrides(tomllib.load(file))


def _dates(values: list[Any]) -> list[date]:
    for value in values:
        # tomllib gives local dates as date; a datetime is a date too but means something else
        if not isinstance(value, date) or isinstance(value, datetime):
            raise ValueError(f"expected a TOML local date, got {value!r}")
    return values


class WorkingCalendar:
    """Working days of one set of overrides; memoises one sorted table of working days per year."""

    def __init__(self, overrides: Mapping[int, YearOverride]) -> None:
        self._overrides = dict(overrides)
        self._tables: dict[int, tuple[date, ...]] = {}

    def is_working_day(self, day: date) -> bool:
        table = self._table(day.year)
        index = bisect_right(table, day)
        return index > 0 and table[index - 1] == day

    def add_working_days(self, start: datetime, n: int) -> datetime:
        """The appointment for a receipt at `start` with `n` working days (see module docstring)."""
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        if start.utcoffset() is None:
            raise ValueError(f"naive datetime {start.isoformat()}: an offset is required")
        anchor, at = self._receipt_day(start.astimezone(VIETNAM_TZ))
        return datetime.combine(self._nth_after(anchor, n), at, tzinfo=VIETNAM_TZ)

    def working_days_between(self, a: date | datetime, b: date | datetime) -> int:
        """Working days after the day of receipt `a` up to and including the day of `b`.

        Negative when `b` precedes `a`; datetimes are read as their Asia/Ho_Chi_Minh day.
        """
        if _day(b) < _day(a):
            return -self.working_days_between(b, a)
        anchor = _day(a) if self.is_working_day(_day(a)) else self._nth_after(_day(a), 1)
        return self._count_after(anchor, _day(b)) if anchor < _day(b) else 0

    def _receipt_day(self, local: datetime) -> tuple[date, time]:
        day = local.date()
        if self.is_working_day(day):
            return day, local.time()
        return self._nth_after(day, 1), OFFICE_OPENS

    def _nth_after(self, day: date, n: int) -> date:
        """The n-th working day strictly after `day` (`day` itself when n == 0)."""
        if n == 0:
            return day
        year, table = day.year, self._table(day.year)
        index = bisect_right(table, day) + n - 1
        while index >= len(table):
            index -= len(table)
            year += 1
            table = self._table(year)
        return table[index]

    def _count_after(self, first: date, last: date) -> int:
        """Working days d with first < d <= last (first <= last)."""
        if first.year == last.year:
            table = self._table(first.year)
            return bisect_right(table, last) - bisect_right(table, first)
        count = len(self._table(first.year)) - bisect_right(self._table(first.year), first)
        count += sum(len(self._table(year)) for year in range(first.year + 1, last.year))
        return count + bisect_right(self._table(last.year), last)

    def _table(self, year: int) -> tuple[date, ...]:
        table = self._tables.get(year)
        if table is None:
            table = self._tables[year] = self._build_table(year)
        return table

    def _build_table(self, year: int) -> tuple[date, ...]:
        override = self._overrides.get(year, YearOverride())
        # Neighbouring years too: a swap announced under one year may move a day of the next.
        package = holidays.country_holidays("VN", years=range(year - 1, year + 2))
        package_workdays: set[date] = set(getattr(package, "weekend_workdays", ()))

        def works(day: date) -> bool:
            if day in override.working_days:
                return True
            if day in override.days_off:
                return False
            if not override.authoritative:
                if day in package_workdays:
                    return True
                if day in package:
                    return False
            return day.weekday() < 5

        first = date(year, 1, 1)
        days = (first + timedelta(days=i) for i in range((date(year + 1, 1, 1) - first).days))
        return tuple(day for day in days if works(day))


def _day(value: date | datetime) -> date:
    return local_date(value) if isinstance(value, datetime) else value


@cache
def default_calendar() -> WorkingCalendar:
    return WorkingCalendar(load_overrides())


def is_working_day(day: date) -> bool:
    return default_calendar().is_working_day(day)


def add_working_days(start: datetime, n: int) -> datetime:
    return default_calendar().add_working_days(start, n)


def working_days_between(a: date | datetime, b: date | datetime) -> int:
    return default_calendar().working_days_between(a, b)
