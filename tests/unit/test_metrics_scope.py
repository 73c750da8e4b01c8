"""An operator's agency scope in the columnar store (CONTRACT section 8): a scoped summary is the
reference store's figures of each agency in the scope, summed; a scoped breakdown groups only the
dossiers of those agencies. The expected answers come from `tests/support/aggregate_oracle.py`,
asked one agency at a time."""

from datetime import datetime
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.metrics.domain import COUNTERS, Dimension, Event, dossiers_block, summary_of
from tests.support.aggregate_oracle import AggregateStore
from tests.unit.test_metrics_domain import (
    AGENCIES,
    MARCH,
    filter_sets,
    moments,
    received_event,
    resolved_event,
    streams,
    submitted_event,
)
from tests.unit.test_metrics_store import run

SCOPE_AGENCIES = (*AGENCIES, "unknown", "000.99.99.H34")  # the last one never has a dossier
scopes = st.frozensets(st.sampled_from(SCOPE_AGENCIES))


def scoped_counters(
    reference: AggregateStore,
    scope: frozenset[str],
    start: datetime,
    end: datetime,
    filters: dict[str, str],
) -> dict[str, int]:
    """The oracle's counters restricted to `scope`: its agencies' counters, summed."""
    wanted = filters.get("agency_code")
    others = {name: value for name, value in filters.items() if name != "agency_code"}
    total = dict.fromkeys(COUNTERS, 0)
    for agency in scope:
        if wanted is not None and agency != wanted:
            continue  # a filter outside the scope counts nothing
        counts = reference.counters(start, end, agency_code=agency, **others)
        for name, value in counts.items():
            total[name] += value
    return total


def scoped_breakdown(
    reference: AggregateStore, by: Dimension, scope: frozenset[str], start: datetime, end: datetime
) -> dict[str, dict[str, Any]]:
    """The oracle's breakdown restricted to `scope` (groups with nothing at all left out): its
    unscoped groups (counters are never negative, so a scoped group is one of them), each counted
    over the agencies of the scope."""
    groups: dict[str, dict[str, Any]] = {}
    for name in reference.breakdown(by, start, end):
        counts = scoped_counters(reference, scope, start, end, {by: name})
        if any(counts.values()):
            groups[name] = dossiers_block(counts)
    return groups


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), moments, moments, filter_sets, scopes)
def test_a_scoped_summary_is_the_sum_of_its_agencies(
    events: list[Event], a: datetime, b: datetime, filters: dict[str, str], scope: frozenset[str]
) -> None:
    start, end = min(a, b), max(a, b)
    columnar, reference = run(events)
    expected = summary_of(scoped_counters(reference, scope, start, end, filters), start, end)
    assert columnar.summary(start, end, **filters, agencies=scope) == expected


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), moments, moments, st.sampled_from(("agency_code", "tier", "sector")), scopes)
def test_a_scoped_breakdown_groups_only_its_agencies_dossiers(
    events: list[Event], a: datetime, b: datetime, by: Dimension, scope: frozenset[str]
) -> None:
    start, end = min(a, b), max(a, b)
    columnar, reference = run(events)
    groups = columnar.breakdown(by, start, end, agencies=scope)
    assert groups == scoped_breakdown(reference, by, scope, start, end)
    if by == "agency_code":
        assert set(groups) <= scope


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), moments, moments)
def test_a_scope_of_every_agency_is_no_scope(events: list[Event], a: datetime, b: datetime) -> None:
    start, end = min(a, b), max(a, b)
    columnar, _ = run(events)
    everyone = frozenset(SCOPE_AGENCIES)
    assert columnar.summary(start, end, agencies=everyone) == columnar.summary(start, end)
    for by in ("agency_code", "tier", "sector"):
        assert columnar.breakdown(by, start, end, agencies=everyone) == columnar.breakdown(
            by, start, end
        )


def test_an_agency_outside_the_scope_counts_nothing() -> None:
    events = []
    for i, agency in enumerate(AGENCIES):
        events.append(submitted_event(f"D-{i}", "e1", "2019-03-04T08:00:00+07:00"))
        events.append(
            received_event(
                f"D-{i}", "e2", "2019-03-04T09:00:00+07:00", "2019-03-07T09:00:00+07:00", agency
            )
        )
        events.append(resolved_event(f"D-{i}", "e3", "2019-03-06T09:00:00+07:00", agency))
    columnar, reference = run(events)
    mine = frozenset({AGENCIES[0]})
    outside = columnar.summary(*MARCH, agency_code=AGENCIES[1], agencies=mine)
    assert outside == AggregateStore().summary(*MARCH)
    assert outside["dossiers"]["received"] == 0
    inside = columnar.summary(*MARCH, agency_code=AGENCIES[0], agencies=mine)
    assert inside == reference.summary(*MARCH, agency_code=AGENCIES[0])
    assert inside["dossiers"]["received"] == 1
    assert columnar.summary(*MARCH, agencies=mine) == inside
    assert set(columnar.breakdown("agency_code", *MARCH, agencies=mine)) == {AGENCIES[0]}
    assert columnar.summary(*MARCH, agencies=frozenset())["dossiers"]["received"] == 0
