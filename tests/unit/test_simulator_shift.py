"""The replay shifted in time (`bench/state.py` sends the half-year twice, the second a year
later): the same dossiers under new ids, every moment moved by the shift, read back over the
shifted period."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import httpx

from services.common.events import parse_event
from services.simulator.lifecycle import replay_events
from services.simulator.plan import PERIOD_END, PERIOD_START, plan, targets
from services.simulator.shell import OperatorToken, read_back

YEAR = timedelta(weeks=52)
MOMENTS = ("submitted_at", "received_at", "due_at", "requested_at", "new_due_at",
           "resolved_at", "returned_at", "withdrawn_at")  # fmt: skip


def moments(event: dict[str, Any]) -> list[datetime]:
    data = event["data"]
    found = [datetime.fromisoformat(event["time"])]
    found += [datetime.fromisoformat(data[k]) for k in MOMENTS if k in data]
    return found


def without_ids_and_moments(event: dict[str, Any]) -> dict[str, Any]:
    skip = {"dossier_id", "receipt_no", *MOMENTS}
    data = {k: v for k, v in event["data"].items() if k not in skip}
    return {**event, "id": None, "subject": None, "time": None, "data": data}


def test_shifted_half_year_is_the_same_dossiers_a_year_later_under_new_ids() -> None:
    specs = plan(0.003, 2019)
    first = list(replay_events(specs, 2019))
    second = list(replay_events(specs, 2019, shift=YEAR))

    assert len(first) == len(second)
    ids_first = {events[0]["subject"] for events in first}
    ids_second = {events[0]["subject"] for events in second}
    assert len(ids_second) == len(second) and not ids_first & ids_second
    for old, new in zip(first, second, strict=True):
        assert [without_ids_and_moments(e) for e in old] == [
            without_ids_and_moments(e) for e in new
        ]
        for before, after in zip(old, new, strict=True):
            parse_event(after)
            assert [m + YEAR for m in moments(before)] == moments(after)
            assert PERIOD_START + YEAR <= datetime.fromisoformat(after["time"]) < PERIOD_END + YEAR


async def test_read_back_of_a_shifted_replay_asks_for_the_shifted_period() -> None:
    asked: list[dict[str, str]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        asked.append(dict(request.url.params))
        return httpx.Response(200, json={})

    async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as http:
        await read_back(http, "http://metrics", targets(0.01), OperatorToken("t"), YEAR)

    start, end = (PERIOD_START + YEAR).isoformat(), (PERIOD_END + YEAR).isoformat()
    assert [(q["from"], q.get("to")) for q in asked[:3]] == [(start, end)] * 3
    assert asked[3]["from"] == start
