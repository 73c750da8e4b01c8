"""Query parameters of the metrics API, checked without I/O (CONTRACT section 5)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import get_args

from services.common.events import Tier
from services.common.params import ParamError
from services.metrics.domain import UNKNOWN, Dimension

WINDOWS = {
    "1h": timedelta(hours=1),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
BEGINNING = datetime(1970, 1, 1, tzinfo=UTC)
TIERS = frozenset({*get_args(Tier), UNKNOWN})
BY = ("agency_code", "tier", "sector")


@dataclass(frozen=True)
class Query:
    start: datetime
    end: datetime
    agency_code: str | None = None
    tier: str | None = None
    sector: str | None = None


def _instant(name: str, value: str, errors: list[ParamError]) -> datetime | None:
    try:
        # a '+' unescaped in a URL; RFC 3339 allows a lowercase 't' and 'z'
        moment = datetime.fromisoformat(value.replace(" ", "+").upper())
    except ValueError:
        errors.append(ParamError(name, f"not an RFC 3339 timestamp: {value!r}"))
        return None
    if moment.utcoffset() is None:
        errors.append(ParamError(name, "an offset (Z or +07:00) is required"))
        return None
    return moment


def parse_query(params: dict[str, str], now: datetime) -> tuple[Query | None, list[ParamError]]:
    """The range and filters of a summary or breakdown, or what is wrong with them.

    `window` (1h, 24h, 7d, 30d) trails `now`; else `from` defaults to the beginning of time and
    `to` to now. Both ways are half-open [from, to) in event time."""
    errors: list[ParamError] = []
    window, start_raw, end_raw = params.get("window"), params.get("from"), params.get("to")
    start: datetime | None = BEGINNING
    end: datetime | None = now
    if window is not None:
        if start_raw is not None or end_raw is not None:
            errors.append(ParamError("window", "give either window or from/to, not both"))
        elif window not in WINDOWS:
            errors.append(ParamError("window", f"must be one of {', '.join(WINDOWS)}"))
        else:
            start = now - WINDOWS[window]
    else:
        if start_raw is not None:
            start = _instant("from", start_raw, errors)
        if end_raw is not None:
            end = _instant("to", end_raw, errors)
        if start is not None and end is not None and start > end:
            errors.append(ParamError("to", "must not be before from"))
    tier = params.get("tier")
    if tier is not None and tier not in TIERS:
        errors.append(ParamError("tier", f"must be one of {', '.join(sorted(TIERS))}"))
    for name in ("agency_code", "sector"):
        if name in params and not params[name]:
            errors.append(ParamError(name, "must not be empty"))
    if errors or start is None or end is None:
        return None, errors
    return Query(start, end, params.get("agency_code"), tier, params.get("sector")), []


def parse_by(value: str | None) -> tuple[Dimension | None, list[ParamError]]:
    if value not in BY:
        return None, [ParamError("by", f"must be one of {', '.join(BY)}")]
    dimension: Dimension = value  # type: ignore[assignment]
    return dimension, []


STEPS = {"hour": timedelta(hours=1), "day": timedelta(days=1), "week": timedelta(days=7)}
MAX_POINTS = 400


def parse_step(
    value: str | None, start: datetime, end: datetime
) -> tuple[str | None, list[ParamError]]:
    """The step of a series over [start, end): one of STEPS, at most MAX_POINTS points."""
    if value not in STEPS:
        return None, [ParamError("step", f"must be one of {', '.join(STEPS)}")]
    points = math.ceil((end - start) / STEPS[value]) if end > start else 0
    if points > MAX_POINTS:
        detail = f"{points} points over this range; at most {MAX_POINTS} (a longer step)"
        return None, [ParamError("step", detail)]
    return value, []


def buckets(start: datetime, end: datetime, step: str) -> list[tuple[datetime, datetime]]:
    """[start, end) cut into steps from `start`; the last one ends at `end`."""
    size, out, at = STEPS[step], [], start
    while at < end:
        out.append((at, min(at + size, end)))
        at += size
    return out
