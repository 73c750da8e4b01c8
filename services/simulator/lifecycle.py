"""A dossier's life as events: schedules (the replay's 2019 calendar, or the live clock) and the
CloudEvents envelopes of CONTRACT section 2, built as plain JSON values.

The envelopes are dicts because the full replay builds more than a million of them; the tests
validate every one with `services.common.events.parse_event`, and `motcua simulate` builds its
(few) events through `make_event`. Classification follows CONTRACT section 2 on
Asia/Ho_Chi_Minh calendar days, with `due_at = add_working_days(received_at, procedure days)`.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from typing import Any, Final

from services.common.tz import VIETNAM_TZ
from services.metrics.calendar import add_working_days, is_working_day
from services.simulator.catalog import (
    APOLOGY_REASONS,
    COMPANY_KINDS,
    COMPANY_WORDS,
    DISTRICTS,
    GIVEN_FEMALE,
    GIVEN_MALE,
    MIDDLE_FEMALE,
    MIDDLE_MALE,
    MOBILE_PREFIXES,
    OLD_MOBILE_PREFIXES,
    OTHER_PROVINCES,
    PROVINCE,
    REJECT_REASONS,
    STREETS,
    SUPPLEMENT_REASONS,
    SURNAMES,
    Agency,
)
from services.simulator.plan import PERIOD_END, PERIOD_START, PICKUP_OPENS, Spec

Event = dict[str, Any]

# the desk's hours: appointments keep the time of receipt, so they fall in these hours too
_MORNING: Final = (time(7, 30), time(11, 30))
_AFTERNOON: Final = (time(13, 30), time(16, 30))
SOURCE: Final = "portal/dev"


@dataclass
class Times:
    """When each step happens; `None` for a step the dossier does not take."""

    submitted_at: datetime
    received_at: datetime | None = None
    due_at: datetime | None = None
    transferred_at: datetime | None = None
    supplement_requested_at: datetime | None = None
    supplement_received_at: datetime | None = None
    apology_at: datetime | None = None
    new_due_at: datetime | None = None
    resolved_at: datetime | None = None
    returned_at: datetime | None = None
    withdrawn_at: datetime | None = None
    rejected_at: datetime | None = None

    def last(self) -> datetime:
        """The latest step that becomes an event's time (due dates are promises, not steps)."""
        promises = {"due_at", "new_due_at"}
        return max(
            v for k, v in vars(self).items() if isinstance(v, datetime) and k not in promises
        )

    def shifted(self, by: timedelta) -> Times:
        """Every moment, promises included, `by` later."""
        return replace(
            self, **{k: v + by for k, v in vars(self).items() if isinstance(v, datetime)}
        )


# --- the 2019 calendar (replay) ------------------------------------------------------------------


def _period_days() -> tuple[date, ...]:
    first, days = PERIOD_START.date(), []
    while first < PERIOD_END.date():
        if is_working_day(first):
            days.append(first)
        first += timedelta(days=1)
    return tuple(days)


WORKING_DAYS: Final = _period_days()
# the year's working days and their positions, for stepping whole working days quickly
_YEAR: Final = tuple(
    d for d in (date(2019, 1, 1) + timedelta(days=i) for i in range(365 + 60)) if is_working_day(d)
)
_POSITION: Final = {d: i for i, d in enumerate(_YEAR)}
_JULY: Final = next(i for i, d in enumerate(WORKING_DAYS) if d >= PICKUP_OPENS.date())


