"""The metrics core: classification, idempotent dossier state, aggregates vs a naive recount."""

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.common.tz import VIETNAM_TZ
from services.metrics.calendar import add_working_days, working_days_between
from services.metrics.domain import (
    Deltas,
    DossierState,
    Event,
    apply,
    classify,
    contributions,
    event_from_envelope,
    new_state,
    overdue_event,
    overdue_to_emit,
)
from tests.support.aggregate_oracle import AggregateStore

# --- classification ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resolved_at", "due_at", "expected"),
    [
        ("2019-03-04T17:00:00+07:00", "2019-03-05T17:00:00+07:00", "early"),
        ("2019-03-05T08:00:00+07:00", "2019-03-05T17:00:00+07:00", "on_time"),
        ("2019-03-05T17:00:00+07:00", "2019-03-05T17:00:00+07:00", "on_time"),  # at due_at
        ("2019-03-05T17:00:01+07:00", "2019-03-05T17:00:00+07:00", "late"),  # same day, after
        ("2019-03-06T07:00:00+07:00", "2019-03-05T17:00:00+07:00", "late"),
        # offsets other than +07:00 that cross midnight
        ("2019-03-04T23:30:00+00:00", "2019-03-05T17:00:00+07:00", "on_time"),  # 5 March local
        ("2019-03-04T16:59:59+00:00", "2019-03-05T17:00:00+07:00", "early"),  # 4 March 23:59
        ("2019-03-04T12:30:00-05:00", "2019-03-05T17:00:00+07:00", "on_time"),  # 5 March 00:30
        ("2019-03-05T10:00:00+00:00", "2019-03-05T17:00:00+07:00", "on_time"),  # 17:00 local
        ("2019-03-05T10:00:01+00:00", "2019-03-05T17:00:00+07:00", "late"),
        ("2019-03-05T17:30:00+00:00", "2019-03-05T17:00:00+07:00", "late"),  # 6 March 00:30
        # a due date written in UTC still has its due day in Hà Nội
        ("2019-03-04T18:00:00+00:00", "2019-03-05T10:00:00+00:00", "on_time"),
        ("2019-03-04T16:59:59+00:00", "2019-03-05T10:00:00+00:00", "early"),
        ("2019-03-05T01:00:00+07:00", "2019-03-04T18:00:00+00:00", "on_time"),  # due 01:00 local
        ("2019-03-04T23:59:00+07:00", "2019-03-04T18:00:00+00:00", "early"),
        # due just before local midnight
        ("2019-03-05T16:30:00+00:00", "2019-03-05T23:59:00+07:00", "on_time"),
        ("2019-03-04T17:00:00+00:00", "2019-03-05T23:59:00+07:00", "on_time"),
        ("2019-03-05T17:00:00+00:00", "2019-03-05T23:59:00+07:00", "late"),
    ],
)
def test_classification(resolved_at: str, due_at: str, expected: str) -> None:
    assert classify(datetime.fromisoformat(resolved_at), datetime.fromisoformat(due_at)) == expected


# --- building events -----------------------------------------------------------------------------

SOURCES = {
    "dossier": "portal/dev",
    "payment": "motcua/payments",
    "postal": "motcua/postal",
    "sms": "motcua/sms",
    "survey": "motcua/survey",
}
AGENCIES = ("000.00.12.H34", "000.00.21.H34", "000.30.32.H34")
TIERS = ("province", "district", "commune")
SECTORS = ("land", "construction", "justice")
CHANNELS = ("online", "counter", "postal")
OFFSETS = (VIETNAM_TZ, UTC, timezone(timedelta(hours=-5)), timezone(timedelta(hours=9, minutes=30)))
START = datetime(2019, 1, 25, tzinfo=VIETNAM_TZ)  # a window across Tết
SPAN_MINUTES = 40 * 1440
OUTCOME_TYPES = (
    "payment.requested", "payment.succeeded", "payment.failed", "payment.expired",
    "payment.refunded", "payment.reconciliation_mismatch",
    "postal.pickup_requested", "postal.picked_up", "postal.return_requested", "postal.delivered",
    "postal.failed", "postal.cod_collected",
    "sms.queued", "sms.sent", "sms.delivered", "sms.failed", "sms.suppressed",
)  # fmt: skip


