"""Generated dossier lifecycles as valid CloudEvents, for the metrics oracle test and benchmark.

Every event is built with `services.common.events.make_event`, so it passes the contract's
validation. Times are spread over a 2019 window with assorted offsets; about one dossier in eight
stays open (some past their due date), and outcome events (payments, postal, SMS) come along.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from services.common.events import CloudEvent, make_event
from services.common.tz import VIETNAM_TZ
from services.metrics.calendar import add_working_days

TIERS = ("province", "district", "commune", "vertical")
SECTORS = ("land", "construction", "justice", "labour", "transport", "health", "education")
OFFSETS = (VIETNAM_TZ, UTC, timezone(timedelta(hours=-5)))
START = datetime(2019, 3, 1, 7, 30, tzinfo=VIETNAM_TZ)


def agencies(count: int, rng: random.Random) -> list[tuple[str, str, tuple[str, ...]]]:
    """(agency code, tier, the sectors it serves): a few sectors each, as in the province."""
    out = []
    for i in range(count):
        tier = TIERS[i % len(TIERS)]
        served = tuple(rng.sample(SECTORS, rng.randint(1, 3)))
        out.append((f"000.{i // 100:02d}.{i % 100:02d}.H34", tier, served))
    return out


def lifecycle(
    rng: random.Random,
    dossier_id: str,
    agency_list: list[tuple[str, str, tuple[str, ...]]],
    start: datetime = START,
    span_days: int = 30,
) -> list[CloudEvent[Any]]:
    """One dossier's events, in the order they happened."""
    events: list[CloudEvent[Any]] = []
    agency, tier, served = rng.choice(agency_list)
    sector = rng.choice(served)
    channel = rng.choices(("online", "counter", "postal"), (3, 6, 1))[0]
    clock = start + timedelta(minutes=rng.randint(0, span_days * 1440), seconds=rng.randint(0, 59))
    number = 0

    def add(kind: str, at: datetime, source: str = "portal/dev", **data: Any) -> None:
        nonlocal number
        number += 1
        shown = at.astimezone(rng.choice(OFFSETS))
        events.append(
            make_event(
                kind,
                source=source,
                id=f"{dossier_id}-{number}",
                subject=dossier_id,
                time=shown,
                data={"dossier_id": dossier_id, **data},
            )
        )

    def later(max_minutes: int) -> datetime:
        nonlocal clock
        clock += timedelta(minutes=rng.randint(1, max_minutes), seconds=rng.randint(0, 59))
        return clock

    fee = rng.choice((0, 0, 50_000, 100_000, 350_000))
    procedure = rng.randint(1, 40)
    add(
        "dossier.submitted",
        clock,
        agency_code=agency,
        procedure_code=f"P-{sector}-{procedure}",
        tier=tier,
        sector=sector,
        channel=channel,
        # the procedure's level, whatever the channel (no draw: the stream of a seed stays the same)
        online_level=rng.choice((3, 4)) if channel == "online" else (None, 3, 4)[procedure % 3],
        applicant={"name": "Nguyễn Văn A"},
        fee={"amount_vnd": fee, "method": "online" if fee and channel == "online" else "none"},
        postal={"mode": "pickup_and_return" if channel == "postal" else "none"},
        submitted_at=clock.isoformat(),
    )
    if fee and channel == "online":
        add("payment.requested", later(5), "motcua/payments", amount_vnd=fee)
        fate = rng.choices(("succeeded", "failed", "expired"), (8, 1, 1))[0]
        if fate == "succeeded":
            add("payment.succeeded", later(30), "motcua/payments", amount_vnd=fee)
            if rng.random() < 0.05:
                add("payment.reconciliation_mismatch", later(1440), "motcua/payments",
                    amount_vnd=fee, reason="amount differs")  # fmt: skip
        elif fate == "failed":
            add("payment.failed", later(30), "motcua/payments", reason="card declined")
        else:
            add("payment.expired", later(60), "motcua/payments")
    if channel == "postal":
        add("postal.pickup_requested", later(10), "motcua/postal")
        add("postal.picked_up", later(600), "motcua/postal")
    if rng.random() < 0.06:
        add("dossier.rejected", later(600), agency_code=agency, reason="incomplete")
        return events
    received_at = later(2 * 1440)
    due = add_working_days(received_at, rng.choice((1, 3, 5, 10, 15)))
    add(
        "dossier.received",
        received_at,
        agency_code=agency,
        received_at=received_at.astimezone(rng.choice(OFFSETS)).isoformat(),
        due_at=due.astimezone(rng.choice(OFFSETS)).isoformat(),
        receipt_no=f"R-{dossier_id}",
    )
    add("sms.sent", later(5), "motcua/sms", segments=rng.randint(1, 3), template="received")
    add(rng.choice(("sms.delivered", "sms.delivered", "sms.failed")), later(5), "motcua/sms",
        reason="unreachable")  # fmt: skip
    if rng.random() < 0.15:
        add("dossier.supplement_requested", later(1440), agency_code=agency,
            reason="missing scan", requested_at=clock.isoformat())  # fmt: skip
        if rng.random() < 0.8:
            add("dossier.supplement_received", later(1440), agency_code=agency,
                received_at=clock.isoformat())  # fmt: skip
    if rng.random() < 0.1:
        new_agency = rng.choice(agency_list)[0]
        add("dossier.transferred", later(600), agency_code=agency, to_agency_code=new_agency)
        agency = new_agency
    end = rng.choices(("resolved", "withdrawn", "open"), (85, 3, 12))[0]
    if end == "withdrawn":
        add("dossier.withdrawn", later(3 * 1440), agency_code=agency,
            withdrawn_at=clock.isoformat())  # fmt: skip
    elif end == "resolved":
        drift = timedelta(minutes=rng.randint(-5 * 1440, 2 * 1440))
        resolved_at = max(clock + timedelta(minutes=1), due + drift)
        clock = resolved_at
        if resolved_at > due and rng.random() < 0.5:
            add("dossier.apology_issued", clock, agency_code=agency, reason="late",
                new_due_at=(clock + timedelta(days=3)).isoformat())  # fmt: skip
            clock += timedelta(minutes=1)
            resolved_at = clock
        outcome = rng.choice(("approved", "denied"))
        add("dossier.resolved", resolved_at, agency_code=agency,
            resolved_at=resolved_at.isoformat(), outcome=outcome)  # fmt: skip
        if channel == "postal" or rng.random() < 0.1:
            add("postal.return_requested", later(60), "motcua/postal")
            add(rng.choice(("postal.delivered", "postal.delivered", "postal.failed")),
                later(2880), "motcua/postal", reason="nobody home")  # fmt: skip
            if rng.random() < 0.3:
                add("postal.cod_collected", later(60), "motcua/postal", amount_vnd=30_000)
        add("dossier.result_returned", later(2880), agency_code=agency,
            returned_at=clock.isoformat(), via="counter")  # fmt: skip
    if rng.random() < 0.05:
        add("sms.suppressed", later(60), "motcua/sms", reason="opted out")
    return events


def stream(
    dossiers: int, seed: int = 6, agency_count: int = 40, span_days: int = 30, prefix: str = "H"
) -> Iterator[list[CloudEvent[Any]]]:
    """`dossiers` lifecycles, one list of events per dossier."""
    rng = random.Random(seed)
    agency_list = agencies(agency_count, rng)
    for i in range(dossiers):
        yield lifecycle(rng, f"{prefix}{i:07d}", agency_list, span_days=span_days)
