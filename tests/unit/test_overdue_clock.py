"""The overdue clock that pauses while the applicant owes documents, over weekends and holidays."""

from datetime import UTC, date, datetime, timedelta

from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.tz import VIETNAM_TZ
from services.metrics.calendar import add_working_days, is_working_day, working_days_between
from services.metrics.domain import (
    apply_all,
    event_from_envelope,
    new_state,
    overdue_event,
    overdue_to_emit,
)
from services.metrics.overdue_clock import (
    RECEIVED_BACK,
    REQUESTED,
    ClockEvent,
    classification_due,
    moved_due,
    run_clock,
)
from tests.unit.test_metrics_domain import make_event


def local(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=VIETNAM_TZ)


def requested(at: str) -> ClockEvent:
    return ClockEvent(REQUESTED, local(at), local(at))


def back(at: str, new_due_at: str | None = None) -> ClockEvent:
    return ClockEvent(
        RECEIVED_BACK, local(at), local(at), local(new_due_at) if new_due_at else None
    )


def test_a_pause_over_a_weekend_moves_the_due_date_by_the_working_days_paused() -> None:
    # requested Friday 15 March 2019, documents back Tuesday 19 March: Monday and Tuesday paused
    due = local("2019-03-21T09:00")  # a Thursday
    moved = moved_due(due, local("2019-03-15T10:00"), local("2019-03-19T08:00"))
    assert moved == local("2019-03-25T09:00")  # Thursday + 2 working days: Monday 25 March
    assert working_days_between(due, moved) == 2


def test_a_pause_over_tet_counts_no_holiday() -> None:
    # Tết 2019: 2-10 February off (Saturday 2 Feb to Sunday 10 Feb); back on Monday 11 February
    due = local("2019-02-13T09:00")
    moved = moved_due(due, local("2019-02-01T16:00"), local("2019-02-11T10:00"))
    assert moved == local("2019-02-14T09:00")  # one working day paused: Monday 11 February
    assert not any(is_working_day(date(2019, 2, day)) for day in range(4, 9))


def test_no_overdue_while_waiting_and_again_after_the_new_due_date() -> None:
    received = local("2019-03-04T09:00")
    due = local("2019-03-07T09:00")
    waiting = run_clock(received, due, [requested("2019-03-06T10:00")], None)
    assert waiting.waiting and waiting.overdue == ()  # past due, but the applicant owes documents
    resumed = run_clock(
        received,
        due,
        [requested("2019-03-06T10:00"), back("2019-03-11T10:00", "2019-03-13T09:00")],
        None,
    )
    assert not resumed.waiting and resumed.due_at == local("2019-03-13T09:00")
    assert resumed.overdue == ((local("2019-03-13T09:00"), None),)
    closed = run_clock(
        received,
        due,
        [requested("2019-03-06T10:00"), back("2019-03-11T10:00", "2019-03-13T09:00")],
        local("2019-03-12T15:00"),
    )
    assert closed.overdue == ()


def test_a_request_after_the_due_date_ends_the_overdue_stretch() -> None:
    received, due = local("2019-03-04T09:00"), local("2019-03-07T09:00")
    clock = run_clock(
        received, due, [requested("2019-03-08T10:00"), back("2019-03-12T10:00")], None
    )
    # overdue from due to the request; back on Tuesday 12 March after 2 working days paused
    # (Monday 11, Tuesday 12): due Monday 11 March 09:00, already passed, so overdue again
    assert clock.due_at == local("2019-03-11T09:00")
    assert clock.overdue == (
        (due, local("2019-03-08T10:00")),
        (local("2019-03-12T10:00"), None),
    )


def test_classification_uses_the_latest_new_due_at_only() -> None:
    due = local("2019-03-07T09:00")
    assert classification_due(due, [requested("2019-03-05T09:00"), back("2019-03-06T09:00")]) == due
    assert classification_due(
        due, [back("2019-03-06T09:00", "2019-03-12T09:00"), back("2019-03-08T09:00")]
    ) == local("2019-03-12T09:00")


moments = st.integers(0, 40 * 1440).map(lambda m: local("2019-01-25T00:00") + timedelta(minutes=m))