def make_event(kind: str, dossier_id: str, event_id: str, time: datetime, **data: Any) -> Event:
    return Event(
        SOURCES[kind.split(".")[0]],
        event_id,
        kind,
        dossier_id,
        time,
        {"dossier_id": dossier_id, **data},
    )


@st.composite
def lifecycles(draw: st.DrawFn, dossier_id: str) -> list[Event]:
    """One dossier's events in the order they happened, timestamps in assorted offsets."""
    numbers = itertools.count()
    events: list[Event] = []
    clock = START + timedelta(minutes=draw(st.integers(0, SPAN_MINUTES)))

    def add(kind: str, at: datetime, **data: Any) -> None:
        shown = at.astimezone(draw(st.sampled_from(OFFSETS)))
        events.append(make_event(kind, dossier_id, f"{dossier_id}-{next(numbers)}", shown, **data))

    def later(max_minutes: int) -> datetime:
        nonlocal clock
        clock += timedelta(
            minutes=draw(st.integers(0, max_minutes)), seconds=draw(st.integers(0, 59))
        )
        return clock

    agency = draw(st.sampled_from(AGENCIES))
    channel = draw(st.sampled_from(CHANNELS))
    tier, sector = draw(st.sampled_from(TIERS)), draw(st.sampled_from(SECTORS))
    level = draw(st.sampled_from((None, 3, 4))) if channel != "online" else 4
    add("dossier.submitted", clock, agency_code=agency, tier=tier, sector=sector, channel=channel,
        online_level=level)  # fmt: skip
    fate = draw(st.sampled_from(("received", "received", "received", "rejected", "waiting")))
    if fate == "rejected":
        add("dossier.rejected", later(600), agency_code=agency, reason="incomplete")
    elif fate == "received":
        received_at = later(3 * 1440)
        due = add_working_days(received_at, draw(st.integers(0, 10)))
        add(
            "dossier.received",
            received_at,
            agency_code=agency,
            received_at=received_at.astimezone(draw(st.sampled_from(OFFSETS))).isoformat(),
            due_at=due.astimezone(draw(st.sampled_from(OFFSETS))).isoformat(),
            receipt_no="R-1",
        )
        for _ in range(draw(st.integers(0, 2))):  # the clock pauses, perhaps past due
            requested = later(draw(st.sampled_from((1440, 6 * 1440))))
            add("dossier.supplement_requested", requested, agency_code=agency, reason="scan",
                requested_at=requested.isoformat())  # fmt: skip
            if draw(st.booleans()):
                back = later(4 * 1440)
                new_due = add_working_days(back, draw(st.integers(1, 5)))
                extra = {"new_due_at": new_due.isoformat()} if draw(st.booleans()) else {}
                add("dossier.supplement_received", back, agency_code=agency,
                    received_at=back.isoformat(), **extra)  # fmt: skip
                due = new_due if extra else due
        if draw(st.booleans()):
            new_agency = draw(st.sampled_from(AGENCIES))
            add("dossier.transferred", later(1440), agency_code=agency, to_agency_code=new_agency)
            agency = new_agency
        end = draw(st.sampled_from(("resolved", "resolved", "withdrawn", "open")))
        if end == "resolved":
            # around the due date, so that all three classes and the edges occur
            drift = timedelta(minutes=draw(st.integers(-4 * 1440, 3 * 1440)))
            resolved_at = max(clock, due + drift)
            clock = resolved_at
            if resolved_at > due and draw(st.booleans()):
                add("dossier.apology_issued", clock, agency_code=agency, reason="late",
                    new_due_at=(clock + timedelta(days=3)).isoformat())  # fmt: skip
            add("dossier.resolved", resolved_at, agency_code=agency,
                resolved_at=resolved_at.isoformat(), outcome="approved")  # fmt: skip
            if draw(st.booleans()):
                add("dossier.result_returned", later(2880), agency_code=agency, via="counter")
                previous: tuple[int, datetime] | None = None
                for _ in range(draw(st.integers(0, 3))):  # survey answers, each replacing the last
                    score, answered_at = draw(st.integers(1, 5)), later(20 * 1440)
                    clock = answered_at = answered_at + timedelta(minutes=1)
                    replaced = previous[1].isoformat() if previous else None
                    add("survey.answered", answered_at, agency_code=agency, score=score,
                        answered_at=answered_at.isoformat(),
                        previous_score=previous[0] if previous else None,
                        previous_answered_at=replaced)  # fmt: skip
                    previous = (score, answered_at)
        elif end == "withdrawn":
            add("dossier.withdrawn", later(5 * 1440), agency_code=agency)
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(OUTCOME_TYPES))
        amount = draw(st.integers(0, 500_000))
        add(kind, START + timedelta(minutes=draw(st.integers(0, SPAN_MINUTES))),
            amount_vnd=amount, segments=amount % 4)  # fmt: skip
    return events


