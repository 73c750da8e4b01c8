"""The metrics core, free of I/O: classification, per-dossier state, aggregates, overdue detection.

How the pieces fit:
- `apply(state, event) -> (state, deltas)` folds one event into the state of its dossier. The state
  keeps the facts of the events applied so far (their (source, id) is the idempotency key), and all
  its other fields are derived from that *set* of facts, so the order of arrival and redeliveries
  never matter.
- `contributions(state)` is everything a dossier adds to the aggregate counters; `deltas` is the
  difference between the contributions after and before the event. So the aggregates always equal
  the sum of the contributions of all dossier states, even when an earlier count must move (an
  event that came before its `dossier.submitted` counts under tier/sector `unknown`, then moves).
- The store (`store.ColumnarStore`) adds the deltas up; `summary_of` and `dossiers_block` turn
  the counters of a range into CONTRACT section 5's answers.

Counting is by each event's own `time` in one-minute buckets (late events land in their bucket).
A range [from, to) counts the minutes whose start lies in it (exact for whole-minute bounds).

Gauges (`in_progress`, `overdue_open`) are point-in-time values *as of `to`*, in event time:
- in_progress: dossiers received (`dossier.received` before `to`) and not yet closed (no
  resolved/withdrawn/rejected before `to`), whether overdue or not;
- overdue_open: those of them whose overdue clock runs past its due date at `to` (a subset of
  in_progress): not those waiting for the applicant's documents, and the due date is the one the
  clock runs to after the pauses (`overdue_clock`). Whatever the range, it is this one figure as
  of `to`: only `to` moves it, `from` never does.
Why not "received - closed within the range": that difference goes negative and means nothing for
short ranges, while a value as of `to` is what OpenCPS shows, is the live figure for trailing
windows (to = now), and stays reproducible on replay. Both are kept as four flow counters (opened,
closed, overdue started at `due_at`, overdue ended) whose prefix sums give the gauge.

Attribution: tier, sector and channel come from `dossier.submitted`. A `dossier.*` event counts for
its own `data.agency_code` (the agency acting then); payment, postal and SMS events for the filing
agency (that of `dossier.submitted`); the gauges for the agency holding the dossier now (after
transfers). Anything not known yet is `unknown` until the missing event arrives.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from operator import attrgetter
from typing import Any, Literal, NamedTuple

from services.common.due import DueIndex
from services.metrics.calendar import local_date
from services.metrics.overdue_clock import (
    RECEIVED_BACK,
    REQUESTED,
    ClockEvent,
    classification_due,
    run_clock,
)

Resolution = Literal["early", "on_time", "late"]
Status = Literal[
    "unknown",  # only outcome events seen so far
    "submitted",
    "received",
    "supplement_requested",
    "resolved",
    "returned",  # resolved and the result handed over
    "withdrawn",
    "rejected",
]
Dimension = Literal["agency_code", "tier", "sector"]
EventKey = tuple[str, str]  # (source, id): the idempotency key end to end

UNKNOWN = "unknown"
OVERDUE_SOURCE = "motcua/metrics"
DIMENSIONS: tuple[Dimension, ...] = ("agency_code", "tier", "sector")
OVERDUE_TYPE = "dossier.overdue"
CLOSING_TYPES = frozenset({"dossier.resolved", "dossier.withdrawn", "dossier.rejected"})
RUNNING_STATUSES = frozenset({"received"})  # open, and not waiting for the applicant's documents
SUPPLEMENT_TYPES = frozenset({REQUESTED, RECEIVED_BACK})
ONLINE_LEVELS = frozenset({3, 4})  # a procedure offered online at these levels is eligible
SURVEY_TYPE = "survey.answered"
SATISFIED_SCORES = frozenset({4, 5})  # "satisfied" of the survey's five answers


# --- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Event:
    """The part of a CloudEvents envelope the metrics need; `time` and data timestamps aware."""

    source: str
    id: str
    type: str
    subject: str
    time: datetime
    data: Mapping[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> EventKey:
        return (self.source, self.id)


def event_from_envelope(envelope: Mapping[str, Any]) -> Event:
    """An Event from a decoded JSON envelope (RFC 3339 strings) or one already parsed."""
    time = _moment(envelope["time"])
    if time is None:
        raise ValueError("envelope has no time")
    data = envelope.get("data") or {}
    subject = envelope.get("subject") or data.get("dossier_id")
    if not subject:
        raise ValueError("envelope has neither subject nor data.dossier_id")
    return Event(
        str(envelope["source"]),
        str(envelope["id"]),
        str(envelope["type"]),
        str(subject),
        time,
        data,
    )


def _moment(value: Any) -> datetime | None:
    if value is None:
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if moment.utcoffset() is None:
        raise ValueError(f"timestamp without offset: {value!r}")
    return moment


def minute_of(moment: datetime) -> int:
    """The one-minute bucket of an instant: whole minutes since the Unix epoch."""
    return math.floor(moment.timestamp() / 60)


# --- classification (CONTRACT section 2) --------------------------------------------------------


def classify(resolved_at: datetime, due_at: datetime) -> Resolution:
    """Early: a local calendar day before the due day; on time: the due day, at or before due_at."""
    if resolved_at > due_at:
        return "late"  # includes the due day after due_at
    if local_date(resolved_at) < local_date(due_at):
        return "early"
    return "on_time"


# --- facts: what the state remembers of an event ------------------------------------------------

_COUNTED_OUTCOMES = frozenset(
    {
        "payment.requested", "payment.succeeded", "payment.failed", "payment.expired",
        "payment.reconciliation_mismatch",
        "postal.pickup_requested", "postal.return_requested", "postal.delivered", "postal.failed",
        "postal.cod_collected",
        "sms.sent", "sms.delivered", "sms.failed", "sms.suppressed",
        SURVEY_TYPE,
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Fact:
    key: EventKey
    type: str
    time: datetime
    agency_code: str | None = None  # data.agency_code, or to_agency_code of a transfer
    amount: int = 0  # amount_vnd of payments and COD, segments of an SMS
    at: datetime | None = None  # received_at / resolved_at / requested_at (of a supplement)
    due_at: datetime | None = None  # due_at (received, overdue), new_due_at (supplement back)
    tier: str | None = None
    sector: str | None = None
    channel: str | None = None
    minute: int = 0  # minute_of(time), kept since every count needs it
    online_level: int | None = None  # of the procedure (dossier.submitted), whatever the channel
    # a survey answer (`survey.answered`): its score is `amount`; the answer it replaces
    previous_score: int | None = None
    previous_at: datetime | None = None

    @property
    def order(self) -> tuple[datetime, EventKey]:
        return (self.time, self.key)


# Fact.order, with the minute first: the same order (minute is monotonic in time), but most
# comparisons are of ints, not of aware datetimes in different offsets
_ORDER = attrgetter("minute", "time", "key")


def fact_of(event: Event) -> Fact | None:
    """What counts or shapes the state; None for event types that do neither (sms.queued...)."""
    kind, data = event.type, event.data
    if not (kind.startswith("dossier.") or kind in _COUNTED_OUTCOMES):
        return None
    agency = data.get("to_agency_code") if kind == "dossier.transferred" else None
    agency = agency or data.get("agency_code")
    amount = data.get("segments") if kind == "sms.sent" else data.get("amount_vnd")
    at_field, due_field = _MOMENTS.get(kind, (None, None))
    submitted = kind == "dossier.submitted"
    level = data.get("online_level") if submitted else None
    survey = kind == SURVEY_TYPE
    if survey:
        amount = data.get("score")
    previous = data.get("previous_score") if survey else None
    return Fact(
        key=event.key,
        type=kind,
        time=event.time,
        agency_code=str(agency) if agency else None,
        amount=int(amount or 0),
        at=_moment(data.get(at_field)) if at_field else None,
        due_at=_moment(data.get(due_field)) if due_field else None,
        tier=data.get("tier") if submitted else None,
        sector=data.get("sector") if submitted else None,
        channel=data.get("channel") if submitted else None,
        minute=minute_of(event.time),
        online_level=int(level) if level is not None else None,
        previous_score=int(previous) if previous is not None else None,
        previous_at=_moment(data.get("previous_answered_at")) if previous is not None else None,
    )


# event type -> (data field kept as Fact.at, data field kept as Fact.due_at)
_MOMENTS: dict[str, tuple[str | None, str | None]] = {
    "dossier.received": ("received_at", "due_at"),
    "dossier.resolved": ("resolved_at", None),
    "dossier.supplement_requested": ("requested_at", None),
    "dossier.supplement_received": ("received_at", "new_due_at"),
    "dossier.overdue": (None, "due_at"),
}


# --- per-dossier state ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DossierState:
    """One dossier as a value. Every field but `facts` is derived from the set of facts."""

    dossier_id: str
    status: Status = "unknown"
    tier: str | None = None
    sector: str | None = None
    channel: str | None = None
    online_level: int | None = None  # the procedure's online level (3, 4; None: not online)
    agency_code: str | None = None  # the agency holding it now (after transfers)
    filing_agency_code: str | None = None  # the agency it was filed with
    received_at: datetime | None = None
    due_at: datetime | None = None  # where the overdue clock runs to now (`overdue_clock`)
    classified_against: datetime | None = None  # the due date of the classification
    overdue: tuple[tuple[datetime, datetime | None], ...] = ()  # [start, end), event time
    resolved_at: datetime | None = None
    resolution: Resolution | None = None
    closed_at: datetime | None = None  # event time of the first resolved/withdrawn/rejected
    overdue_emitted: bool = False
    facts: tuple[Fact, ...] = ()  # sorted by (time, key)
    memo: Deltas | None = field(default=None, compare=False, repr=False)  # contributions()

    @property
    def seen(self) -> frozenset[EventKey]:
        return frozenset(fact.key for fact in self.facts)


def new_state(dossier_id: str) -> DossierState:
    return DossierState(dossier_id)


def derive(dossier_id: str, facts: Iterable[Fact]) -> DossierState:
    """The state of a dossier from the facts of its events, in any order."""
    ordered = tuple(sorted(facts, key=_ORDER))
    first = _first_by_type(ordered)
    submitted = first.get("dossier.submitted")
    received = first.get("dossier.received")
    closing = next((fact for fact in ordered if fact.type in CLOSING_TYPES), None)
    resolved = first.get("dossier.resolved")
    # our own `dossier.overdue` only repeats the holder it saw, so it never decides who holds it
    dossier_facts = [
        fact for fact in ordered if fact.type.startswith("dossier.") and fact.type != OVERDUE_TYPE
    ]
    holder = next((fact.agency_code for fact in reversed(dossier_facts) if fact.agency_code), None)
    filer = submitted.agency_code if submitted else None
    filer = filer or next((fact.agency_code for fact in dossier_facts if fact.agency_code), None)
    due_at = classified_against = None
    overdue: tuple[tuple[datetime, datetime | None], ...] = ()
    if received is not None and received.due_at is not None:
        supplements = [
            ClockEvent(fact.type, fact.time, fact.at or fact.time, fact.due_at)
            for fact in ordered
            if fact.type in SUPPLEMENT_TYPES
        ]
        closed_time = max(closing.time, received.time) if closing else None
        clock = run_clock(received.time, received.due_at, supplements, closed_time)
        due_at, overdue = clock.due_at, clock.overdue
        classified_against = classification_due(received.due_at, supplements)
    resolved_at = (resolved.at or resolved.time) if resolved else None
    return DossierState(
        dossier_id=dossier_id,
        status=_status(ordered, closing, received is not None, submitted is not None),
        tier=submitted.tier if submitted else None,
        sector=submitted.sector if submitted else None,
        channel=submitted.channel if submitted else None,
        online_level=submitted.online_level if submitted else None,
        agency_code=holder,
        filing_agency_code=filer,
        received_at=(received.at or received.time) if received else None,
        due_at=due_at,
        classified_against=classified_against,
        overdue=overdue,
        resolved_at=resolved_at,
        resolution=(
            classify(resolved_at, classified_against)
            if resolved_at and classified_against
            else None
        ),
        closed_at=closing.time if closing else None,
        overdue_emitted=_announced(ordered, due_at),
        facts=ordered,
    )


def _announced(ordered: tuple[Fact, ...], due_at: datetime | None) -> bool:
    """Whether a `dossier.overdue` announced the due date the clock runs to now (one without
    a due date, of an older state record, counts for any)."""
    return any(
        fact.type == OVERDUE_TYPE and (fact.due_at is None or fact.due_at == due_at)
        for fact in ordered
    )


def _first_by_type(ordered: tuple[Fact, ...]) -> dict[str, Fact]:
    first: dict[str, Fact] = {}
    for fact in ordered:
        first.setdefault(fact.type, fact)
    return first


def _status(
    ordered: tuple[Fact, ...], closing: Fact | None, received: bool, submitted: bool
) -> Status:
    if closing is not None:
        if closing.type == "dossier.withdrawn":
            return "withdrawn"
        if closing.type == "dossier.rejected":
            return "rejected"
        returned = any(fact.type == "dossier.result_returned" for fact in ordered)
        return "returned" if returned else "resolved"
    waiting = False  # supplement requested and not yet received back
    for fact in ordered:
        if fact.type == "dossier.supplement_requested":
            waiting = True
        elif fact.type == "dossier.supplement_received":
            waiting = False
    if received:
        return "supplement_requested" if waiting else "received"
    return "submitted" if submitted else "unknown"


# --- contributions and deltas --------------------------------------------------------------------


class Cell(NamedTuple):
    """Where a count lands: a minute bucket and the three filter dimensions."""

    minute: int
    agency_code: str
    tier: str
    sector: str


Deltas = dict[tuple[Cell, str], int]  # (cell, counter name) -> increment, zeros left out

# counter names; the gauges are kept as four flows, see the module docstring
DOSSIER_FLOWS = (
    "received", "resolved", "early", "on_time", "late", "online_resolved", "withdrawn",
    "rejected", "supplement_requested", "apologies",
)  # fmt: skip
GAUGE_FLOWS = ("opened", "closed", "overdue_started", "overdue_ended")
# resolved dossiers of procedures offered online (level 3 or 4), and those of them filed online
ELIGIBILITY_FLOWS = ("online_eligible_resolved", "online_eligible_online_resolved")
PAYMENT_COUNTERS = ("requested", "succeeded", "failed", "expired", "amount_vnd_succeeded",
                    "mismatches")  # fmt: skip
POSTAL_COUNTERS = ("pickups", "returns", "delivered", "failed", "cod_collected_vnd")
SMS_COUNTERS = ("sent", "delivered", "failed", "segments", "suppressed")
# dossiers whose (latest) survey answer falls in the range, and those of them scoring 4 or 5
SATISFACTION_COUNTERS = ("satisfaction.answers", "satisfaction.satisfied")
COUNTERS: tuple[str, ...] = (
    *DOSSIER_FLOWS,
    *GAUGE_FLOWS,
    *(f"payments.{name}" for name in PAYMENT_COUNTERS),
    *(f"postal.{name}" for name in POSTAL_COUNTERS),
    *(f"sms.{name}" for name in SMS_COUNTERS),
    *ELIGIBILITY_FLOWS,  # after the others: the counter indexes before them are those of
    *SATISFACTION_COUNTERS,  # older snapshots
)

# event type -> (counter, use the fact's amount instead of 1)
_EVENT_COUNTERS: dict[str, tuple[tuple[str, bool], ...]] = {
    "dossier.received": (("received", False),),
    "dossier.resolved": (("resolved", False),),  # + class and online, below
    "dossier.withdrawn": (("withdrawn", False),),
    "dossier.rejected": (("rejected", False),),
    "dossier.supplement_requested": (("supplement_requested", False),),
    "dossier.apology_issued": (("apologies", False),),
    "payment.requested": (("payments.requested", False),),
    "payment.succeeded": (("payments.succeeded", False), ("payments.amount_vnd_succeeded", True)),
    "payment.failed": (("payments.failed", False),),
    "payment.expired": (("payments.expired", False),),
    "payment.reconciliation_mismatch": (("payments.mismatches", False),),
    "postal.pickup_requested": (("postal.pickups", False),),
    "postal.return_requested": (("postal.returns", False),),
    "postal.delivered": (("postal.delivered", False),),
    "postal.failed": (("postal.failed", False),),
    "postal.cod_collected": (("postal.cod_collected_vnd", True),),
    # segments are billed when sent; delivery reports may repeat them, so count them once here
    "sms.sent": (("sms.sent", False), ("sms.segments", True)),
    "sms.delivered": (("sms.delivered", False),),
    "sms.failed": (("sms.failed", False),),
    "sms.suppressed": (("sms.suppressed", False),),
}


def contributions(state: DossierState) -> Deltas:
    """Everything this dossier adds to the aggregate counters (memoised on the state)."""
    if state.memo is None:
        object.__setattr__(state, "memo", _contributions(state))  # a cache, not a change
    assert state.memo is not None
    return state.memo


def _contributions(state: DossierState) -> Deltas:
    out: Counter[tuple[Cell, str]] = Counter()
    tier, sector = state.tier or UNKNOWN, state.sector or UNKNOWN
    filer = state.filing_agency_code or UNKNOWN
    received: Fact | None = None
    for fact in state.facts:
        kind = fact.type
        if kind.startswith("dossier.") or kind == SURVEY_TYPE:  # an answer names its agency
            where = Cell(fact.minute, fact.agency_code or filer, tier, sector)
        else:
            where = Cell(fact.minute, filer, tier, sector)
        for counter, by_amount in _EVENT_COUNTERS.get(kind, ()):
            out[where, counter] += fact.amount if by_amount else 1
        if kind == "dossier.resolved":
            if state.classified_against is not None:
                out[where, classify(fact.at or fact.time, state.classified_against)] += 1
            if state.channel == "online":
                out[where, "online_resolved"] += 1
            if state.online_level in ONLINE_LEVELS:
                out[where, "online_eligible_resolved"] += 1
                if state.channel == "online":
                    out[where, "online_eligible_online_resolved"] += 1
        elif kind == "dossier.received" and received is None:
            received = fact
        elif kind == SURVEY_TYPE:
            _add_vote(out, where, fact.amount, 1)
            if fact.previous_score is not None and fact.previous_at is not None:
                replaced = where._replace(minute=minute_of(fact.previous_at))
                _add_vote(out, replaced, fact.previous_score, -1)
    if received is not None:
        holder = state.agency_code or UNKNOWN
        _add_gauge_flows(state, received, out, lambda minute: Cell(minute, holder, tier, sector))
    return {key: value for key, value in out.items() if value}


def _add_vote(out: Counter[tuple[Cell, str]], where: Cell, score: int, sign: int) -> None:
    """A dossier's survey vote at `where` (sign 1), or the vote an answer replaces taken back
    from where it was counted (sign -1): each answer moves the dossier's one vote to its own
    time, so `answers` counts dossiers, not answers, whatever the order they arrive in."""
    out[where, "satisfaction.answers"] += sign
    if score in SATISFIED_SCORES:
        out[where, "satisfaction.satisfied"] += sign


def _add_gauge_flows(
    state: DossierState,
    received: Fact,
    out: Counter[tuple[Cell, str]],
    cell: Callable[[int], Cell],
) -> None:
    """Open from the receipt to the first closing event; overdue over each stretch where the
    clock runs past its due date (`overdue_clock`)."""
    closing = next((fact for fact in state.facts if fact.type in CLOSING_TYPES), None)
    out[cell(received.minute), "opened"] += 1
    if closing is not None:
        out[cell(max(closing.minute, received.minute)), "closed"] += 1
    for start, end in state.overdue:
        out[cell(minute_of(start)), "overdue_started"] += 1
        if end is not None:
            out[cell(minute_of(end)), "overdue_ended"] += 1


def difference(after: Deltas, before: Deltas) -> Deltas:
    out = dict(after)
    for key, value in before.items():
        out[key] = out.get(key, 0) - value
    return {key: value for key, value in out.items() if value}


def apply(state: DossierState, event: Event) -> tuple[DossierState, Deltas]:
    """Fold one event into its dossier; a redelivered event (same source and id) changes nothing."""
    if event.subject != state.dossier_id:
        raise ValueError(f"event for {event.subject} applied to dossier {state.dossier_id}")
    fact = fact_of(event)
    if fact is None or any(known.key == fact.key for known in state.facts):
        return state, {}
    after = derive(state.dossier_id, (*state.facts, fact))
    return after, difference(contributions(after), contributions(state))


def apply_all(state: DossierState, events: Iterable[Event]) -> tuple[DossierState, Deltas]:
    """Fold several events of one dossier at once (one derivation): the batch form of `apply`."""
    after = fold_all(state, events)
    if after is state:
        return state, {}
    return after, difference(contributions(after), contributions(state))


def fold_all(state: DossierState, events: Iterable[Event]) -> DossierState:
    """The state of `apply_all`, without its deltas; `state` itself when every event was
    applied already (a redelivery)."""
    facts = list(state.facts)
    seen = {fact.key for fact in facts}
    for event in events:
        if event.subject != state.dossier_id:
            raise ValueError(f"event for {event.subject} applied to dossier {state.dossier_id}")
        fact = fact_of(event)
        if fact is not None and fact.key not in seen:
            seen.add(fact.key)
            facts.append(fact)
    if len(facts) == len(state.facts):
        return state
    return derive(state.dossier_id, facts)


# --- overdue -------------------------------------------------------------------------------------


def is_overdue_unannounced(state: DossierState, clock: datetime) -> bool:
    """Due passed, still open (not resolved, withdrawn or rejected), not waiting for the
    applicant's documents, no `dossier.overdue` for this due date yet."""
    return (
        state.due_at is not None
        and state.due_at < clock
        and state.status in RUNNING_STATUSES
        and not state.overdue_emitted
    )


