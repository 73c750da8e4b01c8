"""`DueIndex`: each key handed out once, at its latest moment, in order; the heap stays small."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from services.common.due import DueIndex

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_a_key_is_due_at_its_latest_moment_and_only_once() -> None:
    index = DueIndex()
    index.set("a", T0 + timedelta(minutes=5))
    index.set("b", T0 + timedelta(minutes=1))
    index.set("a", T0 + timedelta(minutes=2))  # moved earlier
    index.set("c", T0 + timedelta(minutes=3))
    index.set("c", None)  # nothing due for c any more
    assert index.pop_due(T0 + timedelta(minutes=1)) == []  # strictly before the clock
    assert index.pop_due(T0 + timedelta(minutes=10)) == ["b", "a"]
    assert index.pop_due(T0 + timedelta(days=1)) == []
    assert len(index) == 0 and "a" not in index


@given(
    st.lists(st.tuples(st.sampled_from("abcdefgh"), st.none() | st.integers(0, 100)), max_size=300),
    st.integers(0, 101),
)
def test_pop_due_agrees_with_the_latest_setting_of_every_key(
    settings: list[tuple[str, int | None]], clock: int
) -> None:
    index = DueIndex()
    latest: dict[str, int | None] = {}
    for key, minute in settings:
        index.set(key, None if minute is None else T0 + timedelta(minutes=minute))
        latest[key] = minute
    due = index.pop_due(T0 + timedelta(minutes=clock))
    expected = sorted((m, k) for k, m in latest.items() if m is not None and m < clock)
    assert due == [k for _, k in expected]
    assert len(due) == len(set(due))
    assert len(index) == sum(1 for m in latest.values() if m is not None and m >= clock)
    assert len(index._heap) <= 2 * len(latest) + 64 + 1


def test_pop_beyond_hands_out_the_earliest_until_the_bound_and_only_those_due() -> None:
    index = DueIndex()
    for minute, key in enumerate("abcde"):
        index.set(key, T0 + timedelta(minutes=minute))
    index.set("a", T0 + timedelta(minutes=9))  # moved last
    assert index.pop_beyond(2, T0 + timedelta(minutes=3)) == ["b", "c"]  # d is not before it
    assert index.pop_beyond(2, T0 + timedelta(days=1)) == ["d"]
    assert index.pop_beyond(2, T0 + timedelta(days=1)) == []
    assert sorted(index.pop_due(T0 + timedelta(days=1))) == ["a", "e"]


def test_pop_due_hands_out_at_most_the_earliest_keys_and_keeps_the_rest_due() -> None:
    index = DueIndex()
    for minute, key in enumerate("edcba"):
        index.set(key, T0 + timedelta(minutes=minute))
    clock = T0 + timedelta(hours=1)
    assert index.pop_due(clock, most=2) == ["e", "d"]
    assert len(index) == 3 and index.due_at("c") == T0 + timedelta(minutes=2)
    assert index.pop_due(clock, most=0) == []
    assert index.pop_due(clock) == ["c", "b", "a"]