def run(events: Iterable[Event]) -> tuple[AggregateStore, dict[str, DossierState], Deltas]:
    """Feed events through apply() and the store, as the service would."""
    store, states, total = AggregateStore(), dict[str, DossierState](), Counter[Any]()
    for event in events:
        state, deltas = apply(states.get(event.subject) or new_state(event.subject), event)
        states[event.subject] = state
        store.apply(deltas)
        total.update(deltas)
    return store, states, {key: value for key, value in total.items() if value}


# --- idempotence ---------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_order_with_redeliveries_gives_the_aggregates_of_the_clean_stream(data: Any) -> None:
    events = data.draw(lifecycles("D-1"))
    redelivered = data.draw(st.lists(st.sampled_from(events), max_size=len(events) + 2))
    messy = data.draw(st.permutations(events + redelivered))

    clean_store, clean_states, clean_total = run(events)
    messy_store, messy_states, messy_total = run(messy)

    assert messy_states == clean_states
    assert messy_total == clean_total == contributions(clean_states["D-1"])
    whole = (START - timedelta(days=30), START + timedelta(days=90))
    assert messy_store.summary(*whole) == clean_store.summary(*whole)
    for by in ("agency_code", "tier", "sector"):
        assert messy_store.breakdown(by, *whole) == clean_store.breakdown(by, *whole)


def test_a_redelivered_event_gives_no_delta() -> None:
    submitted = make_event(
        "dossier.submitted", "D-1", "e1", datetime(2019, 3, 4, 8, 0, tzinfo=VIETNAM_TZ),
        agency_code="A", tier="province", sector="land", channel="online",
    )  # fmt: skip
    state, deltas = apply(new_state("D-1"), submitted)
    assert state.status == "submitted" and state.tier == "province"
    assert deltas == {}  # nothing counts a submission
    received = received_event("D-1", "e2", "2019-03-04T09:00:00+07:00", "2019-03-07T09:00:00+07:00")
    state, deltas = apply(state, received)
    assert deltas
    assert apply(state, received) == (state, {})


def test_an_event_for_another_dossier_is_refused() -> None:
    event = received_event("D-2", "e1", "2019-03-04T09:00:00+07:00", "2019-03-07T09:00:00+07:00")
    with pytest.raises(ValueError, match="D-2"):
        apply(new_state("D-1"), event)


# --- joins, apologies, gauges --------------------------------------------------------------------