@settings(max_examples=200, deadline=None)
@given(
    moments,
    st.integers(0, 10),
    st.lists(st.tuples(st.integers(0, 6 * 1440), st.booleans(), st.booleans()), max_size=4),
    st.one_of(st.none(), st.integers(0, 30 * 1440)),
)
def test_overdue_stretches_never_overlap_a_pause_nor_precede_their_due_date(
    received: datetime,
    days: int,
    steps: list[tuple[int, bool, bool]],
    closes_after: int | None,
) -> None:
    due = add_working_days(received, days)
    events, clock = [], received
    for gap, is_request, with_date in steps:
        clock += timedelta(minutes=gap)
        if is_request:
            events.append(ClockEvent(REQUESTED, clock, clock))
        else:
            new_due = add_working_days(clock, 2) if with_date else None
            events.append(ClockEvent(RECEIVED_BACK, clock, clock, new_due))
    closed = None if closes_after is None else received + timedelta(minutes=closes_after)
    result = run_clock(received, due, events, closed)
    pauses: list[tuple[datetime, datetime | None]] = []
    paused_at: datetime | None = None
    for event in events:
        if closed is not None and event.time >= closed:
            break
        if event.type == REQUESTED and paused_at is None:
            paused_at = event.time
        elif event.type == RECEIVED_BACK and paused_at is not None:
            pauses.append((paused_at, event.time))
            paused_at = None
    if paused_at is not None:
        pauses.append((paused_at, None))
    assert result.waiting == (paused_at is not None)
    ends = [end for _, end in result.overdue]
    assert all(end is not None for end in ends[:-1])  # only the last stretch may be open
    for start, end in result.overdue:
        assert start >= received and (end is None or start < end)
        assert closed is None or (end is not None and end <= closed)
        assert start >= min(due, *(e.new_due_at for e in events if e.new_due_at), due)
        for pause_start, pause_end in pauses:  # a stretch lies wholly outside every pause
            inside_after = pause_end is None or start >= pause_end
            assert (end is not None and end <= pause_start) or inside_after
    for (_, first_end), (second_start, _) in zip(result.overdue, result.overdue[1:], strict=False):
        assert first_end is not None and first_end <= second_start


def envelope(kind: str, event_id: str, at: str, **data: str) -> dict[str, object]:
    event = make_event(kind, "D-1", event_id, local(at), agency_code="A", **data)
    return {
        "source": event.source,
        "id": event.id,
        "type": event.type,
        "subject": event.subject,
        "time": event.time.isoformat(),
        "data": dict(event.data),
    }


def test_no_overdue_event_while_waiting_and_one_per_new_due_date() -> None:
    events = [
        event_from_envelope(envelope("dossier.received", "e1", "2019-03-04T09:00",
                                     received_at=local("2019-03-04T09:00").isoformat(),
                                     due_at=local("2019-03-07T09:00").isoformat(),
                                     receipt_no="R-1")),
        event_from_envelope(envelope("dossier.supplement_requested", "e2", "2019-03-06T10:00",
                                     reason="scan",
                                     requested_at=local("2019-03-06T10:00").isoformat())),
    ]  # fmt: skip
    state, _ = apply_all(new_state("D-1"), events)
    after_due = local("2019-03-08T09:00")
    assert overdue_to_emit([state], after_due) == []
    resumed = event_from_envelope(
        envelope("dossier.supplement_received", "e3", "2019-03-11T10:00",
                 received_at=local("2019-03-11T10:00").isoformat())
    )  # fmt: skip
    state, _ = apply_all(state, [resumed])
    # paused Thursday 7, Friday 8 and Monday 11 March: due three working days later
    assert state.due_at == local("2019-03-12T09:00")
    assert overdue_to_emit([state], local("2019-03-12T09:00")) == []
    later = local("2019-03-12T09:01")
    assert overdue_to_emit([state], later) == [state]
    announced = overdue_event(state, later)
    assert announced["data"]["due_at"] == local("2019-03-12T09:00").isoformat()
    state, _ = apply_all(state, [event_from_envelope(announced)])
    assert state.overdue_emitted and overdue_to_emit([state], later) == []
    # a new pause and a new due date: announced again, with another id
    state, _ = apply_all(
        state,
        [
            event_from_envelope(envelope("dossier.supplement_requested", "e4", "2019-03-13T10:00",
                                         reason="scan",
                                         requested_at=local("2019-03-13T10:00").isoformat())),
            event_from_envelope(envelope("dossier.supplement_received", "e5", "2019-03-14T10:00",
                                         received_at=local("2019-03-14T10:00").isoformat(),
                                         new_due_at=local("2019-03-15T09:00").isoformat())),
        ],
    )  # fmt: skip
    assert not state.overdue_emitted
    again = overdue_event(state, local("2019-03-15T10:00").astimezone(UTC))
    assert again["id"] != announced["id"]
