"""Rollups: what retired dossiers still count, as records of the topic `metrics.rollups`. Pure.

A dossier whose story is over leaves the per-dossier state (`domain.retire_after`); what it adds to
the figures stays, summed into a `Fold`: one per retirement step of a partition of the
changelog, written to the same partition number of `topics.METRICS_ROLLUPS` *before* the
tombstones of the dossiers it folds. A fold is never rewritten (its key is unique), so every
metrics process can read the topic whole and add every fold once.

A fold names the states it folds by dossier id and a digest of their changelog bytes
(`state_digest`): a process that reads the fold before the last version of such a state (the
two topics are read side by side) knows to drop that version, and a worker that restores a
partition after a crash between the fold and its tombstones knows which states it already
folded (the last fold of the partition names them).

Record value (JSON): `{"clock": RFC 3339, "rows": [[minute, agency, tier, sector, counter,
value], ...], "folded": {dossier id: digest}}`; key `<partition>:<clock ms>:<digest of the
folded ids>`.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime

import orjson

from services.metrics.domain import COUNTERS, Cell, Deltas

_KNOWN = frozenset(COUNTERS)


class InvalidFold(ValueError):
    """A record of the rollups topic that is no fold."""


def state_digest(raw: bytes) -> str:
    """A short digest of a state's changelog bytes: which version of the state a fold took."""
    return hashlib.blake2b(raw, digest_size=8).hexdigest()


@dataclass(frozen=True)
class Fold:
    """The summed contributions of the dossiers retired in one step of one partition."""

    partition: int
    clock: datetime
    deltas: Deltas
    folded: Mapping[str, str]  # dossier id -> digest of the state's bytes

    @property
    def key(self) -> bytes:
        names = hashlib.blake2b("\n".join(sorted(self.folded)).encode(), digest_size=8).hexdigest()
        return f"{self.partition}:{int(self.clock.timestamp() * 1000)}:{names}".encode()


def fold_of(partition: int, clock: datetime, retired: Iterable[tuple[str, bytes, Deltas]]) -> Fold:
    """The fold of (dossier id, changelog bytes, contributions) of the retiring states."""
    total: Counter[tuple[Cell, str]] = Counter()
    folded: dict[str, str] = {}
    for dossier_id, raw, contributions in retired:
        folded[dossier_id] = state_digest(raw)
        total.update(contributions)
    return Fold(partition, clock, {k: v for k, v in total.items() if v}, folded)


def encode_fold(fold: Fold) -> bytes:
    rows = [
        [cell.minute, cell.agency_code, cell.tier, cell.sector, counter, value]
        for (cell, counter), value in fold.deltas.items()
    ]
    return orjson.dumps({"clock": fold.clock.isoformat(), "rows": rows, "folded": fold.folded})


def decode_fold(partition: int, raw: bytes) -> Fold:
    try:
        body = orjson.loads(raw)
        clock = datetime.fromisoformat(body["clock"])
        deltas: Deltas = {}
        for minute, agency, tier, sector, counter, value in body["rows"]:
            if counter not in _KNOWN or not isinstance(value, int):
                raise InvalidFold(f"unknown counter {counter!r}")
            deltas[Cell(int(minute), str(agency), str(tier), str(sector)), counter] = value
        folded = {str(k): str(v) for k, v in body["folded"].items()}
    except InvalidFold:
        raise
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise InvalidFold(f"not a fold: {type(exc).__name__}") from None
    if clock.utcoffset() is None:
        raise InvalidFold("clock without offset")
    return Fold(partition, clock, deltas, folded)