def received_event(dossier_id: str, event_id: str, at: str, due: str, agency: str = "A") -> Event:
    return make_event(
        "dossier.received", dossier_id, event_id, datetime.fromisoformat(at),
        agency_code=agency, received_at=at, due_at=due, receipt_no="R",
    )  # fmt: skip


def resolved_event(dossier_id: str, event_id: str, at: str, agency: str = "A") -> Event:
    return make_event(
        "dossier.resolved", dossier_id, event_id, datetime.fromisoformat(at),
        agency_code=agency, resolved_at=at, outcome="approved",
    )  # fmt: skip


def submitted_event(
    dossier_id: str, event_id: str, at: str, channel: str = "online", level: int | None = None
) -> Event:
    return make_event(
        "dossier.submitted", dossier_id, event_id, datetime.fromisoformat(at),
        agency_code="A", tier="district", sector="land", channel=channel, online_level=level,
    )  # fmt: skip


def test_the_eligible_online_rate_counts_only_procedures_offered_online() -> None:
    events = []
    for number, (channel, level) in enumerate(
        [("online", 4), ("counter", 3), ("postal", 4), ("counter", None), ("counter", None)]
    ):
        dossier = f"D-{number}"
        events += [
            submitted_event(dossier, f"{dossier}-1", "2019-03-04T08:00:00+07:00", channel, level),
            received_event(
                dossier, f"{dossier}-2", "2019-03-04T09:00:00+07:00", "2019-03-07T09:00:00+07:00"
            ),
            resolved_event(dossier, f"{dossier}-3", "2019-03-06T09:00:00+07:00"),
        ]
    store, states, _ = run(events)
    assert states["D-1"].online_level == 3 and states["D-3"].online_level is None
    dossiers = store.summary(*MARCH)["dossiers"]
    assert (dossiers["resolved"], dossiers["online_resolved"]) == (5, 1)
    assert dossiers["online_rate"] == 1 / 5  # every resolved dossier
    assert dossiers["online_eligible_resolved"] == 3  # level 3 or 4, whatever the channel
    assert dossiers["online_rate_eligible"] == 1 / 3
    assert store.summary(*MARCH)["dossiers"] == naive_summary(events, *MARCH)["dossiers"]


MARCH = (datetime(2019, 3, 1, tzinfo=VIETNAM_TZ), datetime(2019, 4, 1, tzinfo=VIETNAM_TZ))


def test_an_apology_never_turns_late_into_on_time() -> None:
    apology = make_event(
        "dossier.apology_issued", "D-1", "e3", datetime(2019, 3, 7, 10, 0, tzinfo=VIETNAM_TZ),
        agency_code="A", reason="late", new_due_at="2019-03-12T09:00:00+07:00",
    )  # fmt: skip
    store, states, _ = run(
        [
            submitted_event("D-1", "e1", "2019-03-04T08:00:00+07:00"),
            received_event("D-1", "e2", "2019-03-04T09:00:00+07:00", "2019-03-07T09:00:00+07:00"),
            apology,
            resolved_event("D-1", "e4", "2019-03-08T15:00:00+07:00"),
        ]
    )
    assert states["D-1"].resolution == "late"
    dossiers = store.summary(*MARCH)["dossiers"]
    assert (dossiers["late"], dossiers["apologies"], dossiers["on_time_rate"]) == (1, 1, 0.0)


def test_counts_made_before_the_submission_arrives_move_to_its_tier_and_sector() -> None:
    events = [
        received_event("D-1", "e2", "2019-03-04T09:00:00+07:00", "2019-03-07T09:00:00+07:00"),
        resolved_event("D-1", "e3", "2019-03-06T09:00:00+07:00"),
    ]
    store, _, _ = run(events)
    assert store.summary(*MARCH, tier="unknown")["dossiers"]["resolved"] == 1
    assert store.summary(*MARCH, tier="district")["dossiers"]["resolved"] == 0

    store, _, _ = run([*events, submitted_event("D-1", "e1", "2019-03-04T08:00:00+07:00")])
    assert store.summary(*MARCH, tier="unknown")["dossiers"]["resolved"] == 0
    moved = store.summary(*MARCH, tier="district", sector="land", agency_code="A")["dossiers"]
    assert (moved["resolved"], moved["early"], moved["online_resolved"]) == (1, 1, 1)
    assert moved["online_rate"] == 1.0