def overdue_to_emit(states: Iterable[DossierState], clock: datetime) -> list[DossierState]:
    """The dossiers to emit one `dossier.overdue` for; `clock` is wall time or the watermark."""
    return [state for state in states if is_overdue_unannounced(state, clock)]


def overdue_event(state: DossierState, detected_at: datetime) -> dict[str, Any]:
    """The `dossier.overdue` envelope. Its id depends on the dossier and due date only, so a
    detector that emits twice (crash before marking) produces the same idempotency key."""
    if state.due_at is None:
        raise ValueError(f"dossier {state.dossier_id} has no due date")
    return {
        "specversion": "1.0",
        "id": f"overdue:{state.dossier_id}:{state.due_at.isoformat()}",
        "source": OVERDUE_SOURCE,
        "type": "dossier.overdue",
        "subject": state.dossier_id,
        "time": detected_at.isoformat(),
        "datacontenttype": "application/json",
        "data": {
            "dossier_id": state.dossier_id,
            "agency_code": state.agency_code or state.filing_agency_code or UNKNOWN,
            "due_at": state.due_at.isoformat(),
            "detected_at": detected_at.isoformat(),
        },
    }


def overdue_candidate(state: DossierState) -> bool:
    """Open, its clock running, with a due date not yet announced: it may become overdue and
    needs watching (a dossier waiting for documents is tracked again when they come)."""
    return (
        state.due_at is not None and state.status in RUNNING_STATUSES and not state.overdue_emitted
    )


