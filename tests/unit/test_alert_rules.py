"""The alert rules (deploy/prometheus/rules) are tested like code: promtool's unit tests of every
rule (deploy/prometheus/tests: a firing and a quiet case each), every rule over a metric the
services export, a runbook section for every alert, and the same rules in compose's Prometheus
and in the Kubernetes `PrometheusRule`. promtool comes from Debian's `prometheus` package.
"""

from __future__ import annotations

import re
import runpy
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the dev group's yamllint")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMETHEUS = DEPLOY / "prometheus"
RULES = PROMETHEUS / "rules"
RULE_TESTS = PROMETHEUS / "tests"
ALERTMANAGER = DEPLOY / "alertmanager" / "alertmanager.yml"
RUNBOOK = DEPLOY / "README.md"
OVERLAYS = DEPLOY / "k8s" / "overlays"

# Metrics the rules read that motcua does not export, and who does.
FOREIGN_METRICS = {
    "up": "Prometheus, per scraped target",
    "kafka_consumergroup_lag": "kafka-exporter (compose), Strimzi's Kafka Exporter (Kubernetes)",
    "nginx_ingress_controller_ssl_expire_time_seconds": "ingress-nginx (Kubernetes)",
}


@cache
def rules() -> list[dict[str, Any]]:
    return [
        rule
        for path in sorted(RULES.glob("*.yaml"))
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
    ]


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool not found: install Debian's `prometheus` package "
            "(apt-get install -y prometheus; .ci/run does)"
        )
    return found


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    files = sorted(str(path) for path in RULE_TESTS.glob("*.yaml"))
    assert files
    result = subprocess.run(
        [promtool(), "test", "rules", *files], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_rule_is_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS.glob("*.yaml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in rules()}
    assert alerts - firing == set(), "no promtool case where these fire"
    assert alerts - quiet == set(), "no promtool case where these stay quiet"


def test_every_rule_has_a_severity_and_says_what_and_where_to_read_on() -> None:
    names = [rule["alert"] for rule in rules()]
    assert len(names) == len(set(names)), "an alert name is used twice"
    for rule in rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], rule["alert"]
        assert annotations["runbook_url"] == f"deploy/README.md#{rule['alert'].lower()}"


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_every_alert_has_its_runbook_section() -> None:
    anchors = {
        github_anchor(line.lstrip("#"))
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("#")
    }
    missing = [rule["alert"] for rule in rules() if rule["alert"].lower() not in anchors]
    assert missing == [], f"deploy/README.md has no section for {missing}"


def exported_metric_names() -> str:
    """The text of every service module: where a metric is named when it is defined."""
    return "\n".join(path.read_text() for path in (ROOT / "services").rglob("*.py"))


KEYWORDS = {"and", "or", "unless", "offset", "on", "ignoring", "bool"}


def metric_names(expr: str) -> set[str]:
    """The metrics a PromQL expression reads: its identifiers that are neither functions,
    keywords, nor inside label matchers, grouping clauses or ranges."""
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b(?:by|without)\s*\([^)]*\)", " ", expr)
    names = set(re.findall(r"\b([a-zA-Z_:][\w:]*)\b(?!\s*\()", bare))
    return names - KEYWORDS


def test_rules_read_only_metrics_that_exist() -> None:
    source = exported_metric_names()
    named = {name for rule in rules() for name in metric_names(rule["expr"])}
    ours = {name for name in named if name.startswith("motcua_")}
    for name in sorted(ours):
        base = re.sub(r"_(total|bucket|sum|count)$", "", name)
        assert f'"{base}"' in source or f'"{name}"' in source, f"no service exports {name}"
    assert named - ours == set(FOREIGN_METRICS)


def test_the_metric_check_sees_a_name_no_service_exports() -> None:
    assert metric_names(
        'sum by (service) (increase(a_total{x="y"}[5m])) > 0 unless b offset 1h or absent(c)'
    ) == {"a_total", "b", "c"}
    source = exported_metric_names()
    assert '"motcua_sms_failovers_total"' in source
    assert '"motcua_sms_teleported"' not in source


