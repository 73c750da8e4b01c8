"""The metrics catalogue: agency names for every agency the simulator files with, sector names in
both languages, the online targets per tier and year, and clear errors for a province's bad file."""

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest

from services.metrics.catalogue import (
    CatalogueError,
    load_catalogue,
    parse_agencies,
    parse_sectors,
    parse_targets,
)
from services.metrics.query import MAX_POINTS, buckets, parse_step
from services.metrics.settings import MetricsSettings
from services.simulator.catalog import AGENCIES, SECTORS


def test_the_shipped_catalogue_names_every_agency_and_sector_of_the_simulator() -> None:
    catalogue = load_catalogue()
    assert len(AGENCIES) == 97
    for agency in AGENCIES:
        listed = catalogue.agencies[agency.code]
        assert (listed.name, listed.tier) == (agency.name, agency.tier)
    assert catalogue.agency_name("000.00.05.H34") == "Sở Y tế"
    assert catalogue.agency_name("999.99.99.H34") is None  # shown as its code
    for sector in SECTORS:
        names = catalogue.sectors[sector.key]
        assert names.vi == sector.name and names.en and names.en != sector.key
    communes = [a for a in catalogue.agencies.values() if a.tier == "commune"]
    assert communes and all(
        a.parent and catalogue.agencies[a.parent].tier == "district" for a in communes
    )


def test_targets_per_tier_and_year_fall_back_to_the_latest_year_before() -> None:
    catalogue = load_catalogue()
    assert catalogue.targets_for(2019)["province"] == (0.40, 0.45)
    assert catalogue.targets_for(2026) == catalogue.targets_for(2019)
    assert catalogue.targets_for(2018) == {}
    described = catalogue.described(date(2026, 11, 27))
    assert described["online_targets"]["2019"]["commune"] == [0.20, 0.25]
    assert described["online_targets_now"]["district"] == [0.30, 0.35]
    assert described["agencies"]["000.00.05.H34"]["tier"] == "province"
    assert described["sectors"]["land"] == {"vi": "Đất đai", "en": "Land"}


def test_a_provinces_own_files_replace_the_shipped_ones(tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text(
        "code,name,tier,parent\nX.1,Sở A,province,\nX.2,UBND xã B,commune,X.1\n", encoding="utf-8"
    )
    (tmp_path / "t.toml").write_text("[2025]\ncommune = [0.5, 0.6]\n", encoding="utf-8")
    settings = MetricsSettings(
        agency_catalogue_file=str(tmp_path / "a.csv"), online_targets_file=str(tmp_path / "t.toml")
    )
    catalogue = load_catalogue(*settings.catalogue_paths())
    assert catalogue.agency_name("X.2") == "UBND xã B"
    assert catalogue.agency_name("000.00.05.H34") is None
    assert catalogue.targets_for(2026) == {"commune": (0.5, 0.6)}
    assert catalogue.sectors["land"].en == "Land"  # the shipped sector names


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("code,name\nA,B\n", "missing column"),
        ("code,name,tier,parent\nA,B,galaxy,\n", "tier must be one of"),
        ("code,name,tier,parent\nA,B,province,\nA,C,province,\n", "listed twice"),
        ("code,name,tier,parent\nA,B,commune,Z\n", "unknown parent"),
        ("code,name,tier,parent\nA,,province,\n", "required"),
    ],
)
def test_a_bad_agency_file_says_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(CatalogueError, match=message):
        parse_agencies(text)


def test_bad_sector_and_target_files_say_what_is_wrong() -> None:
    with pytest.raises(CatalogueError, match="missing column"):
        parse_sectors("key,name\nland,Đất đai\n")
    with pytest.raises(CatalogueError, match="not a tier"):
        parse_targets({"2019": {"galaxy": [0.1, 0.2]}})
    with pytest.raises(CatalogueError, match="band"):
        parse_targets({"2019": {"commune": [0.3, 0.2]}})
    with pytest.raises(CatalogueError, match="a year"):
        parse_targets({"soon": {"commune": [0.1, 0.2]}})


def test_a_series_cuts_its_range_into_steps_and_refuses_too_many_points() -> None:
    start = datetime(2019, 3, 1, tzinfo=UTC)
    cut = buckets(start, start + timedelta(days=2, hours=5), "day")
    assert [(a.day, b.day, b.hour) for a, b in cut] == [(1, 2, 0), (2, 3, 0), (3, 3, 5)]
    assert buckets(start, start, "hour") == []
    assert parse_step("day", start, start + timedelta(days=MAX_POINTS)) == ("day", [])
    step, errors = parse_step("hour", start, start + timedelta(days=30))
    assert step is None and errors[0].parameter == "step" and "at most" in errors[0].detail
    step, errors = parse_step("month", start, start + timedelta(days=30))
    assert step is None and "one of" in errors[0].detail
