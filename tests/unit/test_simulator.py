"""The replay's pure core: the generated half-year, recounted here from the events themselves
(CONTRACT section 2, classification written out again in this file), equals every scaled target.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.events import parse_event
from services.simulator.lifecycle import batches, replay_events
from services.simulator.plan import apportion, plan

ICT = timezone(timedelta(hours=7))
START = datetime(2019, 1, 1, tzinfo=ICT)
END = datetime(2019, 7, 21, tzinfo=ICT)
NAMED = {  # agency code: (online, all) from FACTS
    "000.00.11.H34": (386, 394),
    "000.00.13.H34": (4_763, 6_857),
    "000.00.14.H34": (2_429, 4_433),
    "000.00.15.H34": (2_505, 4_627),
    "000.00.16.H34": (264, 653),
}
RATES = {"construction": 0.1257, "land": 0.1090, "labour_invalids_social_affairs": 0.0143}


def scaled(figure: int, scale: float) -> int:
    exact = Decimal(figure) * Decimal(str(scale))
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


@dataclass
class Recount:
    events: int = 0
    received: int = 0
    resolved: int = 0
    classes: Counter[str] = field(default_factory=Counter)
    online_resolved: int = 0
    by_sector: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    by_agency: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    pickups: int = 0
    returns: int = 0
    outside: int = 0
    digest: str = ""


def when(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    assert moment.utcoffset() is not None
    return moment


def classify(resolved_at: datetime, due_at: datetime) -> str:
    resolved_day = resolved_at.astimezone(ICT).date()
    due_day = due_at.astimezone(ICT).date()
    if resolved_day < due_day:
        return "early"
    if resolved_day == due_day and resolved_at <= due_at:
        return "on_time"
    return "late"


def recount(dossiers: list[list[dict[str, Any]]], validate_every: int = 1) -> Recount:
    out = Recount()
    sha = hashlib.sha256()
    for position, events in enumerate(dossiers):
        by_type: dict[str, dict[str, Any]] = {}
        for event in events:
            sha.update(orjson.dumps(event))
            out.events += 1
            if position % validate_every == 0:
                parse_event(event)
            assert event["type"] not in by_type, "one event of each type per dossier"
            by_type[event["type"]] = event
            if not START <= when(event["time"]) < END:
                out.outside += 1
        submitted = by_type["dossier.submitted"]["data"]
        received = by_type.get("dossier.received")
        if received is not None:
            out.received += 1
        resolved = by_type.get("dossier.resolved")
        mode = submitted["postal"]["mode"]
        closed_early = "dossier.withdrawn" in by_type or "dossier.rejected" in by_type
        if mode in ("pickup", "pickup_and_return") and not closed_early:
            out.pickups += 1
        if resolved is None:
            continue
        if mode in ("return", "pickup_and_return"):
            out.returns += 1
        assert received is not None
        kind = classify(when(resolved["data"]["resolved_at"]), when(received["data"]["due_at"]))
        online = submitted["channel"] == "online"
        out.resolved += 1
        out.classes[kind] += 1
        out.online_resolved += online
        for counter in (
            out.by_sector[submitted["sector"]],
            out.by_agency[resolved["data"]["agency_code"]],
        ):
            counter["resolved"] += 1
            counter[kind] += 1
            counter["online"] += online
    out.digest = sha.hexdigest()
    return out


def generate(scale: float, seed: int) -> list[list[dict[str, Any]]]:
    return list(replay_events(plan(scale, seed), seed))


def assert_targets(scale: float, got: Recount) -> None:
    assert got.outside == 0, "every event inside 1 Jan - 20 Jul 2019"
    assert got.received == scaled(295_691, scale)
    assert got.resolved == scaled(279_072, scale)
    assert got.classes["late"] == scaled(8_273, scale)
    assert got.classes["early"] + got.classes["on_time"] == got.resolved - got.classes["late"]
    assert got.online_resolved == scaled(47_774, scale)
    assert got.pickups == scaled(1_075, scale)
    assert got.returns == scaled(103_114, scale)
    for code, (online, all_) in NAMED.items():
        agency = got.by_agency[code]
        assert (agency["online"], agency["resolved"]) == (
            scaled(online, scale),
            scaled(all_, scale),
        )
    for sector, rate in RATES.items():
        counts = got.by_sector[sector]
        # with integer counts the rate is within half a dossier (and the published rounding)
        assert abs(counts["late"] / counts["resolved"] - rate) <= 0.5 / counts["resolved"] + 5e-5


@pytest.mark.parametrize("scale", [0.001, 0.01, 0.1])
def test_recounted_stream_equals_every_scaled_target(scale: float) -> None:
    assert_targets(scale, recount(generate(scale, 2019)))


def test_full_scale_plan_is_exact_and_rates_hold_to_two_decimals() -> None:
    # At F = 1.0 the plan (each dossier's fate) is recounted rather than its 1.2M events: the
    # event-level recounts above show that the events carry out the plan, at a tenth of the cost.
    specs = plan(1.0, 2019)
    resolved = [s for s in specs if s.resolved]
    late = [s for s in resolved if s.fate == "late"]
    online = [s for s in resolved if s.channel == "online"]
    received = [s for s in specs if s.fate != "rejected"]
    assert len(received) == 295_691
    assert len(resolved) == 279_072
    assert len(late) == 8_273
    assert len(online) == 47_774
    assert sum(s.postal_mode == "pickup_and_return" for s in resolved) == 1_075
    assert sum(s.postal_mode in ("return", "pickup_and_return") for s in resolved) == 103_114
    assert round(len(late) / len(resolved), 4) == 0.0296
    assert round(len(online) / len(resolved), 4) == 0.1712
    for sector, rate in RATES.items():
        in_sector = [s for s in resolved if s.sector == sector]
        late_in_sector = sum(s.fate == "late" for s in in_sector)
        assert round(late_in_sector / len(in_sector), 4) == rate
    for code, (online_count, all_count) in NAMED.items():
        mine = [s for s in specs if s.agency.code == code]
        assert len(mine) == all_count
        assert all(s.resolved and s.transfer_to is None for s in mine)
        assert sum(s.channel == "online" for s in mine) == online_count


def test_same_seed_same_bytes_other_seed_other_bytes() -> None:
    first = recount(generate(0.005, 7))
    again = recount(generate(0.005, 7))
    other = recount(generate(0.005, 8))
    assert first.digest == again.digest
    assert first.digest != other.digest
    assert_targets(0.005, other)


def test_batches_hold_whole_dossiers_of_at_most_500() -> None:
    dossiers = generate(0.003, 1)
    sizes = [len(d) for d in dossiers]
    packed = list(batches(iter(dossiers), 500))
    assert sum(len(b) for b in packed) == sum(sizes)
    assert all(0 < len(b) <= 500 for b in packed)
    for batch in packed:  # a dossier's events never straddle two batches
        subjects = [e["subject"] for e in batch]
        assert len(set(subjects)) == len(dict.fromkeys(subjects))
        seen: list[str] = []
        for subject in subjects:
            if not seen or seen[-1] != subject:
                assert subject not in seen
                seen.append(subject)


def test_stream_has_the_variety_the_demo_needs() -> None:
    dossiers = generate(0.02, 3)
    types = Counter(e["type"] for d in dossiers for e in d)
    for kind in (
        "dossier.rejected",
        "dossier.supplement_requested",
        "dossier.supplement_received",
        "dossier.transferred",
        "dossier.apology_issued",
        "dossier.withdrawn",
        "dossier.result_returned",
    ):
        assert types[kind] > 0, kind
    submitted = [d[0]["data"] for d in dossiers]
    phones = [s["applicant"].get("phone") for s in submitted]
    assert any(p and len(p) == 11 and p.startswith(("016", "012")) for p in phones)
    assert any(p and not p.lstrip("+").isdigit() for p in phones)
    assert {s["tier"] for s in submitted} == {"province", "district", "commune"}
    assert {s["fee"]["method"] for s in submitted} == {"online", "counter", "postal_cod", "none"}
    assert {s["channel"] for s in submitted} == {"online", "counter", "postal"}
    districts = {s["applicant"]["address"]["district"] for s in submitted
                 if isinstance(s["applicant"]["address"], dict)}  # fmt: skip
    assert {"Nha Trang", "Cam Ranh", "Ninh Hòa", "Trường Sa"} <= districts


@settings(max_examples=200, deadline=None)
@given(
    total=st.integers(0, 10_000),
    weights=st.lists(st.floats(0.01, 100), min_size=1, max_size=8),
    seed=st.integers(0, 2**32),
)
def test_apportion_is_exact_and_respects_caps(total: int, weights: list[float], seed: int) -> None:
    rng = random.Random(seed)
    caps = [rng.randint(0, 3_000) for _ in weights]
    if total > sum(caps):
        with pytest.raises(ValueError):
            apportion(total, weights, caps)
        return
    parts = apportion(total, weights, caps)
    assert sum(parts) == total
    assert all(0 <= p <= c for p, c in zip(parts, caps, strict=True))
