"""The columnar store against the reference store and the naive recount of the domain tests."""

import itertools
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.metrics.codec import decode_state, encode_state
from services.metrics.domain import (
    Cell,
    DossierState,
    Event,
    OverdueIndex,
    apply,
    apply_all,
    contributions,
    difference,
    new_state,
)
from services.metrics.store import ColumnarStore
from tests.support.aggregate_oracle import AggregateStore
from tests.unit.test_metrics_domain import (
    AGENCIES,
    MARCH,
    SECTORS,
    START,
    TIERS,
    filter_sets,
    lifecycles,
    moments,
    naive_summary,
    received_event,
    resolved_event,
    streams,
    submitted_event,
)


def run(events: Iterable[Event], flush_rows: int = 7) -> tuple[ColumnarStore, AggregateStore]:
    columnar, reference = ColumnarStore(flush_rows=flush_rows), AggregateStore()
    states: dict[str, DossierState] = {}
    for event in events:
        state, deltas = apply(states.get(event.subject) or new_state(event.subject), event)
        states[event.subject] = state
        columnar.apply(deltas)
        reference.apply(deltas)
    return columnar, reference


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), moments, moments, filter_sets)
def test_columnar_summary_equals_the_naive_recount(
    events: list[Event], a: datetime, b: datetime, filters: dict[str, str]
) -> None:
    start, end = min(a, b), max(a, b)
    columnar, reference = run(events)
    expected = naive_summary(events, start, end, **filters)
    assert columnar.summary(start, end, **filters) == expected
    assert reference.summary(start, end, **filters) == expected
    whole = (START - timedelta(days=3), START + timedelta(days=80))
    assert columnar.summary(*whole) == naive_summary(events, *whole)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), moments, moments, st.sampled_from(("agency_code", "tier", "sector")))
def test_columnar_breakdown_equals_the_reference_store(
    events: list[Event], a: datetime, b: datetime, by: str
) -> None:
    start, end = min(a, b), max(a, b)
    columnar, reference = run(events)
    assert columnar.breakdown(by, start, end) == reference.breakdown(by, start, end)  # type: ignore[arg-type]
    values = {"agency_code": AGENCIES, "tier": TIERS, "sector": SECTORS}[by]
    zero = ColumnarStore().summary(start, end)["dossiers"]
    groups = columnar.breakdown(by, start, end)  # type: ignore[arg-type]
    for value in (*values, "unknown"):
        assert (
            groups.get(value, zero) == naive_summary(events, start, end, **{by: value})["dossiers"]
        )


def test_many_combos_grow_the_matrices() -> None:
    events = []
    for i in range(200):
        events.append(submitted_event(f"D-{i}", "e1", "2019-03-04T08:00:00+07:00"))
        received = received_event(
            f"D-{i}", "e2", "2019-03-04T09:00:00+07:00", "2019-03-07T09:00:00+07:00", f"A{i}"
        )
        events.append(received)
        events.append(resolved_event(f"D-{i}", "e3", "2019-03-06T09:00:00+07:00", f"A{i}"))
    columnar, reference = run(events, flush_rows=50)
    assert columnar.summary(*MARCH) == reference.summary(*MARCH)
    assert columnar.summary(*MARCH, agency_code="A7") == reference.summary(*MARCH, agency_code="A7")
    assert columnar.breakdown("agency_code", *MARCH) == reference.breakdown("agency_code", *MARCH)


def received(dossier: str, moment: datetime, agency: str) -> list[Event]:
    """A dossier submitted at `moment`, received an hour later by `agency`, due 5 days on."""
    return [
        submitted_event(dossier, "e1", moment.isoformat()),
        received_event(
            dossier,
            "e2",
            (moment + timedelta(hours=1)).isoformat(),
            (moment + timedelta(days=5)).isoformat(),
            agency,
        ),
    ]


