"""The working-day calendar: 2019 pinned as the government announced it, and its arithmetic."""

from datetime import UTC, date, datetime, time, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.common.tz import VIETNAM_TZ
from services.metrics.calendar import (
    OFFICE_OPENS,
    WorkingCalendar,
    YearOverride,
    add_working_days,
    is_working_day,
    local_date,
    parse_overrides,
    working_days_between,
)

# Every day of 2019 that is not Monday-Friday-worked, and the Saturdays worked in exchange.
DAYS_OFF_2019_ON_WEEKDAYS = {
    date(2019, 1, 1),
    *(date(2019, 2, day) for day in (4, 5, 6, 7, 8)),
    date(2019, 4, 15),
    date(2019, 4, 29),
    date(2019, 4, 30),
    date(2019, 5, 1),
    date(2019, 9, 2),
}
MAKE_UP_SATURDAYS_2019 = {date(2019, 1, 5), date(2019, 5, 4)}


def test_february_2019_around_tet() -> None:
    # Tết Kỷ Hợi: off from Saturday 2 to Sunday 10 February, back to work on Monday 11
    worked = {day: is_working_day(date(2019, 2, day)) for day in range(1, 29)}
    off = {day for day, works in worked.items() if not works}
    assert off == {2, 3, 4, 5, 6, 7, 8, 9, 10, 16, 17, 23, 24}
    assert worked[1] and worked[11]


@pytest.mark.parametrize(
    ("day", "works"),
    [
        (date(2019, 1, 1), False),  # New Year's Day, a Tuesday
        (date(2019, 1, 2), True),
        (date(2019, 1, 5), True),  # Saturday worked back for Monday 31 Dec 2018
        (date(2018, 12, 31), False),
        (date(2019, 4, 12), True),  # Friday before Hùng Kings' day
        (date(2019, 4, 14), False),  # Hùng Kings' day, a Sunday ...
        (date(2019, 4, 15), False),  # ... observed on Monday
        (date(2019, 4, 16), True),
        (date(2019, 4, 26), True),
        (date(2019, 4, 27), False),
        (date(2019, 4, 28), False),
        (date(2019, 4, 29), False),  # swapped with Saturday 4 May
        (date(2019, 4, 30), False),
        (date(2019, 5, 1), False),
        (date(2019, 5, 2), True),
        (date(2019, 5, 3), True),
        (date(2019, 5, 4), True),  # make-up Saturday
        (date(2019, 5, 5), False),
        (date(2019, 5, 11), False),  # an ordinary Saturday
        (date(2019, 8, 30), True),
        (date(2019, 8, 31), False),
        (date(2019, 9, 1), False),
        (date(2019, 9, 2), False),  # National Day, a Monday
        (date(2019, 9, 3), True),  # no adjacent day before the 2019 Labour Code took effect
    ],
)
def test_pinned_days_of_2019(day: date, works: bool) -> None:
    assert is_working_day(day) is works


def test_whole_2019_is_weekdays_minus_days_off_plus_make_up_saturdays() -> None:
    days = [date(2019, 1, 1) + timedelta(days=i) for i in range(365)]
    expected = {
        day
        for day in days
        if (day.weekday() < 5 and day not in DAYS_OFF_2019_ON_WEEKDAYS)
        or day in MAKE_UP_SATURDAYS_2019
    }
    assert {day for day in days if is_working_day(day)} == expected
    assert len(expected) == 261 - len(DAYS_OFF_2019_ON_WEEKDAYS) + len(MAKE_UP_SATURDAYS_2019)


def vn(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=VIETNAM_TZ)