def test_gauges_are_as_of_the_end_of_the_range() -> None:
    store, _, _ = run(
        [
            submitted_event("D-1", "e1", "2019-03-04T08:00:00+07:00"),
            received_event("D-1", "e2", "2019-03-04T09:00:00+07:00", "2019-03-07T09:00:00+07:00"),
            resolved_event("D-1", "e3", "2019-03-11T09:00:00+07:00"),
        ]
    )

    def gauges(end: str) -> tuple[int, int]:
        dossiers = store.summary(MARCH[0], datetime.fromisoformat(end))["dossiers"]
        return dossiers["in_progress"], dossiers["overdue_open"]

    assert gauges("2019-03-04T09:00:00+07:00") == (0, 0)  # half-open: not yet received
    assert gauges("2019-03-04T09:01:00+07:00") == (1, 0)
    assert gauges("2019-03-07T09:00:00+07:00") == (1, 0)  # due now, not yet overdue
    assert gauges("2019-03-07T09:01:00+07:00") == (1, 1)
    assert gauges("2019-03-11T09:01:00+07:00") == (0, 0)
    assert gauges("2030-01-01T00:00:00+07:00") == (0, 0)


def test_summary_shape_and_empty_rates() -> None:
    summary = AggregateStore().summary(*MARCH, agency_code="nobody")
    assert summary == {
        "from": "2019-03-01T00:00:00+07:00",
        "to": "2019-04-01T00:00:00+07:00",
        "dossiers": {
            "received": 0, "resolved": 0, "early": 0, "on_time": 0, "late": 0,
            "on_time_rate": None, "online_resolved": 0, "online_rate": None, "in_progress": 0,
            "overdue_open": 0, "withdrawn": 0, "rejected": 0, "supplement_requested": 0,
            "apologies": 0, "online_eligible_resolved": 0, "online_rate_eligible": None,
        },
        "payments": {"requested": 0, "succeeded": 0, "failed": 0, "expired": 0,
                     "amount_vnd_succeeded": 0, "mismatches": 0},
        "postal": {"pickups": 0, "returns": 0, "delivered": 0, "failed": 0, "cod_collected_vnd": 0},
        "sms": {"sent": 0, "delivered": 0, "failed": 0, "segments": 0, "suppressed": 0},
        "satisfaction": {"answers": 0, "satisfied": 0, "rate": None},
    }  # fmt: skip


def test_envelopes_parse_into_events() -> None:
    event = event_from_envelope(
        {
            "specversion": "1.0", "id": "01J9", "source": "portal/dev", "type": "dossier.received",
            "subject": "D-1", "time": "2019-03-04T08:15:00+07:00",
            "data": {"dossier_id": "D-1", "agency_code": "A", "due_at": "2019-03-07T08:15:00Z"},
        }
    )  # fmt: skip
    assert event.key == ("portal/dev", "01J9")
    assert event.time == datetime(2019, 3, 4, 1, 15, tzinfo=UTC)
    state, _ = apply(new_state("D-1"), event)
    assert state.due_at == datetime(2019, 3, 7, 15, 15, tzinfo=VIETNAM_TZ)
    with pytest.raises(ValueError, match="offset"):
        event_from_envelope(
            {"source": "s", "id": "1", "type": "dossier.received", "subject": "D",
             "time": "2019-03-04T08:15:00"}
        )  # fmt: skip


# --- overdue -------------------------------------------------------------------------------------


