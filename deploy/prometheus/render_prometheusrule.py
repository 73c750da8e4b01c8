"""Write prometheusrule.yaml: the rule files as a Kubernetes `PrometheusRule` (Prometheus Operator).

    .venv/bin/python deploy/prometheus/render_prometheusrule.py

The rules are written once, in rules/*.yaml (what compose's Prometheus loads and promtool tests);
this copies their groups, in file order, into the resource. tests/unit/test_alert_rules.py fails
when the two differ.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RULES = HERE / "rules"
OUTPUT = HERE / "prometheusrule.yaml"
HEADER = (
    "# Generated from rules/*.yaml by render_prometheusrule.py: edit the rule files, then run\n"
    "#   .venv/bin/python deploy/prometheus/render_prometheusrule.py\n"
    "# yamllint disable rule:line-length\n"
)


def rule_groups() -> list[dict[str, Any]]:
    """Every group of every rule file, files in name order."""
    groups: list[dict[str, Any]] = []
    for path in sorted(RULES.glob("*.yaml")):
        groups += yaml.safe_load(path.read_text())["groups"]
    return groups


def prometheus_rule() -> dict[str, Any]:
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "motcua", "labels": {"app.kubernetes.io/name": "motcua-alerts"}},
        "spec": {"groups": rule_groups()},
    }


class _Literal(yaml.SafeDumper):
    """Multi-line strings (the expressions) as literal blocks, as in the rule files."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Literal.add_representer(str, _str)


def render() -> str:
    body = yaml.dump(prometheus_rule(), Dumper=_Literal, sort_keys=False, width=1000)
    return HEADER + body


if __name__ == "__main__":
    OUTPUT.write_text(render())
    sys.stdout.write(f"wrote {OUTPUT}\n")
