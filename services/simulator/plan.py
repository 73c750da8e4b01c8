"""What the half-year holds, dossier by dossier: exact counts by construction, no sampling.

`targets(F)` is the seed figures at scale F (half-up rounding). `plan(F, seed)` returns one `Spec`
per dossier whose fates add up to exactly those targets:

- resolved per sector: the five named agencies' sectors take their agencies' `all` counts (every
  one of their dossiers is received and resolved in the period, none transferred), the three
  sectors with a published late rate take their fixed sizes, and the other sectors share the rest
  of `resolved` by weight (largest remainders);
- late: the three fixed-rate sectors take round(rate x size); the others share what remains;
- online among resolved: the named agencies take their `online` counts, the rest is shared;
- postal: round(1,075F) pickup-and-return (filed online from 1 July, as FACTS says the option
  opened then) and round(103,114F) - round(1,075F) return-only, all among resolved dossiers;
- received but not resolved in the period: round(295,691F) - resolved, some withdrawn, the rest
  still open; rejected at intake (never received) come on top and change no target.

Randomness (which agency, procedure, applicant, who gets a transfer or supplement request) comes
from one `random.Random(seed)`, so a seed gives the same plan, and the same events, every time.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Final, Literal

from services.common.tz import VIETNAM_TZ
from services.simulator.catalog import (
    CONSTRUCTION,
    LABOUR,
    LAND,
    NAMED,
    NAMED_SECTOR,
    REPLAY_SECTORS,
    SECTOR_BY_KEY,
    SECTORS,
    Agency,
    Named,
    Procedure,
    Sector,
    agencies_for,
)

PERIOD_START: Final = datetime(2019, 1, 1, tzinfo=VIETNAM_TZ)
PERIOD_END: Final = datetime(2019, 7, 21, tzinfo=VIETNAM_TZ)  # exclusive: 20 July is the last day
PICKUP_OPENS: Final = datetime(2019, 7, 1, tzinfo=VIETNAM_TZ)

# FACTS, 1 Jan - 20 Jul 2019 (departments + district + commune committees)
RECEIVED: Final = 295_691
RESOLVED: Final = 279_072
LATE: Final = 8_273
ONLINE_RESOLVED: Final = 47_774
PICKUP_AND_RETURN: Final = 1_075
POSTAL_TOTAL: Final = 103_114  # 1,075 picked up and returned + 102,039 returned only
SECTOR_LATE_RATES: Final = {CONSTRUCTION: 0.1257, LAND: 0.1090, LABOUR: 0.0143}
# Not in FACTS, chosen here (they move no published figure)
REJECTED_AT_INTAKE: Final = 3_100
WITHDRAWN_EVERY: Final = 7  # one in 7 received-but-unresolved dossiers is withdrawn
ON_TIME_SHARE: Final = 0.22  # of the dossiers resolved in time, those resolved on the due day

Fate = Literal["early", "on_time", "late", "open", "withdrawn", "rejected"]
Channel = Literal["online", "counter", "postal"]
PostalMode = Literal["none", "pickup", "return", "pickup_and_return"]
RESOLVED_FATES: Final = frozenset({"early", "on_time", "late"})


def scaled(figure: int, scale: float) -> int:
    """round(figure x scale), half up, computed in decimal so 0.5 never drifts."""
    value = Decimal(figure) * Decimal(str(scale))
    return int(value.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def round_half_up(value: float) -> int:
    return int(Decimal(str(value)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@dataclass(frozen=True, slots=True)
class NamedTarget:
    named: Named
    online: int
    all: int


@dataclass(frozen=True, slots=True)
class Targets:
    scale: float
    received: int
    resolved: int
    late: int
    online_resolved: int
    pickups: int
    returns: int
    named: tuple[NamedTarget, ...]

    @property
    def early_or_on_time(self) -> int:
        return self.resolved - self.late


def targets(scale: float) -> Targets:
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return Targets(
        scale=scale,
        received=scaled(RECEIVED, scale),
        resolved=scaled(RESOLVED, scale),
        late=scaled(LATE, scale),
        online_resolved=scaled(ONLINE_RESOLVED, scale),
        pickups=scaled(PICKUP_AND_RETURN, scale),
        returns=scaled(POSTAL_TOTAL, scale),
        named=tuple(NamedTarget(n, scaled(n.online, scale), scaled(n.all, scale)) for n in NAMED),
    )


def apportion(total: int, weights: Sequence[float], caps: Sequence[int] | None = None) -> list[int]:
    """Split `total` in proportion to `weights` (largest remainders), none above its cap."""
    caps = list(caps) if caps is not None else [total] * len(weights)
    if total < 0 or total > sum(caps):
        raise ValueError(f"cannot split {total} under caps summing to {sum(caps)}")
    out = [0] * len(weights)
    free = [i for i, w in enumerate(weights) if w > 0 and caps[i] > 0]
    left = total
    while left and free:
        weight = sum(weights[i] for i in free)
        quotas = {i: left * weights[i] / weight for i in free}
        over = [i for i in free if quotas[i] >= caps[i] - out[i]]
        if over:  # fill the capped ones and share again among the rest
            for i in over:
                left -= caps[i] - out[i]
                out[i] = caps[i]
            free = [i for i in free if i not in over]
            continue
        floors = {i: int(quotas[i]) for i in free}
        for i in free:
            out[i] += floors[i]
        rest = left - sum(floors.values())
        by_remainder = sorted(free, key=lambda i: (-(quotas[i] - floors[i]), i))
        for i in by_remainder[:rest]:
            out[i] += 1
        left = 0
    if left:
        raise ValueError(f"{left} left over: weights too narrow for the total")
    return out


@dataclass(frozen=True, slots=True)
class Spec:
    """One dossier's fate and attributes; `lifecycle` turns it into events."""

    agency: Agency
    sector: str
    procedure: Procedure
    channel: Channel
    fate: Fate
    postal_mode: PostalMode = "none"
    denied: bool = False
    supplement: bool = False
    transfer_to: Agency | None = None
    apology: bool = False

    @property
    def resolved(self) -> bool:
        return self.fate in RESOLVED_FATES


