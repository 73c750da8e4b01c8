"""The retention's closing moments on disk (services/intake/closing_file.py): rounds folded one
after another through the file close as one fold of every event, the keys due are those
`closing.due` names, and a process started again finds where its last round ended."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from services.intake.closing import Stories, due
from services.intake.closing_file import ClosingFile, micros, moment, rows_of, stories_of

T0 = datetime(2024, 1, 1, 8, 30, 15, 123456, tzinfo=UTC)
DAY = timedelta(days=1)
RETENTION = 30 * DAY

kinds = st.sampled_from(
    ["dossier.resolved", "dossier.result_returned", "dossier.withdrawn", "dossier.rejected"]
)
events = st.lists(
    st.tuples(kinds, st.sampled_from(["a", "b", "c", "d"]), st.integers(0, 100)), max_size=30
)


def fold_in_rounds(file: ClosingFile, rounds: list[list[tuple[str, str, int]]]) -> None:
    for number, part in enumerate(rounds):
        stories = file.stories({dossier_id for _, dossier_id, _ in part})
        for kind, dossier_id, day in part:
            stories.add(kind, dossier_id, T0 + day * DAY)
        file.save(stories, {0: number + 1}, None)


@given(events=events, cut=st.integers(0, 30), now=st.integers(0, 200))
def test_rounds_through_the_file_close_as_one_fold_of_every_event(
    events: list[tuple[str, str, int]], cut: int, now: int
) -> None:
    whole = Stories()
    for kind, dossier_id, day in events:
        whole.add(kind, dossier_id, T0 + day * DAY)
    file = ClosingFile(None, "keys-1")
    fold_in_rounds(file, [events[:cut], events[cut:]])
    held = file.stories(["a", "b", "c", "d"])
    assert held.closed() == whole.closed()
    assert held.open == whole.open
    at = T0 + now * DAY
    assert file.closed_before(at - RETENTION) == due(whole.closed(), at, RETENTION)


@given(st.datetimes(timezones=st.just(UTC)))
def test_moments_are_kept_to_the_microsecond(at: datetime) -> None:
    assert moment(micros(at)) == at


def test_rows_hold_what_stories_hold() -> None:
    stories = Stories()
    stories.add("dossier.resolved", "open", T0)
    stories.add("dossier.resolved", "done", T0)
    stories.add("dossier.result_returned", "done", T0 + DAY)
    stories.add("dossier.rejected", "ended", T0 + 2 * DAY)
    again = stories_of(rows_of(stories))
    assert (again.open, again.done, again.ended) == (stories.open, stories.done, stories.ended)


def test_a_process_started_again_finds_its_rounds_and_another_key_file_empties_it(
    tmp_path: Path,
) -> None:
    first = ClosingFile.in_directory(tmp_path, "keys-1")
    stories = Stories()
    stories.add("dossier.withdrawn", "a", T0)
    stories.add("dossier.resolved", "b", T0)
    first.save(stories, {0: 12, 1: 7}, T0 + DAY)
    first.close()

    again = ClosingFile.in_directory(tmp_path, "keys-1")
    assert again.upto() == {0: 12, 1: 7}
    assert again.history_now() == T0 + DAY
    assert again.closed_before(T0) == ["a"]
    assert set(again.stories(["a", "b", "x"]).open) == {"b"}
    again.drop(["a"])
    assert again.closed_before(T0) == []

    again.follow("keys-2")  # the keys were read again from the beginning: so is the topic
    assert again.upto() == {} and again.count() == 0 and again.history_now() is None
    again.close()
