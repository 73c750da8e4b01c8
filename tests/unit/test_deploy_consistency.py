"""deploy/ agrees with the code: topics, partitions, compaction, retention, and every settings
variable; and nothing is open that should not be (published ports, Ingress paths, Grafana's
admin, the identity provider's realm).

The expected side is derived from the code, never listed here: `declared_topics()` plus the
changelog and leader topics of every faust app the registered services build, and the variables
of every `BaseSettings` subclass under `services` (tests/support/deploy_inventory.py). Adding a
topic, a table or a setting in code without its manifest makes these tests fail, and the
failure message says what to add. Pure file checks: no Docker, no cluster.
"""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.support.deploy_inventory import load

yaml = pytest.importorskip("yaml", reason="PyYAML comes with the dev group's yamllint")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
BASE = K8S / "base"
OVERLAYS = K8S / "overlays"
COMPOSE = DEPLOY / "compose.yaml"

# Variables holding keys or secrets: they belong in a Secret (k8s) or the secrets env file
# (compose), never in a ConfigMap or in compose.yaml itself.
SECRET_LIKE = re.compile(r"SECRET|PASSWORD|^MOTCUA_PORTALS$|_TOKEN$|_KEY$")


def load_yaml_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def read_env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path}: not KEY=VALUE: {line!r}"
        out[key.strip()] = value
    return out


@cache
def partitions() -> int:
    return int(read_env_file(BASE / "config.env")["MOTCUA_TOPIC_PARTITIONS"])


@pytest.fixture(scope="module")
def inventory() -> dict[str, Any]:
    return load(partitions())


def k8s_name(topic: str) -> str:
    return re.sub(r"[^a-z0-9.-]", "-", topic.lower()).strip("-.")


def expected_topic_config(spec: dict[str, Any]) -> dict[str, Any]:
    config: dict[str, Any] = {"min.insync.replicas": 2}
    if spec["compacted"]:
        config["cleanup.policy"] = "compact"
    else:
        config["cleanup.policy"] = "delete"
        config["retention.ms"] = -1 if spec["retention_ms"] is None else spec["retention_ms"]
    return config


def kafka_topic_yaml(name: str, spec: dict[str, Any]) -> str:
    doc = {
        "apiVersion": "kafka.strimzi.io/v1beta2",
        "kind": "KafkaTopic",
        "metadata": {"name": k8s_name(name), "labels": {"strimzi.io/cluster": "motcua"}},
        "spec": {
            "topicName": name,
            "partitions": spec["partitions"],
            "replicas": 3,
            "config": expected_topic_config(spec),
        },
    }
    dumped: str = yaml.safe_dump(doc, sort_keys=False)
    return f"# {spec['origin']}\n" + dumped


def kafka_topics() -> dict[str, dict[str, Any]]:
    out = {}
    for doc in load_yaml_all(BASE / "topics.yaml"):
        assert doc["kind"] == "KafkaTopic"
        out[doc["spec"].get("topicName", doc["metadata"]["name"])] = doc
    return out


# -- topics ------------------------------------------------------------------------------------


def topic_mismatches(expected: dict[str, Any], declared: dict[str, Any]) -> list[str]:
    """What is wrong between the code's topics and the KafkaTopic resources, as messages."""
    problems = []
    missing = sorted(set(expected) - set(declared))
    stale = sorted(set(declared) - set(expected))
    if missing:
        problems.append(
            "add to deploy/k8s/base/topics.yaml:\n---\n"
            + "---\n".join(kafka_topic_yaml(name, expected[name]) for name in missing)
        )
    if stale:
        problems.append(f"topics.yaml declares topics the code no longer uses: {stale}")
    return problems


def test_every_topic_in_code_has_its_kafka_topic(inventory: dict[str, Any]) -> None:
    problems = topic_mismatches(inventory["topics"], kafka_topics())
    assert not problems, "\n".join(problems)


