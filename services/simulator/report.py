"""The replay's verdict, free of I/O: each seed figure, its target at scale F, the figure read back
from the metrics API, and whether the difference is within the rounding of the scale.

Counts are exact by construction, so a count must match to the dossier. A rate can only be as
close as whole dossiers allow: it passes within half a dossier of its denominator plus the
rounding of the published two-decimal percentage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from services.simulator.catalog import CONSTRUCTION, LABOUR, LAND
from services.simulator.plan import (
    LATE,
    ONLINE_RESOLVED,
    PICKUP_AND_RETURN,
    POSTAL_TOTAL,
    RECEIVED,
    RESOLVED,
    SECTOR_LATE_RATES,
    Targets,
)

PUBLISHED_ROUNDING = 0.00005  # a percentage published with two decimals


@dataclass(frozen=True, slots=True)
class Check:
    label: str
    seed: str
    target: float
    read: float | None
    tolerance: float = 0.0
    kind: Literal["count", "rate"] = "count"

    @property
    def difference(self) -> float | None:
        return None if self.read is None else self.read - self.target

    @property
    def ok(self) -> bool:
        diff = self.difference
        return diff is not None and abs(diff) <= self.tolerance + 1e-12

    def cells(self) -> tuple[str, str, str, str, str]:
        if self.kind == "rate":
            target, read = f"{self.target:.2%}", "—" if self.read is None else f"{self.read:.2%}"
            diff = "—" if self.difference is None else f"{self.difference * 100:+.2f} pp"
        else:
            target = f"{int(self.target):,}"
            read = "—" if self.read is None else f"{int(self.read):,}"
            diff = "—" if self.difference is None else f"{int(self.difference):+,}"
        return self.label, self.seed, target, read, diff


def groups_of(payload: Any, by: str) -> dict[str, Mapping[str, Any]]:
    """The per-group `dossiers` blocks of a breakdown answer, whatever its wrapping: a mapping
    group -> block, the same under `groups`/`breakdown`, or a list of objects naming the group
    under `by`, `key`, `group` or `value` (CONTRACT section 5 leaves the wrapping open)."""
    if isinstance(payload, Mapping):
        for wrapper in ("groups", "breakdown", "items", "results"):
            if wrapper in payload:
                return groups_of(payload[wrapper], by)
        out: dict[str, Mapping[str, Any]] = {}
        for key, value in payload.items():
            if isinstance(value, Mapping):
                out[str(key)] = value.get("dossiers", value)
        return out
    if isinstance(payload, list):
        found: dict[str, Mapping[str, Any]] = {}
        for item in payload:
            if not isinstance(item, Mapping):
                continue
            name = next((item[k] for k in (by, "key", "group", "value") if k in item), None)
            if name is not None:
                found[str(name)] = item.get("dossiers", item)
        return found
    return {}


def _count(block: Mapping[str, Any] | None, *names: str) -> int | None:
    if block is None:
        return None
    values = [block.get(name) for name in names]
    if any(not isinstance(v, int) for v in values):
        return None
    return sum(v for v in values if isinstance(v, int))


def _rate(late: int | None, total: int | None) -> float | None:
    return None if late is None or not total else late / total


def _rate_tolerance(total: int | None) -> float:
    return (0.5 / total if total else 0.0) + PUBLISHED_ROUNDING


def checks(
    t: Targets,
    summary: Mapping[str, Any] | None,
    by_agency: Mapping[str, Mapping[str, Any]],
    by_sector: Mapping[str, Mapping[str, Any]],
    postal: Mapping[str, Any] | None,
) -> list[Check]:
    """Every figure of the replay's table, from what the metrics API answered."""
    block = summary.get("dossiers") if summary else None
    resolved = _count(block, "resolved")
    late = _count(block, "late")
    in_time = _count(block, "early", "on_time")
    online = _count(block, "online_resolved")
    out = [
        Check("received", f"{RECEIVED:,}", t.received, _count(block, "received")),
        Check("resolved", f"{RESOLVED:,}", t.resolved, resolved),
        Check("early or on time", f"{RESOLVED - LATE:,}", t.early_or_on_time, in_time),
        Check("late", f"{LATE:,}", t.late, late),
        Check(
            "on-time rate",
            "97.04 %",
            0.9704,
            _rate(in_time, resolved),
            _rate_tolerance(resolved),
            "rate",
        ),
        Check("resolved online", f"{ONLINE_RESOLVED:,}", t.online_resolved, online),
        Check(
            "online rate",
            "17.12 %",
            0.1712,
            _rate(online, resolved),
            _rate_tolerance(resolved),
            "rate",
        ),
    ]
    labels = {CONSTRUCTION: "construction", LAND: "land", LABOUR: "labour-invalids-social"}
    for sector, rate in SECTOR_LATE_RATES.items():
        group = by_sector.get(sector)
        total = _count(group, "resolved")
        out.append(
            Check(
                f"late rate, {labels[sector]}",
                f"{rate:.2%}".replace("%", " %"),
                rate,
                _rate(_count(group, "late"), total),
                _rate_tolerance(total),
                "rate",
            )
        )
    for named in t.named:
        group = by_agency.get(named.named.agency_code)
        share = f"{named.named.online / named.named.all:.2%}".replace("%", " %")
        out.append(
            Check(
                f"{named.named.label}: all",
                f"{named.named.all:,}",
                named.all,
                _count(group, "resolved"),
            )
        )
        out.append(
            Check(
                f"{named.named.label}: online",
                f"{named.named.online:,} ({share})",
                named.online,
                _count(group, "online_resolved"),
            )
        )
    postal_block = postal.get("postal") if postal else None
    out.append(
        Check(
            "postal pickups", f"{PICKUP_AND_RETURN:,}", t.pickups, _count(postal_block, "pickups")
        )
    )
    out.append(
        Check("postal returns", f"{POSTAL_TOTAL:,}", t.returns, _count(postal_block, "returns"))
    )
    return out


def caught_up(found: list[Check]) -> bool:
    return all(c.ok for c in found)


def progress_of(found: list[Check]) -> tuple[int, int]:
    """(done, total) over the count checks, for the waiting bar."""
    counts = [c for c in found if c.kind == "count"]
    total = sum(int(c.target) for c in counts)
    done = sum(min(int(c.read or 0), int(c.target)) for c in counts)
    return done, total