def test_overdue_is_emitted_once_for_open_dossiers_whose_due_passed() -> None:
    due = "2019-03-07T09:00:00+07:00"
    _, states, _ = run(
        [
            received_event("open", "e1", "2019-03-04T09:00:00+07:00", due),
            received_event("done", "e1", "2019-03-04T09:00:00+07:00", due),
            resolved_event("done", "e2", "2019-03-07T08:00:00+07:00"),
            received_event(
                "future", "e1", "2019-03-05T09:00:00+07:00", "2019-03-20T09:00:00+07:00"
            ),
        ]
    )
    clock = datetime(2019, 3, 7, 2, 0, 1, tzinfo=UTC)  # 09:00:01 local
    assert [state.dossier_id for state in overdue_to_emit(states.values(), clock)] == ["open"]
    assert overdue_to_emit(states.values(), datetime.fromisoformat(due)) == []

    envelope = overdue_event(states["open"], clock)
    assert envelope["source"] == "motcua/metrics" and envelope["subject"] == "open"
    assert envelope["data"]["due_at"] == due
    assert overdue_event(states["open"], clock + timedelta(hours=1))["id"] == envelope["id"]

    marked, deltas = apply(states["open"], event_from_envelope(envelope))
    assert marked.overdue_emitted and deltas == {}
    assert overdue_to_emit([marked], clock) == []


# --- oracle: the store against a naive recount ---------------------------------------------------

HANOI = ZoneInfo("Asia/Ho_Chi_Minh")  # the recount uses the tz database, the code a fixed offset
COUNTED = {
    "dossier.received": ("dossiers", "received"),
    "dossier.withdrawn": ("dossiers", "withdrawn"),
    "dossier.rejected": ("dossiers", "rejected"),
    "dossier.supplement_requested": ("dossiers", "supplement_requested"),
    "dossier.apology_issued": ("dossiers", "apologies"),
    "payment.requested": ("payments", "requested"),
    "payment.succeeded": ("payments", "succeeded"),
    "payment.failed": ("payments", "failed"),
    "payment.expired": ("payments", "expired"),
    "payment.reconciliation_mismatch": ("payments", "mismatches"),
    "postal.pickup_requested": ("postal", "pickups"),
    "postal.return_requested": ("postal", "returns"),
    "postal.delivered": ("postal", "delivered"),
    "postal.failed": ("postal", "failed"),
    "sms.sent": ("sms", "sent"),
    "sms.delivered": ("sms", "delivered"),
    "sms.failed": ("sms", "failed"),
    "sms.suppressed": ("sms", "suppressed"),
}
CLOSING = {"dossier.resolved", "dossier.withdrawn", "dossier.rejected"}


