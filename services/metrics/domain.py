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
- overdue_open: those of them whose `due_at` passed before `to` (a subset of in_progress).
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
OPEN_STATUSES = frozenset({"received", "supplement_requested"})


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
    }
)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Fact:
    key: EventKey
    type: str
    time: datetime
    agency_code: str | None = None  # data.agency_code, or to_agency_code of a transfer
    amount: int = 0  # amount_vnd of payments and COD, segments of an SMS
    at: datetime | None = None  # received_at / resolved_at
    due_at: datetime | None = None
    tier: str | None = None
    sector: str | None = None
    channel: str | None = None
    minute: int = 0  # minute_of(time), kept since every count needs it

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
    at = data.get("received_at") if kind == "dossier.received" else data.get("resolved_at")
    return Fact(
        key=event.key,
        type=kind,
        time=event.time,
        agency_code=str(agency) if agency else None,
        amount=int(amount or 0),
        at=_moment(at) if kind in ("dossier.received", "dossier.resolved") else None,
        due_at=_moment(data.get("due_at")) if kind == "dossier.received" else None,
        tier=data.get("tier") if kind == "dossier.submitted" else None,
        sector=data.get("sector") if kind == "dossier.submitted" else None,
        channel=data.get("channel") if kind == "dossier.submitted" else None,
        minute=minute_of(event.time),
    )


# --- per-dossier state ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DossierState:
    """One dossier as a value. Every field but `facts` is derived from the set of facts."""

    dossier_id: str
    status: Status = "unknown"
    tier: str | None = None
    sector: str | None = None
    channel: str | None = None
    agency_code: str | None = None  # the agency holding it now (after transfers)
    filing_agency_code: str | None = None  # the agency it was filed with
    received_at: datetime | None = None
    due_at: datetime | None = None
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
    due_at = received.due_at if received else None
    resolved_at = (resolved.at or resolved.time) if resolved else None
    return DossierState(
        dossier_id=dossier_id,
        status=_status(ordered, closing, received is not None, submitted is not None),
        tier=submitted.tier if submitted else None,
        sector=submitted.sector if submitted else None,
        channel=submitted.channel if submitted else None,
        agency_code=holder,
        filing_agency_code=filer,
        received_at=(received.at or received.time) if received else None,
        due_at=due_at,
        resolved_at=resolved_at,
        resolution=classify(resolved_at, due_at) if resolved_at and due_at else None,
        closed_at=closing.time if closing else None,
        overdue_emitted="dossier.overdue" in first,
        facts=ordered,
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
PAYMENT_COUNTERS = ("requested", "succeeded", "failed", "expired", "amount_vnd_succeeded",
                    "mismatches")  # fmt: skip
POSTAL_COUNTERS = ("pickups", "returns", "delivered", "failed", "cod_collected_vnd")
SMS_COUNTERS = ("sent", "delivered", "failed", "segments", "suppressed")
COUNTERS: tuple[str, ...] = (
    *DOSSIER_FLOWS,
    *GAUGE_FLOWS,
    *(f"payments.{name}" for name in PAYMENT_COUNTERS),
    *(f"postal.{name}" for name in POSTAL_COUNTERS),
    *(f"sms.{name}" for name in SMS_COUNTERS),
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
        if kind.startswith("dossier."):
            where = Cell(fact.minute, fact.agency_code or filer, tier, sector)
        else:
            where = Cell(fact.minute, filer, tier, sector)
        for counter, by_amount in _EVENT_COUNTERS.get(kind, ()):
            out[where, counter] += fact.amount if by_amount else 1
        if kind == "dossier.resolved":
            if state.due_at is not None:
                out[where, classify(fact.at or fact.time, state.due_at)] += 1
            if state.channel == "online":
                out[where, "online_resolved"] += 1
        elif kind == "dossier.received" and received is None:
            received = fact
    if received is not None:
        holder = state.agency_code or UNKNOWN
        _add_gauge_flows(state, received, out, lambda minute: Cell(minute, holder, tier, sector))
    return {key: value for key, value in out.items() if value}


def _add_gauge_flows(
    state: DossierState,
    received: Fact,
    out: Counter[tuple[Cell, str]],
    cell: Callable[[int], Cell],
) -> None:
    """Open from the receipt to the first closing event; overdue from due_at to the closing."""
    closing = next((fact for fact in state.facts if fact.type in CLOSING_TYPES), None)
    out[cell(received.minute), "opened"] += 1
    closed_at = max(closing.time, received.time) if closing else None
    if closing is not None:
        out[cell(max(closing.minute, received.minute)), "closed"] += 1
    due = state.due_at
    if due is not None and (closed_at is None or closed_at > due):
        out[cell(minute_of(due)), "overdue_started"] += 1
        if closing is not None:
            out[cell(max(closing.minute, received.minute)), "overdue_ended"] += 1


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
        return state, {}
    after = derive(state.dossier_id, facts)
    return after, difference(contributions(after), contributions(state))


# --- overdue -------------------------------------------------------------------------------------


def is_overdue_unannounced(state: DossierState, clock: datetime) -> bool:
    """Due passed, still open (not resolved, withdrawn or rejected), no `dossier.overdue` yet."""
    return (
        state.due_at is not None
        and state.due_at < clock
        and state.status in OPEN_STATUSES
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
    """Open, with a due date, and not yet announced: it may become overdue and needs watching."""
    return state.due_at is not None and state.status in OPEN_STATUSES and not state.overdue_emitted


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
    }


def dossiers_block(counts: Mapping[str, int]) -> dict[str, Any]:
    """CONTRACT section 5's `dossiers` object from the counters."""
    resolved = counts["resolved"]
    return {
        "received": counts["received"],
        "resolved": resolved,
        "early": counts["early"],
        "on_time": counts["on_time"],
        "late": counts["late"],
        "on_time_rate": (counts["early"] + counts["on_time"]) / resolved if resolved else None,
        "online_resolved": counts["online_resolved"],
        "online_rate": counts["online_resolved"] / resolved if resolved else None,
        "in_progress": counts["opened"] - counts["closed"],
        "overdue_open": counts["overdue_started"] - counts["overdue_ended"],
        "withdrawn": counts["withdrawn"],
        "rejected": counts["rejected"],
        "supplement_requested": counts["supplement_requested"],
        "apologies": counts["apologies"],
    }