# --- retirement ----------------------------------------------------------------------------------

# The story is over: nothing more is expected but late reports.
_OVER: frozenset[Status] = frozenset({"returned", "withdrawn", "rejected"})
# Resolved with the result not handed over yet, or known only by outcome events: more may come.
_IDLE: frozenset[Status] = frozenset({"resolved", "unknown"})


@dataclass(frozen=True, slots=True)
class RetirePolicy:
    """How long a dossier stays in the per-dossier state after its last input *arrived*: `after`
    once its story is over, `idle_after` when resolved but not returned or known only by
    outcomes. Lateness is a matter of arrival, so the wait is on the wall clock, also when the
    events replay old times."""

    after: timedelta
    idle_after: timedelta


def retire_after(state: DossierState, policy: RetirePolicy) -> timedelta | None:
    """How long after its last input the dossier may leave the state (its contributions stay,
    folded into the rollups); None while it is in progress (submitted, received, waiting for a
    supplement)."""
    if not state.facts:
        return None
    if state.status in _OVER:
        return policy.after
    if state.status in _IDLE:
        return policy.idle_after
    return None


class OverdueIndex:
    """Dossiers to watch, by due date (`DueIndex`: entries that went stale are skipped when
    popped, the caller re-checks the current state). Popping is O(log n) per due dossier, not a
    scan."""

    def __init__(self) -> None:
        self._due = DueIndex()

    def __len__(self) -> int:
        return len(self._due)

    def track(self, state: DossierState) -> None:
        self._due.set(state.dossier_id, state.due_at if overdue_candidate(state) else None)

    def pop_due(self, clock: datetime) -> list[str]:
        """The dossiers whose due date is before `clock`, each once; they leave the index."""
        return self._due.pop_due(clock)