def naive_summary(
    events: Iterable[Event], start: datetime, end: datetime, **filters: str
) -> dict[str, Any]:
    """The figures recounted straight from the distinct events."""
    empty = AggregateStore().summary(start, end)
    out = {
        block: dict.fromkeys(values, 0)
        for block, values in empty.items()
        if block in COUNTED_BLOCKS
    }
    distinct = {(event.source, event.id): event for event in events}.values()
    by_dossier: dict[str, list[Event]] = defaultdict(list)
    for event in distinct:
        by_dossier[event.subject].append(event)

    def minute_start(moment: datetime) -> datetime:
        return moment.astimezone(UTC).replace(second=0, microsecond=0)

    def wanted(agency: str | None, tier: str | None, sector: str | None) -> bool:
        dims = {
            "agency_code": agency or "unknown",
            "tier": tier or "unknown",
            "sector": sector or "unknown",
        }
        return all(dims[name] == value for name, value in filters.items())

    dossiers: dict[str, Any] = out["dossiers"]
    eligible_online = [0]  # resolved, eligible and filed online
    for dossier_events in by_dossier.values():
        dossier_events.sort(key=lambda event: (event.time, event.source, event.id))
        submitted = next((e for e in dossier_events if e.type == "dossier.submitted"), None)
        tier = submitted.data["tier"] if submitted else None
        sector = submitted.data["sector"] if submitted else None
        online = submitted is not None and submitted.data["channel"] == "online"
        filer = submitted.data["agency_code"] if submitted else None
        eligible = submitted is not None and submitted.data.get("online_level") in (3, 4)
        received = next((e for e in dossier_events if e.type == "dossier.received"), None)
        due = datetime.fromisoformat(received.data["due_at"]) if received else None
        backs = [e for e in dossier_events if e.type == "dossier.supplement_received"]
        promised = [
            datetime.fromisoformat(e.data["new_due_at"]) for e in backs if "new_due_at" in e.data
        ]
        judged = promised[-1] if promised else due  # CONTRACT 2: the latest new_due_at, else due_at
        for event in dossier_events:
            is_dossier = event.type.startswith("dossier.")
            agency = event.data["agency_code"] if is_dossier else filer
            if not wanted(agency, tier, sector) or not start <= minute_start(event.time) < end:
                continue
            if event.type in COUNTED:
                block, name = COUNTED[event.type]
                out[block][name] += 1
            if event.type == "payment.succeeded":
                out["payments"]["amount_vnd_succeeded"] += event.data["amount_vnd"]
            if event.type == "postal.cod_collected":
                out["postal"]["cod_collected_vnd"] += event.data["amount_vnd"]
            if event.type == "sms.sent":
                out["sms"]["segments"] += event.data["segments"]
            if event.type == "dossier.resolved":
                dossiers["resolved"] += 1
                dossiers["online_resolved"] += online
                dossiers["online_eligible_resolved"] += eligible
                eligible_online[0] += eligible and online
                if judged is not None:
                    resolved_at = datetime.fromisoformat(event.data["resolved_at"])
                    day, due_day = (
                        resolved_at.astimezone(HANOI).date(),
                        judged.astimezone(HANOI).date(),
                    )
                    late = day > due_day or resolved_at > judged
                    dossiers["late" if late else "early" if day < due_day else "on_time"] += 1
        if received is None or due is None:
            continue
        holder_event = [e for e in dossier_events if e.type.startswith("dossier.")][-1]
        holder = holder_event.data.get("to_agency_code") or holder_event.data["agency_code"]
        closing = next((e for e in dossier_events if e.type in CLOSING), None)
        closed = closing is not None and minute_start(closing.time) < end
        if wanted(holder, tier, sector) and minute_start(received.time) < end and not closed:
            dossiers["in_progress"] += 1
            if naive_overdue_at(end, received, due, dossier_events, closing, minute_start):
                dossiers["overdue_open"] += 1
    resolved = dossiers["resolved"]
    dossiers["on_time_rate"] = (
        (dossiers["early"] + dossiers["on_time"]) / resolved if resolved else None
    )
    dossiers["online_rate"] = dossiers["online_resolved"] / resolved if resolved else None
    eligible_count = dossiers["online_eligible_resolved"]
    dossiers["online_rate_eligible"] = (
        eligible_online[0] / eligible_count if eligible_count else None
    )
    answers = satisfied = 0
    for dossier_events in by_dossier.values():  # each dossier's latest answer is its vote
        submitted = next((e for e in dossier_events if e.type == "dossier.submitted"), None)
        tier = submitted.data["tier"] if submitted else None
        sector = submitted.data["sector"] if submitted else None
        answered = [e for e in dossier_events if e.type == "survey.answered"]
        if not answered:
            continue
        latest = max(answered, key=lambda event: event.time)
        if (
            wanted(latest.data["agency_code"], tier, sector)
            and start <= minute_start(latest.time) < end
        ):
            answers += 1
            satisfied += latest.data["score"] >= 4
    satisfaction = {
        "answers": answers,
        "satisfied": satisfied,
        "rate": satisfied / answers if answers else None,
    }
    return {"from": start.isoformat(), "to": end.isoformat(), **out, "satisfaction": satisfaction}


