"""When a dossier's personal data is due for destruction (services/intake/closing.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from services.intake.closing import HistoryClock, Stories, due

T0 = datetime(2024, 1, 1, tzinfo=UTC)
DAY = timedelta(days=1)


def test_withdrawn_and_rejected_close_at_once_resolved_once_returned_too() -> None:
    stories = Stories()
    stories.add("dossier.submitted", "open", T0)
    stories.add("dossier.withdrawn", "withdrawn", T0 + DAY)
    stories.add("dossier.rejected", "rejected", T0 + 2 * DAY)
    stories.add("dossier.resolved", "resolved-only", T0)
    stories.add("dossier.resolved", "returned", T0 + DAY)
    stories.add("dossier.result_returned", "returned", T0 + 3 * DAY)
    assert stories.closed() == {
        "withdrawn": T0 + DAY,
        "rejected": T0 + 2 * DAY,
        "returned": T0 + 3 * DAY,
    }


def test_keys_are_due_the_retention_after_closing() -> None:
    closed = {"a": T0, "b": T0 + 10 * DAY}
    assert due(closed, T0 + 90 * DAY, 90 * DAY) == ["a"]
    assert due(closed, T0 + 90 * DAY - timedelta(seconds=1), 90 * DAY) == []


kinds = st.sampled_from(
    ["dossier.resolved", "dossier.result_returned", "dossier.withdrawn", "dossier.received"]
)


@given(events=st.lists(st.tuples(kinds, st.integers(0, 100)), max_size=12), seed=st.randoms())
def test_the_closing_moment_does_not_depend_on_the_order_events_are_read(
    events: list[tuple[str, int]], seed: object
) -> None:
    forward, shuffled = Stories(), Stories()
    for kind, day in events:
        forward.add(kind, "d", T0 + day * DAY)
    mixed = list(events)
    seed.shuffle(mixed)  # type: ignore[attr-defined]
    for kind, day in mixed:
        shuffled.add(kind, "d", T0 + day * DAY)
    assert forward.closed() == shuffled.closed()


@given(days=st.lists(st.integers(0, 400), min_size=1, max_size=20))
def test_a_replayed_history_s_now_is_its_latest_closing_moment_read_in_any_order(
    days: list[int],
) -> None:
    clock = HistoryClock()
    assert clock.now is None
    for day in days:
        clock.read(T0 + day * DAY)
    assert clock.now == T0 + max(days) * DAY


def test_in_a_replayed_history_keys_are_due_once_it_has_moved_on_by_the_retention() -> None:
    """A half-year replayed in minutes: the keys of its dossiers closed more than the retention
    before the latest closing read are due, the others kept, whatever the wall clock says."""
    stories, clock = Stories(), HistoryClock()
    for kind, dossier_id, at in [
        ("dossier.withdrawn", "early", T0),
        ("dossier.resolved", "late", T0 + 5 * DAY),
        ("dossier.result_returned", "late", T0 + 6 * DAY),
        ("dossier.rejected", "last", T0 + 8 * DAY),
    ]:
        stories.add(kind, dossier_id, at)
        clock.read(at)
    assert clock.now == T0 + 8 * DAY
    assert due(stories.closed(), clock.now, 7 * DAY) == ["early"]


@given(events=st.lists(st.tuples(kinds, st.integers(0, 100)), max_size=12))
def test_the_closing_moment_is_the_first_ending_else_the_latest_resolution_or_return(
    events: list[tuple[str, int]],
) -> None:
    stories = Stories()
    for kind, day in events:
        stories.add(kind, "d", T0 + day * DAY)
    days = {kind: [d for k, d in events if k == kind] for kind, _ in events}
    if days.get("dossier.withdrawn"):
        want: datetime | None = T0 + min(days["dossier.withdrawn"]) * DAY
    elif days.get("dossier.resolved") and days.get("dossier.result_returned"):
        latest = max(days["dossier.resolved"] + days["dossier.result_returned"])
        want = T0 + latest * DAY
    else:
        want = None
    assert stories.closed().get("d") == want