def test_a_topic_added_in_code_without_its_manifest_is_caught(inventory: dict[str, Any]) -> None:
    """By construction: the same check, with one more topic on the code's side."""
    expected = dict(inventory["topics"])
    expected["permits.events"] = dict(expected["dossier.events"], origin="declared_topics")
    problems = topic_mismatches(expected, kafka_topics())
    assert len(problems) == 1 and "topicName: permits.events" in problems[0]


def test_kafka_topics_have_the_partitions_compaction_and_replication_of_the_code(
    inventory: dict[str, Any],
) -> None:
    declared = kafka_topics()
    for name, spec in inventory["topics"].items():
        doc = declared[name]
        assert doc["metadata"]["name"] == k8s_name(name)
        assert doc["metadata"]["labels"]["strimzi.io/cluster"] == "motcua"
        assert doc["spec"]["partitions"] == spec["partitions"], name
        assert doc["spec"]["replicas"] == 3, name
        config = {k: v for k, v in doc["spec"]["config"].items()}
        assert config == expected_topic_config(spec), name


def test_every_consumed_topic_is_declared(inventory: dict[str, Any]) -> None:
    for service, consumed in inventory["consumed"].items():
        unknown = set(consumed) - set(inventory["topics"])
        assert not unknown, f"{service} consumes undeclared topics {unknown}"


def test_topic_job_in_compose_creates_the_code_topics_with_the_same_settings() -> None:
    """The job runs the code's own `motcua topics`, with the partitions every service uses."""
    compose = yaml.safe_load(COMPOSE.read_text())
    job = compose["services"]["topics"]
    assert job["entrypoint"] == ["motcua"] and job["command"] == ["topics"]
    env = job["environment"]
    assert int(env["MOTCUA_TOPIC_PARTITIONS"]) == partitions()
    assert int(env["MOTCUA_TOPIC_REPLICATION"]) == 3
    for name in ("kafka-1", "kafka-2", "kafka-3"):
        assert job["depends_on"][name]["condition"] == "service_healthy"
    for name in ("intake", "metrics", "payments", "postal", "sms"):
        service = compose["services"][name]
        assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        # faust creates the changelog topics with these, so they too get RF 3 and the same count
        assert int(service["environment"]["MOTCUA_TOPIC_PARTITIONS"]) == partitions()
        assert int(service["environment"]["MOTCUA_TOPIC_REPLICATION"]) == 3


