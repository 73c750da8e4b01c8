"""What the figures' codes mean to people: agency names, sector names, the online targets.

Three data files, each replaceable by the province's own through a setting (`MetricsSettings`):
- `agencies.csv` (`code,name,tier,parent`): every agency code the events may carry, its
  Vietnamese name, its tier and the code of the agency above it (empty at the top). The file
  shipped lists the simulator's agencies.
- `sectors.csv` (`key,name_vi,name_en`): the `sector` of `dossier.submitted`, in both languages.
- `online_targets.toml`: per year, per tier, the band `[low, high]` the online share of dossiers
  of procedures offered online (`online_rate_eligible`) is compared with.

A code missing from a file is shown as itself: names never decide what is counted.
"""

from __future__ import annotations

import csv
import io
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, get_args

from services.common.events import Tier

HERE = Path(__file__).parent
AGENCIES_FILE = HERE / "agencies.csv"
SECTORS_FILE = HERE / "sectors.csv"
ONLINE_TARGETS_FILE = HERE / "online_targets.toml"
TIERS: tuple[str, ...] = get_args(Tier)


class CatalogueError(ValueError):
    """A catalogue file that does not say what it must."""


@dataclass(frozen=True, slots=True)
class Agency:
    code: str
    name: str
    tier: str
    parent: str | None


@dataclass(frozen=True, slots=True)
class SectorName:
    vi: str
    en: str


Band = tuple[float, float]


@dataclass(frozen=True)
class Catalogue:
    agencies: Mapping[str, Agency]
    sectors: Mapping[str, SectorName]
    targets: Mapping[int, Mapping[str, Band]]  # year -> tier -> band

    def agency_name(self, code: str) -> str | None:
        agency = self.agencies.get(code)
        return agency.name if agency else None

    def targets_for(self, year: int) -> Mapping[str, Band]:
        """The bands of `year`, or of the latest year before it that has some ({} if none)."""
        years = [y for y in self.targets if y <= year]
        return self.targets[max(years)] if years else {}

    def described(self, today: date) -> dict[str, Any]:
        """The catalogue as the dashboard reads it (`/v1/metrics/info`)."""
        return {
            "agencies": {
                a.code: {"name": a.name, "tier": a.tier, "parent": a.parent}
                for a in self.agencies.values()
            },
            "sectors": {key: {"vi": s.vi, "en": s.en} for key, s in self.sectors.items()},
            "online_targets": {
                str(year): {tier: list(band) for tier, band in bands.items()}
                for year, bands in sorted(self.targets.items())
            },
            "online_targets_now": {t: list(b) for t, b in self.targets_for(today.year).items()},
        }


def _rows(text: str, columns: tuple[str, ...], name: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in columns if c not in (reader.fieldnames or ())]
    if missing:
        raise CatalogueError(f"{name}: missing column(s) {', '.join(missing)}")
    rows = []
    for line, row in enumerate(reader, start=2):
        values = {c: (row.get(c) or "").strip() for c in columns}
        if not values[columns[0]] or not values[columns[1]]:
            raise CatalogueError(f"{name} line {line}: {columns[0]} and {columns[1]} are required")
        rows.append(values)
    return rows


def parse_agencies(text: str, name: str = "agencies.csv") -> dict[str, Agency]:
    agencies: dict[str, Agency] = {}
    for row in _rows(text, ("code", "name", "tier", "parent"), name):
        if row["tier"] not in TIERS:
            raise CatalogueError(f"{name}: {row['code']}: tier must be one of {', '.join(TIERS)}")
        if row["code"] in agencies:
            raise CatalogueError(f"{name}: {row['code']} is listed twice")
        agencies[row["code"]] = Agency(row["code"], row["name"], row["tier"], row["parent"] or None)
    unknown = sorted({a.parent for a in agencies.values() if a.parent and a.parent not in agencies})
    if unknown:
        raise CatalogueError(f"{name}: unknown parent(s) {', '.join(unknown)}")
    return agencies


def parse_sectors(text: str, name: str = "sectors.csv") -> dict[str, SectorName]:
    return {
        row["key"]: SectorName(row["name_vi"], row["name_en"] or row["name_vi"])
        for row in _rows(text, ("key", "name_vi", "name_en"), name)
    }


def parse_targets(
    document: Mapping[str, Any], name: str = "online_targets.toml"
) -> dict[int, dict[str, Band]]:
    targets: dict[int, dict[str, Band]] = {}
    for year, bands in document.items():
        if not year.isdigit() or not isinstance(bands, Mapping):
            raise CatalogueError(f"{name}: [{year}] must be a year with a table of tiers")
        into = targets[int(year)] = {}
        for tier, band in bands.items():
            if tier not in TIERS:
                raise CatalogueError(f"{name}: [{year}] {tier}: not a tier")
            if (
                not isinstance(band, list)
                or len(band) != 2
                or not all(isinstance(x, int | float) and 0 <= x <= 1 for x in band)
                or band[0] > band[1]
            ):
                raise CatalogueError(f"{name}: [{year}] {tier}: a band [low, high] within 0-1")
            into[tier] = (float(band[0]), float(band[1]))
    return targets


def load_catalogue(
    agencies: Path | None = None, sectors: Path | None = None, targets: Path | None = None
) -> Catalogue:
    """The catalogue from its files (None: the file shipped with the service)."""
    agencies_path = agencies or AGENCIES_FILE
    sectors_path = sectors or SECTORS_FILE
    targets_path = targets or ONLINE_TARGETS_FILE
    return Catalogue(
        parse_agencies(agencies_path.read_text(encoding="utf-8"), str(agencies_path)),
        parse_sectors(sectors_path.read_text(encoding="utf-8"), str(sectors_path)),
        parse_targets(tomllib.loads(targets_path.read_text(encoding="utf-8")), str(targets_path)),
    )
