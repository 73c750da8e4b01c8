"""`motcua dev --scale SERVICE=N`: which extra processes run, where they listen (CONTRACT 11)."""

from __future__ import annotations

import itertools

import pytest

from services.dev.devstack import EXTRA_PORTS, MAX_SCALE, extra_processes, parse_scale
from services.registry import SERVICES


def test_scale_options_become_counts_per_service() -> None:
    assert parse_scale([]) == {}
    assert parse_scale(["metrics=2", "sms=3"]) == {"metrics": 2, "sms": 3}


@pytest.mark.parametrize(
    ("value", "names"),
    [
        ("metrics", "SERVICE=N"),
        ("galaxy=2", "SERVICE one of"),
        ("metrics=0", "from 1 to 10"),
        ("metrics=two", "from 1 to 10"),
        ("metrics=11", "from 1 to 10"),
    ],
)
def test_a_wrong_scale_option_says_what_is_wrong(value: str, names: str) -> None:
    with pytest.raises(ValueError, match=names):
        parse_scale([value])


def test_extra_metrics_processes_listen_on_8100_and_up() -> None:
    specs = extra_processes(SERVICES["metrics"], 3)
    assert [(s.name, s.port, s.env) for s in specs] == [
        ("metrics-2", 8100, {"METRICS_PORT": "8100"}),
        ("metrics-3", 8101, {"METRICS_PORT": "8101"}),
    ]
    assert specs[0].command[-2:] == ["run", "metrics"]
    assert extra_processes(SERVICES["sms"], 1) == []
    # no two services' extra ports meet below the scale limit
    starts = sorted(EXTRA_PORTS.values())
    assert all(b - a >= MAX_SCALE for a, b in itertools.pairwise(starts))