@dataclass
class _Draft:
    sector: Sector
    fate: Fate
    online: bool = False
    postal_mode: PostalMode = "none"
    agency: Agency | None = None


def plan(scale: float, seed: int) -> list[Spec]:
    """Every dossier of the half-year at scale `scale`, in a seeded random order."""
    rng = random.Random(seed)
    t = targets(scale)
    sectors = list(REPLAY_SECTORS)
    index = {s.key: i for i, s in enumerate(sectors)}
    named_by_sector = {NAMED_SECTOR[n.named.agency_code]: n for n in t.named}

    # resolved per sector
    size = [0] * len(sectors)
    free = []
    for i, sector in enumerate(sectors):
        if sector.key in named_by_sector:
            size[i] = named_by_sector[sector.key].all
        elif sector.late_rate is not None:
            size[i] = scaled(sector.weight, scale)
        else:
            free.append(i)
    rest = t.resolved - sum(size)
    for i, n in zip(free, apportion(rest, [sectors[i].weight for i in free]), strict=True):
        size[i] = n

    # late per sector
    late = [0] * len(sectors)
    for i, sector in enumerate(sectors):
        if sector.late_rate is not None:
            late[i] = round_half_up(sector.late_rate * size[i])
    excess = sum(late) - t.late
    while excess > 0:  # only at tiny scales: take back from the biggest fixed-rate sector
        biggest = max((i for i, s in enumerate(sectors) if s.late_rate), key=lambda i: late[i])
        late[biggest] -= 1
        excess -= 1
    others = [i for i, s in enumerate(sectors) if s.late_rate is None]
    shares = apportion(
        t.late - sum(late),
        [sectors[i].late_weight * size[i] for i in others],
        [size[i] for i in others],
    )
    for i, n in zip(others, shares, strict=True):
        late[i] = n

    # online among resolved
    online = [0] * len(sectors)
    for sector_key, target in named_by_sector.items():
        online[index[sector_key]] = target.online
    unnamed = [i for i, s in enumerate(sectors) if s.key not in named_by_sector]
    shares = apportion(
        t.online_resolved - sum(online),
        [sectors[i].online_share * size[i] for i in unnamed],
        [size[i] for i in unnamed],
    )
    for i, n in zip(unnamed, shares, strict=True):
        online[i] = n

    drafts: list[_Draft] = []
    for i, sector in enumerate(sectors):
        in_time = size[i] - late[i]
        on_time = int(in_time * ON_TIME_SHARE)
        late_fates: list[Fate] = ["late"] * late[i]
        on_time_fates: list[Fate] = ["on_time"] * on_time
        early_fates: list[Fate] = ["early"] * (in_time - on_time)
        fates = late_fates + on_time_fates + early_fates
        flags = [True] * online[i] + [False] * (size[i] - online[i])
        rng.shuffle(flags)
        drafts.extend(_Draft(sector, fate, flag) for fate, flag in zip(fates, flags, strict=True))

    # postal: pickup-and-return among online resolved dossiers whose sector has a short online
    # procedure (they must fit between 1 and 20 July), return-only among the other resolved
    unnamed_resolved = [d for d in drafts if d.sector.key not in named_by_sector]
    rng.shuffle(unnamed_resolved)
    pickup_ok = [d for d in unnamed_resolved if d.online and _short_online(d.sector)]
    pickups = pickup_ok[: t.pickups]
    if len(pickups) < t.pickups:
        raise ValueError("not enough online dossiers for the postal pickups")
    for d in pickups:
        d.postal_mode = "pickup_and_return"
    returns_only = [d for d in unnamed_resolved if d.postal_mode == "none"][: t.returns - t.pickups]
    for d in returns_only:
        d.postal_mode = "return"

    # received, not resolved in the period; and rejected at intake
    unresolved = t.received - t.resolved
    pool = [s for s in sectors if s.key not in named_by_sector]
    for sector, n in zip(pool, apportion(unresolved, [s.weight for s in pool]), strict=True):
        for k in range(n):
            fate: Fate = "withdrawn" if k % WITHDRAWN_EVERY == WITHDRAWN_EVERY - 1 else "open"
            drafts.append(_Draft(sector, fate, rng.random() < sector.online_share))
    rejected = scaled(REJECTED_AT_INTAKE, scale)
    for sector, n in zip(pool, apportion(rejected, [s.weight for s in pool]), strict=True):
        drafts.extend(_Draft(sector, "rejected", rng.random() < sector.online_share) for _ in
                      range(n))  # fmt: skip

    rng.shuffle(drafts)
    return [_spec(d, rng) for d in drafts]