def test_block_prefix_sums_follow_a_live_store() -> None:
    """Queries between deltas, with new days before, inside and after those already counted,
    over ranges long enough for the block-prefix sums: always the reference store's answers."""
    columnar, reference = ColumnarStore(flush_rows=3), AggregateStore()
    base = datetime(2019, 3, 1, tzinfo=UTC)
    days = [40, 41, 90, 3, 60, 61, 62, 120, 0, 75, 40, 119, 17, 33]
    ranges = [(0, 130), (1, 100), (20, 70), (39, 121), (5, 62), (45, 46)]
    for n, day in enumerate(days):
        dossier = f"L-{n}"
        moment = base + timedelta(days=day, hours=3)
        events = received(dossier, moment, AGENCIES[n % len(AGENCIES)])
        if n % 3:
            when = moment + timedelta(days=n % 9, hours=2)
            events.append(resolved_event(dossier, "e3", when.isoformat(), AGENCIES[0]))
        _, deltas = apply_all(new_state(dossier), events)
        columnar.apply(deltas)
        reference.apply(deltas)
        for first, last in ranges:
            start = base + timedelta(days=first, minutes=7 * n)
            end = base + timedelta(days=last, minutes=11 * n)
            assert columnar.summary(start, end) == reference.summary(start, end), (n, first)
            by_agency = columnar.summary(start, end, agency_code=AGENCIES[0])
            assert by_agency == reference.summary(start, end, agency_code=AGENCIES[0])


def _two_histories(years_apart: int) -> tuple[ColumnarStore, AggregateStore, datetime]:
    """Dossiers over two months of 2019, and as many `years_apart` years later (a replayed
    history beside live reports), with queries between the deltas."""
    columnar, reference = ColumnarStore(flush_rows=5), AggregateStore()
    base = datetime(2019, 3, 1, tzinfo=UTC)
    for n in range(24):
        moment = base + timedelta(days=(n * 37) % 60, hours=n % 24)
        if n % 2:
            moment = moment.replace(year=moment.year + years_apart)
        dossier = f"Y-{n}"
        events = [
            *received(dossier, moment, AGENCIES[n % len(AGENCIES)]),
            resolved_event(dossier, "e3", (moment + timedelta(days=n % 7)).isoformat()),
        ]
        _, deltas = apply_all(new_state(dossier), events)
        columnar.apply(deltas)
        reference.apply(deltas)
        end = base.replace(year=2019 + years_apart) + timedelta(days=70)
        assert columnar.summary(base, end) == reference.summary(base, end)
    return columnar, reference, base


def test_the_years_between_two_histories_cost_nothing() -> None:
    """Every range across, within and between two histories seven years apart is the
    reference store's, and the store holds what it holds for the same days a year apart: the
    empty years in between take no memory."""
    columnar, reference, base = _two_histories(7)
    later = base.replace(year=2026)
    ranges = [
        (base, later + timedelta(days=70)),
        (base + timedelta(days=20, minutes=7), later + timedelta(days=33, minutes=3)),
        (base + timedelta(days=90), later - timedelta(days=1)),  # between: nothing
        (later + timedelta(days=3), later + timedelta(days=12, hours=5)),
        (base - timedelta(days=400), base + timedelta(days=31)),
    ]
    for start, end in ranges:
        assert columnar.summary(start, end) == reference.summary(start, end), (start, end)
        assert columnar.breakdown("agency_code", start, end) == reference.breakdown(
            "agency_code", start, end
        )
    assert columnar.summary(*ranges[2])["dossiers"]["received"] == 0
    assert columnar.summary(*ranges[2])["dossiers"]["in_progress"] == 0
    near, _, _ = _two_histories(1)
    assert columnar.nbytes <= near.nbytes


