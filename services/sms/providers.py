"""Provider weighting (GOV.UK Notify style): pick, fail over, shift weight away. Pure.

A message's first provider is drawn from its idempotency key (`key_point`), not at random: the
same key under the same weights goes to the same gateway, so a message sent again after every
note of the first try was lost (a SIGKILL and an empty Redis) reaches the gateway that replays
it by that key ("replayed") instead of a second gateway that would send a second copy.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class ProviderWeights:
    """Relative weights of the SMS providers (Notify style), and when they last changed."""

    weights: tuple[tuple[str, int], ...]  # sorted by provider name
    changed_at: datetime | None = None

    def __post_init__(self) -> None:
        names = [name for name, _ in self.weights]
        if not names or len(set(names)) != len(names):
            raise ValueError("providers must be named once each, and at least one given")
        if any(weight < 0 for _, weight in self.weights):
            raise ValueError("weights must not be negative")
        if sum(weight for _, weight in self.weights) <= 0:
            raise ValueError("at least one provider needs a positive weight")

    @classmethod
    def of(cls, weights: Mapping[str, int], changed_at: datetime | None = None) -> ProviderWeights:
        return cls(tuple(sorted(weights.items())), changed_at)

    def as_dict(self) -> dict[str, int]:
        return dict(self.weights)


def pick_provider(weights: ProviderWeights, r: float) -> str:
    """The provider for a uniform random `r` in [0, 1): each gets a share equal to its weight."""
    if not 0.0 <= r < 1.0:
        raise ValueError(f"r must be in [0, 1), got {r}")
    total = sum(weight for _, weight in weights.weights)
    point = r * total
    cumulative = 0
    for name, weight in weights.weights:
        cumulative += weight
        if point < cumulative:
            return name
    # Only reachable through float rounding with r just under 1.
    return next(name for name, weight in reversed(weights.weights) if weight > 0)


def key_point(key: str) -> float:
    """A point in [0, 1) drawn from `key` (its SHA-256): uniform over keys, fixed per key."""
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:6], "big") / 2**48  # exact in a float, below 1


def failover_order(weights: ProviderWeights, r: float) -> tuple[str, ...]:
    """The picked provider first, then the others by weight (zero weights last, still tried)."""
    first = pick_provider(weights, r)
    others = sorted(
        (item for item in weights.weights if item[0] != first), key=lambda item: (-item[1], item[0])
    )
    return (first, *(name for name, _ in others))


def shift_weight_away(
    weights: ProviderWeights,
    provider: str,
    now: datetime,
    *,
    step: int = 10,
    floor: int = 10,
    cooldown: timedelta = timedelta(minutes=10),
) -> ProviderWeights:
    """Move up to `step` of weight from a provider that failed or was slow to the others.

    Keeps the total; never takes a provider below `floor` (so it still gets probed and can show
    it recovered); does nothing within `cooldown` of the last change (one slow minute must not
    swing all traffic).
    """
    current = weights.as_dict()
    if provider not in current or len(current) < 2:
        return weights
    if weights.changed_at is not None and now - weights.changed_at < cooldown:
        return weights
    moved = min(step, current[provider] - floor)
    if moved <= 0:
        return weights
    current[provider] -= moved
    others = sorted(name for name in current if name != provider)
    share, remainder = divmod(moved, len(others))
    for index, name in enumerate(others):
        current[name] += share + (1 if index < remainder else 0)
    return ProviderWeights.of(current, changed_at=now)