def test_compose_brokers_replicate_three_times_and_need_two_in_sync() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    brokers = [s for n, s in compose["services"].items() if re.fullmatch(r"kafka-\d", n)]
    assert len(brokers) == 3
    for broker in brokers:
        assert broker["image"].startswith("apache/kafka:") and ":latest" not in broker["image"]
        env = broker["environment"]
        assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
        assert env["KAFKA_DEFAULT_REPLICATION_FACTOR"] == "3"
        assert env["KAFKA_MIN_INSYNC_REPLICAS"] == "2"
        assert len(env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")) == 3


def test_strimzi_cluster_is_kraft_with_three_nodes_and_min_isr_two() -> None:
    docs = {d["kind"]: d for d in load_yaml_all(BASE / "kafka.yaml")}
    kafka, pool = docs["Kafka"], docs["KafkaNodePool"]
    assert kafka["metadata"]["annotations"]["strimzi.io/kraft"] == "enabled"
    assert kafka["metadata"]["annotations"]["strimzi.io/node-pools"] == "enabled"
    assert kafka["spec"]["kafka"]["config"]["min.insync.replicas"] == 2
    assert kafka["spec"]["kafka"]["config"]["default.replication.factor"] == 3
    assert pool["spec"]["replicas"] >= 3
    assert set(pool["spec"]["roles"]) == {"controller", "broker"}
    assert "topicOperator" in kafka["spec"]["entityOperator"]
    assert "kafkaExporter" in kafka["spec"]  # consumer lag for the dashboard
    bootstrap = read_env_file(BASE / "config.env")["KAFKA_BOOTSTRAP"]
    assert bootstrap.startswith(f"{kafka['metadata']['name']}-kafka-bootstrap:")


# -- settings ----------------------------------------------------------------------------------


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for item in service.get("env_file", []):
        path = item["path"] if isinstance(item, dict) else item
        path = re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", path)
        env.update(read_env_file(DEPLOY / path))
    env.update({k: str(v) for k, v in (service.get("environment") or {}).items()})
    return env


def test_every_setting_is_set_for_every_compose_service(inventory: dict[str, Any]) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    from services.registry import SANDBOXES, SERVICES

    for name in [*SERVICES, "topics"]:
        env = compose_env(compose["services"][name])
        missing = [v for v in inventory["settings"]["service"] if v not in env]
        assert not missing, f"compose service {name} does not set {missing}"
    for name in SANDBOXES:
        service = compose["services"][name]
        assert service["profiles"] == ["staging"]
        env = compose_env(service)
        wanted = inventory["settings"]["service"] + inventory["settings"]["sandbox"]
        missing = [v for v in wanted if v not in env]
        assert not missing, f"compose sandbox {name} does not set {missing}"


# A value compose must be given (`${NAME:?message}`): no default, so no secret in the text.
REQUIRED_VARIABLE = re.compile(r"\$\{[A-Z_]+:\?[^}]*\}")


def test_compose_keeps_secrets_out_of_its_own_text(inventory: dict[str, Any]) -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    for name, service in compose["services"].items():
        inline = service.get("environment") or {}
        leaked = [
            k
            for k, v in inline.items()
            if SECRET_LIKE.search(k) and not REQUIRED_VARIABLE.fullmatch(str(v))
        ]
        assert not leaked, f"{name}: {leaked} belong in the secrets env file"


def k8s_sources(overlay: str | None) -> tuple[dict[str, str], dict[str, str]]:
    """(ConfigMap data, Secret data) the services of an environment read."""
    config = read_env_file(BASE / "config.env")
    secret_docs = load_yaml_all(BASE / "secret.example.yaml")
    secret = dict(secret_docs[0]["stringData"])
    if overlay is not None:
        directory = OVERLAYS / overlay
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        for generator in kustomization.get("configMapGenerator", []):
            if generator["name"] == "motcua-config":
                assert generator.get("behavior") == "merge"
                for env_file in generator.get("envs", []):
                    extra = read_env_file(directory / env_file)
                    unknown = set(extra) - set(config)
                    assert not unknown, f"{overlay} sets {unknown}, not in base config.env"
                    assert "MOTCUA_TOPIC_PARTITIONS" not in extra, "change it in base, with topics"
                    config.update(extra)
        for generator in kustomization.get("secretGenerator", []):
            if generator["name"] == "motcua-secrets":
                secret = {}
                for env_file in generator.get("envs", []):
                    secret.update(read_env_file(directory / env_file))
    return config, secret


@pytest.mark.parametrize("overlay", [None, "staging", "production"])
def test_every_setting_is_in_the_configmap_or_secret(
    inventory: dict[str, Any], overlay: str | None
) -> None:
    config, secret = k8s_sources(overlay)
    missing = [v for v in inventory["settings"]["service"] if v not in config and v not in secret]
    assert not missing, f"k8s ({overlay or 'base'}): add {missing} to config.env or the Secret"
    in_configmap = [k for k in config if SECRET_LIKE.search(k)]
    assert not in_configmap, f"{in_configmap} belong in the Secret, not the ConfigMap"
    assert not set(config) & set(secret), "a variable is set twice"


def test_staging_sandboxes_get_every_sandbox_setting(inventory: dict[str, Any]) -> None:
    directory = OVERLAYS / "staging"
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    values: dict[str, str] = {}
    for generator in [
        *kustomization.get("configMapGenerator", []),
        *kustomization.get("secretGenerator", []),
    ]:
        if generator["name"].startswith("motcua-sandbox-"):
            for env_file in generator["envs"]:
                values.update(read_env_file(directory / env_file))
    missing = [v for v in inventory["settings"]["sandbox"] if v not in values]
    assert not missing, f"staging sandboxes: add {missing} to sandbox.env or sandbox-secrets.env"
    from services.registry import SANDBOXES

    deployments = {
        d["metadata"]["name"]
        for d in load_yaml_all(directory / "sandboxes.yaml")
        if d["kind"] == "Deployment"
    }
    assert deployments == set(SANDBOXES)


# -- Kubernetes workloads ----------------------------------------------------------------------


def base_docs() -> dict[tuple[str, str], dict[str, Any]]:
    kustomization = yaml.safe_load((BASE / "kustomization.yaml").read_text())
    docs = {}
    for resource in kustomization["resources"]:
        for doc in load_yaml_all(BASE / resource):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    return docs


def test_every_service_has_deployment_probes_pdb_hpa_and_service(
    inventory: dict[str, Any],
) -> None:
    from services.registry import SERVICES

    docs = base_docs()
    config = read_env_file(BASE / "config.env")
    for name, runnable in SERVICES.items():
        deployment = docs[("Deployment", name)]
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == [name]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["resources"]["requests"] and container["resources"]["limits"]
        port_var = runnable.port_setting.upper()
        assert container["ports"][0]["containerPort"] == int(config[port_var])
        refs = [next(iter(e.values()))["name"] for e in container["envFrom"]]
        assert refs == ["motcua-config", "motcua-secrets"]
        assert ("PodDisruptionBudget", name) in docs
        assert ("Service", name) in docs
        hpa = docs[("HorizontalPodAutoscaler", name)]
        if name in inventory["consumed"]:
            # a consumer replica beyond the partition count gets no partition
            assert hpa["spec"]["maxReplicas"] <= partitions(), name


def test_ingress_routes_portals_operators_and_every_webhook() -> None:
    routes = {}
    for (kind, _), doc in base_docs().items():
        if kind != "Ingress":
            continue
        for rule in doc["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                routes[path["path"]] = path["backend"]["service"]["name"]
    assert routes["/v1/events"] == "intake"
    assert routes["/"] == "metrics"
    for partner in ("payments", "postal", "sms"):
        assert routes[f"/v1/webhooks/{partner}"] == partner


def test_kustomizations_list_every_manifest_beside_them() -> None:
    """A manifest file nobody includes is a manifest nobody applies."""
    skipped = {"kustomization.yaml", "secret.example.yaml"}
    for directory in [BASE, *sorted(OVERLAYS.iterdir())]:
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        used = set(kustomization.get("resources", []))
        used |= {p["path"] for p in kustomization.get("patches", [])}
        files = {p.name for p in directory.glob("*.yaml")} - skipped
        assert files <= used, f"{directory}: {sorted(files - used)} not in kustomization.yaml"


# -- nothing open that should not be (CONTRACT section 8) ----------------------------------------

EDGE = DEPLOY / "edge" / "nginx.conf"
REALM = DEPLOY / "keycloak" / "motcua-realm.json"
# What compose may publish on the host, and why: the edge (every operator endpoint behind a token,
# intake behind portal keys, payments' public pages and signed callbacks), Grafana (its sign-in),
# Keycloak (the sign-in itself).
PUBLISHED = {"edge", "grafana", "keycloak"}


def published_ports(service: dict[str, Any]) -> list[int]:
    return [int(str(port).split(":")[-2]) for port in service.get("ports", [])]


def test_compose_publishes_only_doors_with_a_sign_in() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    publishing = {name for name, service in compose["services"].items() if service.get("ports")}
    assert publishing == PUBLISHED, f"{publishing - PUBLISHED} publish a port without sign-in"
    assert published_ports(compose["services"]["grafana"]) == [3000]
    assert compose["services"]["keycloak"]["profiles"] == ["idp"]


def edge_servers() -> dict[int, str]:
    """The edge proxy's servers by the port they listen on, as their text."""
    text = EDGE.read_text()
    servers = {}
    for block in re.split(r"\n\s*server \{", text)[1:]:
        port = re.search(r"listen (\d+);", block)
        assert port, block
        servers[int(port.group(1))] = block
    return servers


def test_the_edge_serves_every_published_port_and_never_prometheus_metrics() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    servers = edge_servers()
    assert sorted(servers) == sorted(published_ports(compose["services"]["edge"]))
    for port, block in servers.items():
        assert "location = /metrics { return 404; }" in block, port
    assert "http://metrics:8000" in servers[8000] and "http://intake:8001" in servers[8001]


def test_prometheus_scrapes_the_services_inside_the_network() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    [motcua] = [job for job in config["scrape_configs"] if job["job_name"] == "motcua"]
    assert motcua["metrics_path"] == "/metrics"
    targets = {(sd["names"][0], sd["port"]) for sd in motcua["dns_sd_configs"]}
    config_env = read_env_file(BASE / "config.env")
    from services.registry import SERVICES

    assert targets == {
        (name, int(config_env[runnable.port_setting.upper()]))
        for name, runnable in SERVICES.items()
    }


def test_grafana_admin_password_has_no_default() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    env = compose["services"]["grafana"]["environment"]
    assert REQUIRED_VARIABLE.fullmatch(env["GF_SECURITY_ADMIN_PASSWORD"])
    assert env["GF_USERS_ALLOW_SIGN_UP"] == "false" and env["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def routed(path: str, rule: dict[str, Any]) -> bool:
    """Whether an Ingress path rule sends `path` to its backend (Exact, or Prefix by segments)."""
    if rule["pathType"] == "Exact":
        return bool(path == rule["path"])
    prefix = rule["path"].rstrip("/")
    return path == prefix or path.startswith(prefix + "/") or prefix == ""


def test_no_ingress_routes_prometheus_metrics() -> None:
    for (kind, name), doc in base_docs().items():
        if kind != "Ingress":
            continue
        for rule in doc["spec"]["rules"]:
            for path in rule["http"]["paths"]:
                for probe in ("/metrics", "/metrics/"):
                    assert not routed(probe, path), f"{name} routes {probe} by {path['path']}"


def test_kubernetes_prometheus_sends_the_scrape_token_every_service_checks() -> None:
    """/metrics is on the port of the APIs in Kubernetes: every service reads the scrape token
    from motcua-secrets (base placeholder, staging's generated value) and the PodMonitor sends
    that key of that Secret, renamed with a generated one (namereference.yaml)."""
    name = "MOTCUA_METRICS_SCRAPE_TOKEN"
    for overlay in (None, "staging", "production"):
        _, secret = k8s_sources(overlay)
        assert secret.get(name), f"k8s ({overlay or 'base'}): {name} not in the Secret"
    [monitor] = [
        d
        for d in load_yaml_all(DEPLOY / "prometheus" / "podmonitors.yaml")
        if d["metadata"]["name"] == "motcua"
    ]
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["authorization"] == {
        "type": "Bearer",
        "credentials": {"name": "motcua-secrets", "key": name},
    }
    component = yaml.safe_load((DEPLOY / "prometheus" / "kustomization.yaml").read_text())
    assert component["configurations"] == ["namereference.yaml"]


def test_the_ingress_check_catches_a_catch_all_route() -> None:
    assert routed("/metrics", {"path": "/", "pathType": "Prefix"})
    assert not routed("/metrics", {"path": "/", "pathType": "Exact"})
    assert not routed("/metrics", {"path": "/v1/metrics", "pathType": "Prefix"})


def test_operators_ingress_routes_the_dashboard_its_sign_in_and_the_operator_apis() -> None:
    [rule] = base_docs()[("Ingress", "motcua-operators")]["spec"]["rules"]
    for probe, backend in [
        ("/", "metrics"),
        ("/auth/callback", "metrics"),
        ("/auth/config", "metrics"),
        ("/static/dashboard.js", "metrics"),
        ("/v1/metrics/summary", "metrics"),
        ("/v1/payments/D-1", "payments"),
    ]:
        matching = [path for path in rule["http"]["paths"] if routed(probe, path)]
        assert matching, f"motcua-operators does not route {probe}"
        longest = max(matching, key=lambda path: len(path["path"]))
        assert longest["backend"]["service"]["name"] == backend, probe


# -- every public URL routed, no operator path public (from the code's own route tables) ----------

# The operational endpoints every service has (services/common/service.py): never routed from
# outside (Prometheus scrapes /metrics inside; /docs and /openapi.json are read on the pods).
OPERATIONAL = {
    *("/healthz", "/readyz", "/metrics"),
    *("/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"),
}
# The operators' console: the dashboard and its sign-in (which sign operators in themselves) and
# the metrics API. It serves nothing to the public; the operators' Ingress routes it.
CONSOLE = {"metrics"}


def probe(template: str) -> str:
    """A concrete path of a route template, every `{parameter}` filled in."""
    return re.sub(r"\{[^}]+\}", "x1", template)


def code_routes(inventory: dict[str, Any]) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """(public, operator) routes of the services' own apps, as (service, path template): a route
    is an operator's when it declares the operators' bearer scheme (CONTRACT section 8)."""
    public, operator = set(), set()
    for service, routes in inventory["routes"].items():
        for route in routes:
            if route["path"] in OPERATIONAL:
                continue
            if route["operator"]:
                operator.add((service, route["path"]))
            elif service not in CONSOLE:
                public.add((service, route["path"]))
    return public, operator


def ingress_backend(name: str, path: str) -> str | None:
    """The service Ingress `name` sends `path` to (an Exact rule first, else the longest
    Prefix), or None when it does not route it."""
    [rule] = base_docs()[("Ingress", name)]["spec"]["rules"]
    matching = [p for p in rule["http"]["paths"] if routed(path, p)]
    if not matching:
        return None
    best = max(matching, key=lambda p: (p["pathType"] == "Exact", len(p["path"])))
    return str(best["backend"]["service"]["name"])


def edge_backend(block: str, path: str) -> str | None:
    """The service an edge server passes `path` to (nginx: an exact location first, else the
    longest prefix), or None when it refuses it or has no location for it."""
    exact: dict[str, str | None] = {}
    prefix: dict[str, str | None] = {}
    for where, body in re.findall(r"location\s+((?:=\s+)?\S+)\s*\{([^}]*)\}", block):
        upstream = re.search(r"http://([a-z0-9-]+):\d+", body)
        target = upstream.group(1) if upstream and "proxy_pass" in body else None
        if where.startswith("="):
            exact[where[1:].strip()] = target
        else:
            prefix[where] = target
    if path in exact:
        return exact[path]
    longest = max((p for p in prefix if path.startswith(p)), key=len, default=None)
    return None if longest is None else prefix[longest]


def test_every_public_path_is_routed_by_the_public_ingress_and_the_compose_edge(
    inventory: dict[str, Any],
) -> None:
    public, _ = code_routes(inventory)
    templates = {path for _, path in public}
    # what the services hand out or accept from outside is in the route table as public
    assert {"/v1/events", "/pay/{txn_ref}", "/v1/payments/return"} <= templates
    assert {f"/v1/webhooks/{p}/{{" for p in ("payments", "postal", "sms")} <= {
        t[: t.index("{") + 1] for t in templates if "{" in t
    }
    servers = edge_servers()
    for service, template in sorted(public):
        path = probe(template)
        backend = ingress_backend("motcua-public", path)
        assert backend == service, f"motcua-public sends {template} to {backend}, not {service}"
        on_edge = {port for port, block in servers.items() if edge_backend(block, path) == service}
        assert on_edge, f"deploy/edge/nginx.conf passes {template} to {service} on no port"


def test_no_operator_path_is_public_and_operators_reach_every_one(
    inventory: dict[str, Any],
) -> None:
    public, operator = code_routes(inventory)
    assert ("payments", "/v1/admin/reconciliations") in operator
    edge = edge_servers()[8000]
    for service, template in sorted(operator):
        path = probe(template)
        # the public Ingress may pass an operator's path to another service only, which has no
        # such route (portals' `/v1/dossiers/{id}` prefix and intake's `.../personal-data`)
        backend = ingress_backend("motcua-public", path)
        assert backend != service, f"{template} is public"
        assert backend is None or all(
            re.fullmatch(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(t)), path) is None
            for s, t in public | operator
            if s == backend
        ), f"{template} is public: {backend} serves it"
        assert ingress_backend("motcua-operators", path) == service, template
        assert edge_backend(edge, path) == service, f"the edge's 8000 misses {template}"


def test_the_links_the_services_hand_out_lead_to_public_routes(inventory: dict[str, Any]) -> None:
    """The payment link of the SMS, the gateways' return page and notify address."""
    from urllib.parse import urlsplit

    from services.payments.ledger import short_url
    from services.payments.partner import notify_url
    from services.payments.settings import PaymentsSettings

    public, _ = code_routes(inventory)
    patterns = {
        (service, re.compile(re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(t)) + "$"))
        for service, t in public
    }
    handed_out = [
        short_url("https://pay.example.gov.vn", "0000012H3419030400014E5B1F0A2C"),
        PaymentsSettings().return_url,
        notify_url("https://pay.example.gov.vn", "jsonpay"),
    ]
    for url in handed_out:
        path = urlsplit(url).path
        assert any(pattern.match(path) for _, pattern in patterns), f"{url}: no public route"
        assert ingress_backend("motcua-public", path) == "payments", url


def test_the_route_checks_see_a_missing_or_leaking_route() -> None:
    edge = """
        location = /metrics { return 404; }
        location /pay/ {
            set $payments http://payments:8002;
            proxy_pass $payments;
        }
        location / { return 404; }
    """
    assert edge_backend(edge, "/pay/x1") == "payments"
    assert edge_backend(edge, "/v1/payments/x1") is None
    assert edge_backend(edge, "/metrics") is None
    assert probe("/v1/webhooks/sms/{provider}") == "/v1/webhooks/sms/x1"
    assert ingress_backend("motcua-public", "/v1/payments/x1") is None  # the lookup is not public
    assert ingress_backend("motcua-public", "/pay/x1") == "payments"


def test_keycloak_realm_gives_the_tokens_motcua_checks() -> None:
    from services.common.operators import Role

    realm = json.loads(REALM.read_text())
    compose = yaml.safe_load(COMPOSE.read_text())
    env = compose["services"]["metrics"]["environment"]
    config = read_env_file(BASE / "config.env")
    assert realm["realm"] == "motcua"
    assert {role["name"] for role in realm["roles"]["realm"]} == {role.value for role in Role}

    [client] = realm["clients"]
    assert client["clientId"] == "motcua-dashboard" == config["METRICS_DASHBOARD_CLIENT_ID"]
    assert env["METRICS_DASHBOARD_CLIENT_ID"] == "${METRICS_DASHBOARD_CLIENT_ID:-motcua-dashboard}"
    assert client["publicClient"] is True and client["standardFlowEnabled"] is True
    assert client["implicitFlowEnabled"] is False and client["directAccessGrantsEnabled"] is False
    assert client["attributes"]["pkce.code.challenge.method"] == "S256"
    # Keycloak replaces ${VAR:default} from its environment when it imports the realm on start
    assert client["redirectUris"] == ["${MOTCUA_DASHBOARD_URL:http://localhost:8000}/auth/callback"]
    assert client["attributes"]["post.logout.redirect.uris"] == (
        "${MOTCUA_DASHBOARD_URL:http://localhost:8000}/*"
    )

    mappers = {m["protocolMapper"]: m["config"] for m in client["protocolMappers"]}
    audience = mappers["oidc-audience-mapper"]
    assert audience["included.custom.audience"] == config["MOTCUA_OIDC_AUDIENCE"] == "motcua"
    assert audience["access.token.claim"] == "true"
    roles = mappers["oidc-usermodel-realm-role-mapper"]
    assert (roles["claim.name"], roles["multivalued"], roles["access.token.claim"]) == (
        "roles",
        "true",
        "true",
    )
    agencies = mappers["oidc-usermodel-attribute-mapper"]
    assert (agencies["user.attribute"], agencies["claim.name"], agencies["multivalued"]) == (
        "agencies",
        "agencies",
        "true",
    )
    [provider] = realm["components"]["org.keycloak.userprofile.UserProfileProvider"]
    profile = json.loads(provider["config"]["kc.user.profile.config"][0])
    [attribute] = [a for a in profile["attributes"] if a["name"] == "agencies"]
    assert attribute["multivalued"] is True and attribute["permissions"]["edit"] == ["admin"]


def test_compose_services_trust_the_keycloak_of_the_idp_profile() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    keycloak = compose["services"]["keycloak"]
    hostname = re.fullmatch(
        r"\$\{MOTCUA_IDP_URL:-([^}]+)\}", keycloak["environment"]["KC_HOSTNAME"]
    )
    assert hostname
    issuer = compose["services"]["metrics"]["environment"]["MOTCUA_OIDC_ISSUER"]
    assert issuer == f"${{MOTCUA_OIDC_ISSUER:-{hostname.group(1)}/realms/motcua}}"
    host = hostname.group(1).split("//", 1)[1].split(":")[0]
    assert host in keycloak["networks"]["default"]["aliases"]  # the containers reach it too
    assert host.endswith(".localhost")  # and so does a browser on this host
    assert published_ports(keycloak) == [int(hostname.group(1).rsplit(":", 1)[1])]
    assert "/opt/keycloak/data/import/motcua-realm.json" in " ".join(keycloak["volumes"])
    assert "--import-realm" in keycloak["command"]


def test_the_keycloak_component_is_the_issuer_the_services_trust() -> None:
    """Staging runs deploy/keycloak (a Kustomize component): the services' issuer is its host's
    realm, the imported realm redirects to the operators' host, and the realm file is the one
    compose imports."""
    kustomization = yaml.safe_load((DEPLOY / "keycloak" / "kustomization.yaml").read_text())
    assert kustomization["kind"] == "Component"
    [realm_files] = [g["files"] for g in kustomization["configMapGenerator"] if "files" in g]
    assert realm_files == [REALM.name]
    staging = OVERLAYS / "staging"
    assert (
        "../../../keycloak"
        in yaml.safe_load((staging / "kustomization.yaml").read_text())["components"]
    )
    config = yaml.safe_load((staging / "keycloak-config.yaml").read_text())["data"]
    issuer = read_env_file(staging / "config.env")["MOTCUA_OIDC_ISSUER"]
    assert issuer == f"{config['KC_HOSTNAME']}/realms/motcua"
    identity_host = [
        op["value"]
        for op in yaml.safe_load((staging / "ingress-identity-host.yaml").read_text())
        if op["path"] == "/spec/rules/0/host"
    ]
    assert [f"https://{host}" for host in identity_host] == [config["KC_HOSTNAME"]]
    operators_host = [
        op["value"]
        for op in yaml.safe_load((staging / "ingress-operators-host.yaml").read_text())
        if op["path"] == "/spec/rules/0/host"
    ]
    assert [f"https://{host}" for host in operators_host] == [config["MOTCUA_DASHBOARD_URL"]]
    resources = list(yaml.safe_load_all((DEPLOY / "keycloak" / "keycloak.yaml").read_text()))
    [deployment] = [r for r in resources if r["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert "--import-realm" in container["args"]
    assert [m["mountPath"] for m in container["volumeMounts"]] == ["/opt/keycloak/data/import"]
    compose = yaml.safe_load(COMPOSE.read_text())
    assert container["image"] == compose["services"]["keycloak"]["image"]