def office_moment(day: date, rng: random.Random) -> datetime:
    """A minute during the desk's hours on `day`."""
    start, end = _MORNING if rng.random() < 0.55 else _AFTERNOON
    span = (end.hour * 60 + end.minute) - (start.hour * 60 + start.minute)
    minute = start.hour * 60 + start.minute + rng.randrange(span + 1)
    return datetime.combine(day, time(minute // 60, minute % 60), tzinfo=VIETNAM_TZ)


def working_day_after(day: date, n: int) -> date:
    """The n-th working day after the working day `day` (within 2019 and early 2020)."""
    return _YEAR[_POSITION[day] + n]


def schedule_2019(spec: Spec, rng: random.Random) -> Times:
    """Times inside the half-year that give the spec its fate exactly (CONTRACT section 2)."""
    lo = _JULY if spec.postal_mode in ("pickup", "pickup_and_return") else 0
    hi = len(WORKING_DAYS) - 1
    if spec.fate == "open":  # still in hand on 20 July: received in the last two months
        lo = max(lo, hi - 40)
    for _ in range(60):
        day_index = rng.randint(lo, hi)
        times = _attempt(spec, rng, WORKING_DAYS[day_index])
        if times is not None:
            return times
        hi = max(lo, day_index - 1)
    raise ValueError(f"no schedule fits the period for {spec}")


def _attempt(spec: Spec, rng: random.Random, day: date) -> Times | None:
    received_at = office_moment(day, rng)
    submitted_at = _submitted(spec, rng, received_at)
    if spec.fate == "rejected":
        rejected_at = received_at
        return Times(submitted_at, rejected_at=rejected_at) if rejected_at < PERIOD_END else None
    due_at = add_working_days(received_at, spec.procedure.days)
    t = Times(submitted_at, received_at=received_at, due_at=due_at)
    if spec.fate == "open":
        end = PERIOD_END - timedelta(hours=1)
    elif spec.fate == "withdrawn":
        t.withdrawn_at = received_at + timedelta(minutes=rng.randrange(60, 10 * 24 * 60))
        end = t.withdrawn_at
    else:
        t.resolved_at = _resolution(spec, rng, received_at, due_at)
        end = t.resolved_at
        if spec.apology:
            t.apology_at = due_at + (t.resolved_at - due_at) / 3
            t.new_due_at = add_working_days(t.apology_at, rng.randint(2, 5))
        t.returned_at = _returned(spec, rng, t.resolved_at)
    if end <= received_at:
        return None
    _middle_steps(spec, rng, t, end)
    last = t.last()
    if last >= PERIOD_END:
        if spec.postal_mode != "none" or t.resolved_at is None or t.resolved_at >= PERIOD_END:
            return None
        t.returned_at = None  # the result is collected after the period: no event for it
    return t if t.last() < PERIOD_END else None


def _submitted(spec: Spec, rng: random.Random, received_at: datetime) -> datetime:
    if spec.channel == "online":  # filed any time, taken in by the desk on a working day
        back = timedelta(minutes=rng.randrange(20, 3 * 24 * 60))
    elif spec.channel == "postal":
        back = timedelta(days=rng.randint(1, 3), minutes=rng.randrange(600))
    else:
        back = timedelta(minutes=rng.randrange(3, 45))
    floor = max(PERIOD_START + timedelta(hours=6), PICKUP_OPENS if spec.postal_mode in
                ("pickup", "pickup_and_return") else PERIOD_START)  # fmt: skip
    return max(received_at - back, min(floor, received_at))


def _resolution(
    spec: Spec, rng: random.Random, received_at: datetime, due_at: datetime
) -> datetime:
    due_day = due_at.astimezone(VIETNAM_TZ).date()
    received_day = received_at.astimezone(VIETNAM_TZ).date()
    if spec.fate == "on_time":  # on the due day, at or before due_at
        since_midnight = due_at.hour * 60 + due_at.minute - 1
        return due_at - timedelta(minutes=rng.randint(0, min(180, since_midnight)))
    if spec.fate == "late":
        if rng.random() < 0.1:  # the due day itself, after the appointment
            return due_at + timedelta(minutes=rng.randint(1, 120))
        short = spec.postal_mode != "none"
        extra = rng.randint(1, 2) if short else min(rng.randint(1, 4), rng.randint(1, 15))
        return office_moment(working_day_after(due_day, extra), rng)
    # early: a calendar day before the due day
    chosen = _YEAR[rng.randrange(_POSITION[received_day], _POSITION[due_day])]
    if chosen == received_day:
        return received_at + timedelta(minutes=rng.randint(10, 300))
    return office_moment(chosen, rng)


def _returned(spec: Spec, rng: random.Random, resolved_at: datetime) -> datetime:
    if spec.postal_mode in ("return", "pickup_and_return"):
        return resolved_at + timedelta(hours=rng.randint(20, 30))
    if spec.channel == "online" and spec.procedure.level == 4:
        return resolved_at + timedelta(minutes=rng.randint(1, 30))
    return resolved_at + timedelta(hours=rng.randint(1, 5 * 24))


def _middle_steps(spec: Spec, rng: random.Random, t: Times, end: datetime) -> None:
    assert t.received_at is not None
    span = end - t.received_at
    if spec.transfer_to is not None:
        t.transferred_at = t.received_at + span * 0.1
    if spec.supplement:
        t.supplement_requested_at = t.received_at + span * 0.25
        if spec.fate != "open" or rng.random() < 0.5:
            t.supplement_received_at = t.received_at + span * 0.6


# --- the live clock (motcua simulate) -----------------------------------------------------------


def schedule_live(spec: Spec, rng: random.Random, now: datetime, day_seconds: float) -> Times:
    """Compressed: one working day lasts `day_seconds`, a dossier's steps are seconds apart."""
    step = timedelta(seconds=day_seconds)
    submitted_at = now
    received_at = now + step * rng.uniform(0.1, 0.5)
    if spec.fate == "rejected":
        return Times(submitted_at, rejected_at=received_at)
    due_at = received_at + step * spec.procedure.days
    t = Times(submitted_at, received_at=received_at, due_at=due_at)
    if spec.fate == "withdrawn":
        t.withdrawn_at = received_at + step * rng.uniform(0.2, 2)
        end = t.withdrawn_at
    else:
        if spec.fate == "late":
            t.resolved_at = due_at + step * rng.uniform(0.2, 3)
            if spec.apology:
                t.apology_at = due_at + (t.resolved_at - due_at) / 3
                t.new_due_at = t.resolved_at + step
        else:
            t.resolved_at = received_at + (due_at - received_at) * rng.uniform(0.2, 1.0)
        t.returned_at = t.resolved_at + step * rng.uniform(0.2, 1)
        end = t.resolved_at
    _middle_steps(spec, rng, t, end)
    return t


# --- applicants ---------------------------------------------------------------------------------


def person_name(rng: random.Random) -> str:
    if rng.random() < 0.02:
        return f"{rng.choice(COMPANY_KINDS)} {rng.choice(COMPANY_WORDS)}"
    if rng.random() < 0.5:
        return f"{rng.choice(SURNAMES)} {rng.choice(MIDDLE_MALE)} {rng.choice(GIVEN_MALE)}"
    return f"{rng.choice(SURNAMES)} {rng.choice(MIDDLE_FEMALE)} {rng.choice(GIVEN_FEMALE)}"


def phone(rng: random.Random) -> str | None:
    """Mostly 10-digit mobiles; some old 11-digit ones, landlines, blanks and invalid ones."""
    roll = rng.random()
    if roll < 0.05:
        return None
    if roll < 0.13:
        return rng.choice(OLD_MOBILE_PREFIXES) + f"{rng.randrange(10**7):07d}"
    if roll < 0.16:
        return f"0258{rng.randrange(10**7):07d}"
    if roll < 0.18:  # typed wrong: too short, too long, letters, a foreign shape
        broken = (
            f"09{rng.randrange(10**6):06d}",
            f"09{rng.randrange(10**10):010d}",
            f"090{rng.randrange(10**4):04d}abc",
            f"+1{rng.randrange(10**9):09d}",
        )
        return rng.choice(broken)
    number = rng.choice(MOBILE_PREFIXES) + f"{rng.randrange(10**7):07d}"
    return f"+84{number[1:]}" if roll > 0.96 else number


def address(rng: random.Random, agency: Agency, routable: bool) -> dict[str, str] | str:
    """Mostly in the agency's district; some from elsewhere; a few free text (not routable)."""
    roll = rng.random()
    if not routable and roll < 0.03:
        return f"Tổ {rng.randint(1, 20)}, {rng.choice(STREETS)}, {PROVINCE}"
    street = f"{rng.randint(1, 350)} {rng.choice(STREETS)}"
    if roll > 0.95:
        province, district, commune = rng.choice(OTHER_PROVINCES)
        return {"province": province, "district": district, "commune": commune, "street": street}
    districts = [d for d in DISTRICTS if d[1] == agency.district] or list(DISTRICTS[:8])
    if roll > 0.8:
        districts = list(DISTRICTS)
    _, district, communes = rng.choice(districts)
    return {"province": PROVINCE, "district": district, "commune": rng.choice(communes),
            "street": street}  # fmt: skip


# --- events -------------------------------------------------------------------------------------


def iso(moment: datetime) -> str:
    """RFC 3339 to the second; every moment here is already in Asia/Ho_Chi_Minh time."""
    return moment.isoformat(timespec="seconds")


@dataclass
class DossierIds:
    """`<agency>-<yymmdd>-<nnnn>` numbered per agency and day, in the order dossiers come."""

    tag: str = ""  # between the date and the number, to keep runs of the live stream apart
    seen: dict[tuple[str, date], int] = field(default_factory=dict)

    def next(self, agency_code: str, day: date) -> str:
        n = self.seen.get((agency_code, day), 0) + 1
        self.seen[(agency_code, day)] = n
        return f"{agency_code}-{day:%y%m%d}-{self.tag}{n:04d}"


def events_of(
    spec: Spec, times: Times, dossier_id: str, rng: random.Random, source: str = SOURCE
) -> list[Event]:
    """The dossier's envelopes in time order; ids `<dossier>:<n>` are stable for a seed."""
    agency = spec.agency.code
    procedure = spec.procedure
    postal = spec.postal_mode != "none"
    fee = procedure.fee_vnd
    if fee == 0:
        method = "none"
    elif postal and spec.postal_mode == "pickup_and_return" and rng.random() < 0.3:
        method = "postal_cod"
    elif spec.channel == "online":
        method = "online" if rng.random() < 0.7 else "counter"
    else:
        method = "counter"
    applicant: dict[str, Any] = {"name": person_name(rng)}
    number = phone(rng)
    if number is not None:
        applicant["phone"] = number
    if rng.random() < 0.15:
        applicant["email"] = f"nguoidan{rng.randrange(10**6)}@gmail.com"
    applicant["address"] = address(rng, spec.agency, routable=postal)
    steps: list[tuple[datetime, str, dict[str, Any]]] = [
        (
            times.submitted_at,
            "dossier.submitted",
            {
                "procedure_code": procedure.code,
                "tier": spec.agency.tier,
                "sector": spec.sector,
                "channel": spec.channel,
                "online_level": procedure.level,  # the procedure's, whatever the channel
                "applicant": applicant,
                "fee": {"amount_vnd": fee, "method": method},
                "postal": {"mode": spec.postal_mode},
                "submitted_at": iso(times.submitted_at),
            },
        )
    ]
    holder = agency
    if times.rejected_at is not None:
        steps.append(
            (times.rejected_at, "dossier.rejected", {"reason": rng.choice(REJECT_REASONS)})
        )
    if times.received_at is not None and times.due_at is not None:
        receipt = f"{times.received_at:%y%m%d}{rng.randrange(10**6):06d}"
        steps.append(
            (
                times.received_at,
                "dossier.received",
                {
                    "received_at": iso(times.received_at),
                    "due_at": iso(times.due_at),
                    "receipt_no": receipt,
                },
            )
        )
    later: list[tuple[datetime, str, dict[str, Any]]] = []
    if times.transferred_at is not None and spec.transfer_to is not None:
        later.append((times.transferred_at, "dossier.transferred",
                      {"to_agency_code": spec.transfer_to.code}))  # fmt: skip
    if times.supplement_requested_at is not None:
        later.append(
            (
                times.supplement_requested_at,
                "dossier.supplement_requested",
                {
                    "reason": rng.choice(SUPPLEMENT_REASONS),
                    "requested_at": iso(times.supplement_requested_at),
                },
            )
        )
    if times.supplement_received_at is not None:
        later.append((times.supplement_received_at, "dossier.supplement_received",
                      {"received_at": iso(times.supplement_received_at)}))  # fmt: skip
    if times.apology_at is not None and times.new_due_at is not None:
        later.append(
            (
                times.apology_at,
                "dossier.apology_issued",
                {"reason": rng.choice(APOLOGY_REASONS), "new_due_at": iso(times.new_due_at)},
            )
        )
    if times.resolved_at is not None:
        outcome = "denied" if spec.denied else "approved"
        later.append((times.resolved_at, "dossier.resolved",
                      {"resolved_at": iso(times.resolved_at), "outcome": outcome}))  # fmt: skip
    if times.returned_at is not None:
        if spec.postal_mode in ("return", "pickup_and_return"):
            via = "postal"
        elif spec.channel == "online" and procedure.level == 4:
            via = "online"
        else:
            via = "counter"
        later.append((times.returned_at, "dossier.result_returned",
                      {"returned_at": iso(times.returned_at), "via": via}))  # fmt: skip
    if times.withdrawn_at is not None:
        later.append((times.withdrawn_at, "dossier.withdrawn",
                      {"withdrawn_at": iso(times.withdrawn_at)}))  # fmt: skip
    later.sort(key=lambda step: step[0])
    out: list[Event] = []
    for n, (moment, kind, data) in enumerate([*steps, *later], start=1):
        if kind == "dossier.transferred":
            data = {"dossier_id": dossier_id, "agency_code": holder, **data}
            holder = data["to_agency_code"]
        else:
            data = {"dossier_id": dossier_id, "agency_code": holder, **data}
        out.append(
            {
                "specversion": "1.0",
                "id": f"{dossier_id}:{n}",
                "source": source,
                "type": kind,
                "subject": dossier_id,
                "time": iso(moment),
                "datacontenttype": "application/json",
                "data": data,
            }
        )
    return out


def replay_events(
    specs: Iterable[Spec], seed: int, source: str = SOURCE, shift: timedelta = timedelta(0)
) -> Iterator[list[Event]]:
    """Each dossier's events (one list per dossier), deterministic for the specs and the seed.

    With `shift`, every moment is that much later, and so are the dates in the dossier ids: the
    same half-year another year, as new dossiers (a whole number of weeks keeps the weekdays).
    """
    rng = random.Random(seed * 1_000_003 + 17)
    ids = DossierIds()
    for spec in specs:
        times = schedule_2019(spec, rng)
        if shift:
            times = times.shifted(shift)
        dossier_id = ids.next(spec.agency.code, times.submitted_at.astimezone(VIETNAM_TZ).date())
        yield events_of(spec, times, dossier_id, rng, source)


def batches(dossiers: Iterable[list[Event]], size: int = 500) -> Iterator[list[Event]]:
    """Whole dossiers packed into batches of at most `size` events (a dossier never straddles
    two requests, so its events reach Kafka in order even with several requests in flight)."""
    batch: list[Event] = []
    for events in dossiers:
        if len(batch) + len(events) > size and batch:
            yield batch
            batch = []
        batch.extend(events)
    if batch:
        yield batch