def naive_overdue_at(
    end: datetime,
    received: Event,
    due: datetime,
    dossier_events: list[Event],
    closing: Event | None,
    minute_start: Any,
) -> bool:
    """Whether the dossier counts as overdue at `end`: the clock runs from the receipt, stops at
    each supplement request and runs again at the receipt of the documents (to their
    `new_due_at`, else later by the working days paused); it is overdue over each running
    stretch past its due date, counted by the minute its start and end fall in."""
    closed_at = max(closing.time, received.time) if closing is not None else None
    stretches: list[tuple[datetime, datetime | None, datetime]] = []
    since: datetime | None = received.time
    requested: Event | None = None
    for event in dossier_events:
        if closed_at is not None and event.time >= closed_at:
            break
        if event.type == "dossier.supplement_requested" and since is not None:
            stretches.append((since, max(event.time, since), due))
            since, requested = None, event
        elif event.type == "dossier.supplement_received":
            if "new_due_at" in event.data:
                due = datetime.fromisoformat(event.data["new_due_at"])
            elif requested is not None:
                paused = working_days_between(
                    datetime.fromisoformat(requested.data["requested_at"]),
                    datetime.fromisoformat(event.data["received_at"]),
                )
                due = add_working_days(due, paused) if paused > 0 else due
            if since is None:
                since, requested = max(event.time, received.time), None
    if since is not None:
        stretches.append((since, closed_at, due))
    for begin, finish, deadline in stretches:
        late_from = max(begin, deadline)
        if finish is not None and finish <= late_from:
            continue
        if minute_start(late_from) < end and (finish is None or minute_start(finish) >= end):
            return True
    return False


COUNTED_BLOCKS = ("dossiers", "payments", "postal", "sms")


@st.composite
def streams(draw: st.DrawFn) -> list[Event]:
    """Several dossiers, interleaved in any order, with redeliveries."""
    count = draw(st.integers(1, 12))
    events = [e for i in range(count) for e in draw(lifecycles(f"D-{i}"))]
    redelivered = draw(st.lists(st.sampled_from(events), max_size=5))
    return draw(st.permutations(events + redelivered))


moments = st.integers(-2 * 1440 * 60, (SPAN_MINUTES + 20 * 1440) * 60).map(
    lambda seconds: (START + timedelta(seconds=seconds)).astimezone(UTC)
)
filter_sets = st.fixed_dictionaries(
    {},
    optional={
        "agency_code": st.sampled_from(AGENCIES),
        "tier": st.sampled_from((*TIERS, "unknown")),
        "sector": st.sampled_from(SECTORS),
    },
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), moments, moments, filter_sets)
def test_summary_equals_a_naive_recount(
    events: list[Event], a: datetime, b: datetime, filters: dict[str, str]
) -> None:
    start, end = min(a, b), max(a, b)
    store, _, _ = run(events)
    assert store.summary(start, end, **filters) == naive_summary(events, start, end, **filters)
    whole = (START - timedelta(days=3), START + timedelta(days=80))
    assert store.summary(*whole) == naive_summary(events, *whole)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), moments, moments, st.sampled_from(("agency_code", "tier", "sector")))
def test_breakdown_equals_a_naive_recount_per_group(
    events: list[Event], a: datetime, b: datetime, by: str
) -> None:
    start, end = min(a, b), max(a, b)
    store, _, _ = run(events)
    groups = store.breakdown(by, start, end)  # type: ignore[arg-type]
    values = {"agency_code": AGENCIES, "tier": TIERS, "sector": SECTORS}[by]
    zero = AggregateStore().summary(start, end)["dossiers"]
    for value in (*values, "unknown"):
        expected = naive_summary(events, start, end, **{by: value})["dossiers"]
        assert groups.get(value, zero) == expected
    assert set(groups) <= {*values, "unknown"}