def test_compose_prometheus_loads_the_rules_and_sends_to_the_alertmanager() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["rules/*.yaml"]
    [manager] = config["alerting"]["alertmanagers"]
    assert manager["static_configs"][0]["targets"] == ["alertmanager:9093"]
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    assert "./prometheus/rules:/etc/prometheus/rules:ro" in compose["prometheus"]["volumes"]
    alertmanager = compose["alertmanager"]
    assert re.fullmatch(r"prom/alertmanager:v\d+\.\d+\.\d+", alertmanager["image"])
    assert (
        "./alertmanager/alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro"
        in alertmanager["volumes"]
    )
    assert "ports" not in alertmanager  # no sign-in: inside the network only


def test_alertmanager_sends_every_alert_to_the_webhook_receiver() -> None:
    config = yaml.safe_load(ALERTMANAGER.read_text())
    receivers = {receiver["name"]: receiver for receiver in config["receivers"]}
    route = config["route"]
    routed = {route["receiver"], *(child["receiver"] for child in route.get("routes", []))}
    assert routed <= set(receivers)
    assert receivers[route["receiver"]]["webhook_configs"][0]["send_resolved"] is True
    alerts = {rule["alert"] for rule in rules()}
    for inhibit in config.get("inhibit_rules", []):
        for matcher in inhibit["source_matchers"] + inhibit["target_matchers"]:
            pattern = re.fullmatch(r'alertname=~?"([^"]+)"', matcher)
            assert pattern, matcher
            assert any(re.fullmatch(pattern.group(1), alert) for alert in alerts), matcher


def test_the_kubernetes_prometheus_rule_is_the_rule_files() -> None:
    render = runpy.run_path(str(PROMETHEUS / "render_prometheusrule.py"))["render"]
    assert (PROMETHEUS / "prometheusrule.yaml").read_text() == render(), (
        "deploy/prometheus/prometheusrule.yaml differs from rules/*.yaml: run "
        ".venv/bin/python deploy/prometheus/render_prometheusrule.py"
    )
    rule = yaml.safe_load((PROMETHEUS / "prometheusrule.yaml").read_text())
    assert [r["alert"] for g in rule["spec"]["groups"] for r in g["rules"]] == [
        r["alert"] for r in rules()
    ]


def test_both_overlays_include_the_rules_and_the_alertmanager() -> None:
    for overlay in ("staging", "production"):
        kustomization = yaml.safe_load((OVERLAYS / overlay / "kustomization.yaml").read_text())
        assert {"../../../prometheus", "../../../alertmanager"} <= set(
            kustomization.get("components", [])
        ), overlay
    component = yaml.safe_load((DEPLOY / "alertmanager" / "kustomization.yaml").read_text())
    [secret] = component["secretGenerator"]
    assert secret["name"] == "alertmanager-motcua"  # the operator's name for Alertmanager motcua
    assert secret["files"] == [f"alertmanager.yaml={ALERTMANAGER.name}"]


def test_the_pod_monitors_label_targets_as_the_rules_expect() -> None:
    monitors = {
        doc["metadata"]["name"]: doc
        for doc in yaml.safe_load_all((PROMETHEUS / "podmonitors.yaml").read_text())
    }
    from services.registry import SERVICES

    [services] = monitors["motcua"]["spec"]["selector"]["matchExpressions"]
    assert sorted(services["values"]) == sorted(SERVICES)
    [endpoint] = monitors["motcua"]["spec"]["podMetricsEndpoints"]
    relabel = {r["targetLabel"]: r for r in endpoint["relabelings"]}
    assert relabel["job"]["replacement"] == "motcua"
    assert relabel["service"]["sourceLabels"] == [
        "__meta_kubernetes_pod_label_app_kubernetes_io_name"
    ]
    [exporter] = monitors["motcua-kafka-exporter"]["spec"]["podMetricsEndpoints"]
    assert exporter["relabelings"] == [{"targetLabel": "job", "replacement": "kafka-exporter"}]
    # the services down alert names every service
    [down] = [rule for rule in rules() if rule["alert"] == "MotcuaServiceDown"]
    assert set(re.findall(r'service="([a-z]+)"', down["expr"])) == set(SERVICES)