@pytest.mark.parametrize(
    ("start", "n", "due"),
    [
        (vn(2019, 1, 31, 9, 0), 1, vn(2019, 2, 1, 9, 0)),
        (vn(2019, 1, 31, 9, 0), 2, vn(2019, 2, 11, 9, 0)),  # straight across Tết
        (vn(2019, 1, 28, 14, 30), 10, vn(2019, 2, 18, 14, 30)),
        (vn(2019, 2, 1, 16, 0), 0, vn(2019, 2, 1, 16, 0)),
        (vn(2019, 4, 26, 10, 0), 1, vn(2019, 5, 2, 10, 0)),
        (vn(2019, 4, 26, 10, 0), 3, vn(2019, 5, 4, 10, 0)),  # the make-up Saturday counts
        (vn(2019, 4, 26, 10, 0), 4, vn(2019, 5, 6, 10, 0)),
        (vn(2019, 12, 31, 8, 0), 2, vn(2020, 1, 3, 8, 0)),  # across the year end
        # received on a day off: deemed received when the office opens on the next working day
        (vn(2019, 2, 3, 20, 0), 1, vn(2019, 2, 12, 7, 30)),
        (vn(2019, 2, 3, 20, 0), 0, vn(2019, 2, 11, 7, 30)),
        (vn(2019, 3, 9, 11, 0), 3, vn(2019, 3, 14, 7, 30)),
    ],
)
def test_add_working_days(start: datetime, n: int, due: datetime) -> None:
    assert add_working_days(start, n) == due
    assert add_working_days(start, n).utcoffset() == timedelta(hours=7)
    assert working_days_between(start, due) == n


def test_add_working_days_reads_the_local_day_whatever_the_offset() -> None:
    # 23:30 UTC on Thursday 31 January is 06:30 on Friday 1 February in Hà Nội
    start = datetime(2019, 1, 31, 23, 30, tzinfo=UTC)
    assert add_working_days(start, 1) == vn(2019, 2, 11, 6, 30)


def test_naive_datetimes_are_refused() -> None:
    with pytest.raises(ValueError, match="naive"):
        add_working_days(datetime(2019, 3, 4, 9, 0), 1)
    with pytest.raises(ValueError, match="naive"):
        local_date(datetime(2019, 3, 4, 9, 0))


def test_working_days_between() -> None:
    assert working_days_between(date(2019, 2, 1), date(2019, 2, 11)) == 1
    assert working_days_between(date(2019, 2, 11), date(2019, 2, 1)) == -1
    assert working_days_between(date(2019, 2, 2), date(2019, 2, 10)) == 0  # within Tết
    # 252 working days in 2019; 1 January is off, so counting starts after Wednesday 2 January
    assert working_days_between(date(2018, 12, 28), date(2019, 12, 31)) == 252
    assert working_days_between(date(2019, 1, 1), date(2019, 12, 31)) == 251
    assert working_days_between(vn(2019, 3, 4, 8, 0), vn(2019, 3, 4, 17, 0)) == 0


def test_overrides_parse_and_win_over_the_package() -> None:
    overrides = parse_overrides(
        {"2030": {"days_off": [date(2030, 3, 4)], "working_days": [date(2030, 3, 9)]}}
    )
    assert overrides[2030] == YearOverride(
        frozenset({date(2030, 3, 4)}), frozenset({date(2030, 3, 9)}), authoritative=False
    )
    calendar = WorkingCalendar(overrides)
    assert not calendar.is_working_day(date(2030, 3, 4))
    assert calendar.is_working_day(date(2030, 3, 9))
    assert not calendar.is_working_day(date(2030, 9, 2))  # the package still knows the rest
    with pytest.raises(ValueError, match="both"):
        parse_overrides(
            {"2030": {"days_off": [date(2030, 1, 2)], "working_days": [date(2030, 1, 2)]}}
        )


def test_without_overrides_the_package_alone_gives_a_plain_calendar() -> None:
    assert WorkingCalendar({}).is_working_day(date(2025, 4, 26))  # package's make-up Saturday
    assert not WorkingCalendar({}).is_working_day(date(2025, 5, 2))


moments = st.datetimes(
    min_value=datetime(2018, 6, 1),
    max_value=datetime(2021, 6, 1),
    timezones=st.sampled_from([VIETNAM_TZ, UTC, timezone(timedelta(hours=-5))]),
)


@given(moments, st.integers(min_value=0, max_value=400))
def test_counting_back_gives_the_days_added(start: datetime, n: int) -> None:
    due = add_working_days(start, n)
    assert working_days_between(start, due) == n
    assert is_working_day(local_date(due))
    assert due >= start


@given(moments, st.integers(min_value=0, max_value=60))
def test_due_keeps_the_time_of_a_receipt_on_a_working_day(start: datetime, n: int) -> None:
    local = start.astimezone(VIETNAM_TZ)
    expected = local.time() if is_working_day(local.date()) else OFFICE_OPENS
    assert add_working_days(start, n).time() == expected
    assert isinstance(expected, time)