def _short_online(sector: Sector) -> bool:
    return any(p.level is not None and p.days <= 5 for p in sector.procedures)


def _spec(d: _Draft, rng: random.Random) -> Spec:
    sector = d.sector
    agency = d.agency or _agency(sector, rng)
    procedures = sector.procedures
    if d.postal_mode == "pickup_and_return":
        procedures = tuple(p for p in procedures if p.level is not None and p.days <= 5)
    elif d.online:
        procedures = tuple(p for p in procedures if p.level is not None)
    procedure = rng.choice(procedures)
    channel: Channel = "online" if d.online else ("postal" if rng.random() < 0.03 else "counter")
    transfer_to = None
    if agency.code not in NAMED_SECTOR and d.fate != "rejected" and rng.random() < 0.04:
        choices = [a for a in agencies_for(sector.key, agency.tier) if a.code != agency.code]
        transfer_to = rng.choice(choices) if choices else None
    return Spec(
        agency=agency,
        sector=sector.key,
        procedure=procedure,
        channel=channel,
        fate=d.fate,
        postal_mode=d.postal_mode,
        denied=d.fate in RESOLVED_FATES and rng.random() < 0.02,
        supplement=d.fate != "rejected" and rng.random() < 0.08,
        transfer_to=transfer_to,
        apology=d.fate == "late" and rng.random() < 0.65,
    )


def _agency(sector: Sector, rng: random.Random) -> Agency:
    tiers = [tier for tier, _ in sector.tiers]
    tier = rng.choices(tiers, weights=[share for _, share in sector.tiers])[0]
    return rng.choice(agencies_for(sector.key, tier))


# --- the live stream: fates drawn at random with the same proportions ---------------------------

_LIVE_SECTORS: Final = tuple(s for s in SECTORS)
_LIVE_WEIGHTS: Final = tuple(max(s.weight, 6_000) for s in SECTORS)


def random_spec(rng: random.Random) -> Spec:
    """One dossier for `motcua simulate`: sector by volume (vertical branches included), late
    rate by sector, online by sector share (the named agencies at their own)."""
    sector = rng.choices(_LIVE_SECTORS, weights=_LIVE_WEIGHTS)[0]
    roll = rng.random()
    late_rate = sector.late_rate if sector.late_rate is not None else 0.01
    fate: Fate
    if roll < 0.02:
        fate = "rejected"
    elif roll < 0.05:
        fate = "withdrawn"
    elif rng.random() < late_rate:
        fate = "late"
    else:
        fate = "on_time" if rng.random() < ON_TIME_SHARE else "early"
    named = next((n for n in NAMED if NAMED_SECTOR[n.agency_code] == sector.key), None)
    share = named.online / named.all if named else sector.online_share
    draft = _Draft(SECTOR_BY_KEY[sector.key], fate, rng.random() < share)
    if fate in RESOLVED_FATES:
        postal = rng.random()
        if draft.online and postal < 0.05 and _short_online(sector):
            draft.postal_mode = "pickup_and_return"
        elif postal < 0.35:
            draft.postal_mode = "return"
    return _spec(draft, rng)