def test_packed_deltas_move_the_sums_as_the_deltas_do() -> None:
    """A dossier's contributions kept packed by the store, then replaced and taken back: the
    same figures as applying the deltas themselves."""
    packed_store, plain = ColumnarStore(flush_rows=3), ColumnarStore(flush_rows=3)
    moment = datetime(2019, 3, 4, 8, tzinfo=UTC)
    events = [
        submitted_event("P-1", "e1", moment.isoformat()),
        received_event(
            "P-1",
            "e2",
            (moment + timedelta(hours=1)).isoformat(),
            (moment + timedelta(days=3)).isoformat(),
        ),
        resolved_event("P-1", "e3", (moment + timedelta(days=2)).isoformat()),
    ]
    first, _ = apply_all(new_state("P-1"), events[:2])
    second, _ = apply_all(first, events[2:])
    before = packed_store.apply_and_pack(contributions(first))
    assert {
        (Cell(minute, agency, tier, sector), counter): value
        for minute, agency, tier, sector, counter, value in packed_store.cells(before)
    } == contributions(first)
    after = packed_store.pack(contributions(second))
    packed_store.apply_change(before, after)
    plain.apply(contributions(second))
    assert packed_store.summary(*MARCH) == plain.summary(*MARCH)
    assert packed_store.summary(*MARCH)["dossiers"]["resolved"] == 1
    packed_store.apply_packed(after, -1)
    assert packed_store.summary(*MARCH) == ColumnarStore().summary(*MARCH)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_state_codec_round_trips_and_batches_equal_single_events(data: Any) -> None:
    events = data.draw(lifecycles("D-1"))
    state = new_state("D-1")
    for event in events:
        state, _ = apply(state, event)
    decoded = decode_state("D-1", encode_state(state))
    assert decoded == state
    assert contributions(decoded) == contributions(state)
    split = data.draw(st.integers(0, len(events)))
    first, _ = apply_all(new_state("D-1"), events[:split])
    batched, deltas = apply_all(decode_state("D-1", encode_state(first)), events)
    assert batched == state
    assert deltas == difference(contributions(state), contributions(first))
    assert apply_all(batched, events) == (batched, {})


def test_overdue_index_pops_each_due_dossier_once() -> None:
    index = OverdueIndex()
    due = "2019-03-07T09:00:00+07:00"
    state, _ = apply(
        new_state("D-1"), received_event("D-1", "e1", "2019-03-04T09:00:00+07:00", due)
    )
    index.track(state)
    index.track(state)
    later, _ = apply(
        new_state("D-2"),
        received_event("D-2", "e1", "2019-03-04T09:00:00+07:00", "2019-03-20T09:00:00+07:00"),
    )
    index.track(later)
    assert index.pop_due(datetime.fromisoformat(due)) == []
    assert index.pop_due(datetime.fromisoformat("2019-03-08T00:00:00+07:00")) == ["D-1"]
    assert index.pop_due(datetime.fromisoformat("2019-03-08T00:00:00+07:00")) == []
    resolved, _ = apply(later, resolved_event("D-2", "e2", "2019-03-10T09:00:00+07:00"))
    index.track(resolved)
    assert len(index) == 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), moments, st.lists(st.integers(1, 5 * 1440 * 60), min_size=1, max_size=8),
       filter_sets)  # fmt: skip
def test_a_series_equals_the_summaries_of_its_steps(
    events: list[Event], first: datetime, steps: list[int], filters: dict[str, str]
) -> None:
    columnar, _ = run(events)
    bounds = [first]
    for seconds in steps:
        bounds.append(bounds[-1] + timedelta(seconds=seconds))
    got = columnar.series(bounds, **filters)
    assert got == [columnar.counters(a, b, **filters) for a, b in itertools.pairwise(bounds)]
    scope = {AGENCIES[0]}
    assert columnar.series(bounds, agencies=scope) == [
        columnar.counters(a, b, agencies=scope) for a, b in itertools.pairwise(bounds)
    ]


def test_a_state_record_written_before_online_level_was_kept_still_decodes() -> None:
    submitted = ["portal/dev", "e1", 6, "2019-03-04T08:00:00+07:00", "A", 0, None, None,
                 "district", "land", "counter"]  # fmt: skip
    received = ["portal/dev", "e2", 2, "2019-03-04T09:00:00+07:00", "A", 0,
                "2019-03-04T09:00:00+07:00", "2019-03-07T09:00:00+07:00"]  # fmt: skip
    overdue = ["motcua/metrics", "o1", 1, "2019-03-07T09:01:00+07:00", "A"]  # no due_at kept
    state = decode_state("D-1", orjson.dumps([1, [submitted, received, overdue]]))
    assert (state.tier, state.channel, state.online_level) == ("district", "counter", None)
    assert state.due_at == datetime.fromisoformat("2019-03-07T09:00:00+07:00")
    assert state.overdue_emitted  # an overdue of an older record counts for its due date
    assert decode_state("D-1", encode_state(state)) == state