def advance_watermark(watermark: datetime | None, event_time: datetime) -> datetime:
    """The event-time clock for replays: the latest event time seen."""
    return event_time if watermark is None or event_time > watermark else watermark


# --- the API's answers from counters -------------------------------------------------------------


def summary_of(counts: Mapping[str, int], start: datetime, end: datetime) -> dict[str, Any]:
    """CONTRACT section 5's summary from every counter of a range."""
    return {
        "from": start.isoformat(),
        "to": end.isoformat(),
        "dossiers": dossiers_block(counts),
        "payments": {name: counts[f"payments.{name}"] for name in PAYMENT_COUNTERS},
        "postal": {name: counts[f"postal.{name}"] for name in POSTAL_COUNTERS},
        "sms": {name: counts[f"sms.{name}"] for name in SMS_COUNTERS},
        "satisfaction": satisfaction_block(counts),
    }


def satisfaction_block(counts: Mapping[str, int]) -> dict[str, Any]:
    """CONTRACT section 5's `satisfaction`: dossiers whose survey answer (the latest, when it
    was changed) falls in the range, those of them satisfied (4 or 5 of 5), and their share."""
    answers = counts["satisfaction.answers"]
    satisfied = counts["satisfaction.satisfied"]
    return {
        "answers": answers,
        "satisfied": satisfied,
        "rate": satisfied / answers if answers > 0 else None,
    }


def dossiers_block(counts: Mapping[str, int]) -> dict[str, Any]:
    """CONTRACT section 5's `dossiers` object from the counters."""
    resolved = counts["resolved"]
    eligible = counts["online_eligible_resolved"]
    return {
        "received": counts["received"],
        "resolved": resolved,
        "early": counts["early"],
        "on_time": counts["on_time"],
        "late": counts["late"],
        "on_time_rate": (counts["early"] + counts["on_time"]) / resolved if resolved else None,
        "online_resolved": counts["online_resolved"],
        "online_rate": counts["online_resolved"] / resolved if resolved else None,
        "online_eligible_resolved": eligible,
        "online_rate_eligible": (
            counts["online_eligible_online_resolved"] / eligible if eligible else None
        ),
        "in_progress": counts["opened"] - counts["closed"],
        "overdue_open": counts["overdue_started"] - counts["overdue_ended"],
        "withdrawn": counts["withdrawn"],
        "rejected": counts["rejected"],
        "supplement_requested": counts["supplement_requested"],
        "apologies": counts["apologies"],
    }
