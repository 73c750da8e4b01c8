"""The live stream's core (`motcua simulate`) and the replay table's verdict, without I/O."""

from __future__ import annotations

import random
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

from services.common.events import parse_event
from services.simulator.lifecycle import DossierIds
from services.simulator.plan import targets
from services.simulator.report import checks, groups_of
from services.simulator.shell import _Due, due_events, live_dossier, payers

ICT = timezone(timedelta(hours=7))
NOW = datetime(2026, 11, 25, 9, 0, tzinfo=ICT)


def stream(seed: int, n: int = 400) -> list[list[dict[str, Any]]]:
    rng = random.Random(seed)
    ids = DossierIds(tag="AB")
    return [live_dossier(rng, ids, NOW, 5.0, "portal/dev") for _ in range(n)]


def test_live_dossiers_are_valid_ordered_and_seconds_apart() -> None:
    dossiers = stream(1)
    kinds: Counter[str] = Counter()
    for events in dossiers:
        times = [datetime.fromisoformat(e["time"]) for e in events]
        assert times == sorted(times)
        assert times[0] >= NOW and times[-1] - times[0] < timedelta(minutes=10)
        for event in events:
            assert parse_event(event).source == "portal/dev"
            kinds[event["type"]] += 1
    assert len({e["subject"] for d in dossiers for e in d}) == len(dossiers)
    assert kinds["dossier.resolved"] > 300
    for kind in ("dossier.rejected", "dossier.withdrawn", "dossier.apology_issued"):
        assert kinds[kind] > 0, kind
    tiers = {d[0]["data"]["tier"] for d in dossiers}
    assert tiers == {"province", "district", "commune", "vertical"}


def test_live_stream_is_repeatable_for_a_seed() -> None:
    assert stream(5, 50) == stream(5, 50)
    assert stream(5, 50) != stream(6, 50)


def test_due_events_pops_only_what_is_due_in_time_order() -> None:
    import heapq

    heap: list[_Due] = []
    for seq, minutes in enumerate([5, 1, 3, 9]):
        heapq.heappush(heap, _Due(NOW + timedelta(minutes=minutes), seq, {"n": minutes}))
    assert [e["n"] for e in due_events(heap, NOW + timedelta(minutes=4))] == [1, 3]
    assert len(heap) == 2


def block(**counts: int) -> dict[str, Any]:
    base = {"received": 0, "resolved": 0, "early": 0, "on_time": 0, "late": 0, "online_resolved": 0}
    return {**base, **counts}


def test_the_table_passes_on_exact_figures_and_fails_on_one_off() -> None:
    t = targets(0.01)
    summary = {
        "dossiers": block(
            received=2957, resolved=2791, early=2108, on_time=600, late=83, online_resolved=478
        ),
    }
    sectors = {
        "groups": [
            {"sector": "construction", "dossiers": block(resolved=44, late=6)},
            {"sector": "land", "dossiers": block(resolved=600, late=65)},
            {"sector": "labour_invalids_social_affairs", "dossiers": block(resolved=140, late=2)},
        ]
    }
    agencies = {
        "groups": [
            {
                "agency_code": n.named.agency_code,
                "dossiers": block(resolved=n.all, online_resolved=n.online),
            }
            for n in t.named
        ]
    }
    postal = {"postal": {"pickups": 11, "returns": 1031}}
    found = checks(
        t, summary, groups_of(agencies, "agency_code"), groups_of(sectors, "sector"), postal
    )
    assert all(c.ok for c in found), [c.cells() for c in found if not c.ok]
    postal_short = {"postal": {"pickups": 10, "returns": 1031}}
    found = checks(
        t, summary, groups_of(agencies, "agency_code"), groups_of(sectors, "sector"), postal_short
    )
    assert [c.label for c in found if not c.ok] == ["postal pickups"]
    missing = checks(t, None, {}, {}, None)
    assert not any(c.ok for c in missing)


def test_payers_are_applicants_with_an_online_fee_in_the_given_share() -> None:
    events = [e for dossier in stream(7, 600) for e in dossier]
    owing = {
        e["subject"]
        for e in events
        if e["type"] == "dossier.submitted"
        and e["data"]["fee"]["method"] == "online"
        and e["data"]["fee"]["amount_vnd"] > 0
    }
    assert len(owing) > 50
    assert payers(events, random.Random(1), 0.0) == []
    assert set(payers(events, random.Random(1), 1.0)) == owing
    some = payers(events, random.Random(1), 0.8)
    assert set(some) <= owing and 0.65 * len(owing) < len(some) < 0.95 * len(owing)
