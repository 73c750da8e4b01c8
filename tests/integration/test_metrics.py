"""The metrics service end to end: an oracle stream through the real broker and `motcua run
metrics`, checked to the unit before and after a SIGKILL; operators' tokens from the dev issuer
(CONTRACT section 8) on every API call; then the dashboard in real Chromium, signed in through the
dev issuer's authorize page.

The expected figures are recounted in the test from the same events (`naive_summary`, which knows
nothing of the service's store), for the whole span, odd ranges and filters, and per group; a
scoped operator's against the reference store (`tests/support/aggregate_oracle.py`) restricted to
its agencies.
"""

from __future__ import annotations

import asyncio
import csv
import io
import os
import random
import signal
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from services.common.events import CloudEvent
from services.common.kafka import ensure_topics
from services.common.topics import declared_topics
from services.dev.embedded import Broker, free_port
from services.metrics.domain import (
    RUNNING_STATUSES,
    Dimension,
    Event,
    event_from_envelope,
    new_state,
    summary_of,
)
from services.metrics.domain import apply_all as fold
from tests.support.kafka import read_all
from tests.support.metrics_stream import SECTORS, TIERS, stream
from tests.support.operators import Issuer
from tests.support.processes import ROOT, motcua
from tests.unit.test_metrics_domain import naive_summary
from tests.unit.test_metrics_scope import scoped_breakdown, scoped_counters
from tests.unit.test_metrics_store import run as oracle_run

DOSSIERS = 2500
WHOLE = ("2019-02-01T00:00:00+07:00", "2019-07-01T00:00:00+07:00")
RANGES = [
    WHOLE,
    ("2019-03-10T10:17:00+07:00", "2019-03-20T15:43:00Z"),
    ("2019-03-05T00:00:00+07:00", "2019-03-12T00:00:00+07:00"),
    ("2019-03-31T23:59:00+07:00", "2019-04-02T08:01:30+07:00"),
]


async def produce(bootstrap: str, events: list[CloudEvent[Any]]) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    await producer.start()
    try:
        futures = [
            await producer.send(event.topic, value=event.to_json(), key=event.key)
            for event in events
        ]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def domain(events: list[CloudEvent[Any]]) -> list[Event]:
    return [event_from_envelope(event.to_dict()) for event in events]


def expected_cases(events: list[Event]) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """(path, query, expected body) for summaries and breakdowns."""
    agency = next(e.data["agency_code"] for e in events if e.type == "dossier.submitted")
    cases = []
    for start, end in RANGES:
        a, b = datetime.fromisoformat(start), datetime.fromisoformat(end)
        query = {"from": start, "to": end}
        cases.append(("summary", query, naive_summary(events, a, b)))
        for filters in ({"tier": "district"}, {"sector": "land", "tier": "commune"},
                        {"agency_code": agency}):  # fmt: skip
            cases.append(("summary", {**query, **filters}, naive_summary(events, a, b, **filters)))
    a, b = (datetime.fromisoformat(x) for x in RANGES[1])
    agencies = {e.data.get("agency_code") for e in events} | {
        e.data.get("to_agency_code") for e in events
    }
    values = {
        "tier": (*TIERS, "unknown"),
        "sector": (*SECTORS, "unknown"),
        "agency_code": tuple(sorted(v for v in agencies if v)),
    }
    for by, names in values.items():
        for start, end in (WHOLE, RANGES[1]):
            a, b = datetime.fromisoformat(start), datetime.fromisoformat(end)
            groups = {name: naive_summary(events, a, b, **{by: name})["dossiers"] for name in names}
            cases.append(("breakdown", {"from": start, "to": end, "by": by}, groups))
    return cases


def mismatches(
    port: int, cases: list[tuple[str, dict[str, str], dict[str, Any]]], headers: dict[str, str]
) -> list[str]:
    out = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10, headers=headers) as client:
        for path, query, expected in cases:
            response = client.get(f"/v1/metrics/{path}", params=query)
            assert response.status_code == 200, response.text
            body = response.json()
            if path == "breakdown":
                got = {group[query["by"]]: group["dossiers"] for group in body["groups"]}
                zero = naive_summary([], datetime.fromisoformat(WHOLE[0]),
                                     datetime.fromisoformat(WHOLE[1]))["dossiers"]  # fmt: skip
                if set(got) - set(expected):
                    out.append(f"{query}: unexpected groups {set(got) - set(expected)}")
                for name, block in expected.items():
                    if got.get(name, zero) != block:
                        out.append(f"{query} {name}: {got.get(name)} != {block}")
            else:
                expected = {**expected, "from": body["from"], "to": body["to"]}
                if body != expected:
                    out.append(f"{query}: {body} != {expected}")
    return out


def wait_match(
    port: int, cases: list[tuple[str, dict[str, str], dict[str, Any]]], headers: dict[str, str]
) -> None:
    # Generous: after a SIGKILL the group waits out the dead member's session, then the table
    # recovers and the store is rebuilt; on a loaded 2-core machine that took over 60 s once.
    deadline = time.monotonic() + 150
    while True:
        wrong = mismatches(port, cases, headers)
        if not wrong:
            return
        if time.monotonic() > deadline:
            raise AssertionError("\n".join(wrong[:5]))
        time.sleep(0.5)


@dataclass
class Run:
    port: int
    env: dict[str, str]
    events: list[CloudEvent[Any]]
    headers: dict[str, str]  # a viewer's bearer token, every agency


@pytest.fixture(scope="module")
def metrics_run(broker: Broker, issuer: Issuer) -> Iterator[Run]:
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    rng = random.Random(66)
    lifecycles = list(stream(DOSSIERS, seed=66))
    part1: list[CloudEvent[Any]] = []
    part2: list[CloudEvent[Any]] = []
    for i, events in enumerate(lifecycles):
        cut = len(events) if i < DOSSIERS // 2 else rng.randint(0, len(events))
        part1.extend(events[:cut])
        part2.extend(events[cut:])
    redelivered = rng.sample(part1, 600)
    port = free_port()
    env = {
        "KAFKA_BOOTSTRAP": broker.bootstrap,
        "MOTCUA_TOPIC_PARTITIONS": "4",
        "METRICS_PORT": str(port),
        "METRICS_OVERDUE_CLOCK": "watermark",
        "METRICS_OVERDUE_INTERVAL_SECONDS": "0.5",
        "METRICS_DASHBOARD_REFRESH_SECONDS": "2",
        "MOTCUA_DATA_DIR": tempfile.mkdtemp(prefix="motcua-metrics-test-"),
        "MOTCUA_OIDC_ISSUER": issuer.url,
    }
    headers = issuer.headers("viewer")
    with motcua("metrics", env, port, log_name="metrics-oracle") as worker:
        asyncio.run(produce(broker.bootstrap, part1))
        wait_match(port, expected_cases(domain(part1)), headers)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait()
    everything = part1 + part2
    asyncio.run(produce(broker.bootstrap, part2 + redelivered))
    with motcua("metrics", env, port, log_name="metrics-oracle-restarted"):
        yield Run(port, env, everything, headers)


def test_every_figure_matches_the_oracle_before_and_after_a_sigkill(metrics_run: Run) -> None:
    # before the SIGKILL was checked by the fixture (part one); now all of it, redeliveries too
    wait_match(metrics_run.port, expected_cases(domain(metrics_run.events)), metrics_run.headers)


def test_one_overdue_event_per_dossier_whose_due_date_passed(
    metrics_run: Run, broker: Broker
) -> None:
    events = domain(metrics_run.events)
    watermark = max(event.time for event in events)
    by_dossier: dict[str, list[Event]] = {}
    for event in events:
        by_dossier.setdefault(event.subject, []).append(event)
    must = set()
    for dossier_id, own in by_dossier.items():
        state, _ = fold(new_state(dossier_id), own)
        # open, not waiting for documents, and due (after the clock's pauses) before the end
        if state.status in RUNNING_STATUSES and state.due_at and state.due_at < watermark:
            must.add(dossier_id)
    assert must
    deadline = time.monotonic() + 30
    while True:
        records = asyncio.run(read_all(broker.bootstrap, "dossier.events", timeout=30, idle=2))
        overdue = [orjson.loads(r.value) for r in records]
        overdue = [e for e in overdue if e["type"] == "dossier.overdue"]
        ids: dict[str, set[str]] = {}
        dues: dict[str, set[datetime]] = {}
        for event in overdue:
            assert event["source"] == "motcua/metrics"
            ids.setdefault(event["subject"], set()).add(event["id"])
            dues.setdefault(event["subject"], set()).add(
                datetime.fromisoformat(event["data"]["due_at"])
            )
        if must <= set(ids) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert must <= set(ids)
    # one per dossier and due date, ever (a clock that paused runs to a new due date)
    assert all(len(ids[subject]) == len(dues[subject]) for subject in ids)


def test_bad_parameters_are_problem_details(metrics_run: Run) -> None:
    base = f"http://127.0.0.1:{metrics_run.port}"
    for query in (
        {"window": "2d"},
        {"from": "yesterday"},
        {"from": "2019-03-01T00:00:00"},
        {"window": "1h", "from": "2019-03-01T00:00:00Z"},
        {"from": "2019-04-01T00:00:00Z", "to": "2019-03-01T00:00:00Z"},
        {"tier": "galaxy"},
    ):
        headers = metrics_run.headers
        response = httpx.get(f"{base}/v1/metrics/summary", params=query, headers=headers)
        assert response.status_code == 422, query
        assert response.headers["content-type"].startswith("application/problem+json")
        assert response.json()["status"] == 422 and response.json()["errors"]
    response = httpx.get(
        f"{base}/v1/metrics/breakdown", params={"by": "colour"}, headers=metrics_run.headers
    )
    assert response.status_code == 422
    for query in ({"step": "month"}, {"step": "hour", "from": WHOLE[0], "to": WHOLE[1]}, {}):
        response = httpx.get(f"{base}/v1/metrics/series", params=query, headers=metrics_run.headers)
        assert response.status_code == 422, query
        assert response.json()["errors"][0]["parameter"] == "step"
    window = httpx.get(
        f"{base}/v1/metrics/summary", params={"window": "24h"}, headers=metrics_run.headers
    ).json()
    assert window["dossiers"]["received"] == 0  # 2019 data, nothing in the last 24 hours
    metrics = httpx.get(f"{base}/metrics").text
    assert 'motcua_dossiers_resolved_total{class="late"' in metrics


OPERATOR_PATHS = ("/v1/metrics/summary", "/v1/metrics/breakdown?by=tier", "/v1/metrics/info")


def test_the_api_needs_a_viewers_token(metrics_run: Run, issuer: Issuer) -> None:
    base = f"http://127.0.0.1:{metrics_run.port}"
    refused = {
        "no token": {},
        "not a JWT": {"Authorization": "Bearer not-a-token"},
        "a portal key": {"X-Portal-Key": "dev-portal-key"},
        "another scheme": {"Authorization": f"Basic {issuer.token('viewer')}"},
        "another audience": {
            "Authorization": f"Bearer {issuer.token('viewer', audience='someone-else')}"
        },
        "expired": {"Authorization": f"Bearer {issuer.token('viewer', expires_in=-120)}"},
    }
    for path in OPERATOR_PATHS:
        for name, headers in refused.items():
            response = httpx.get(base + path, headers=headers)
            assert response.status_code == 401, (path, name, response.text)
            assert response.headers["www-authenticate"].startswith("Bearer"), (path, name)
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["status"] == 401
        no_role = httpx.get(base + path, headers=issuer.headers("auditor"))
        assert no_role.status_code == 403, (path, no_role.text)
        assert no_role.headers["content-type"].startswith("application/problem+json")
        assert no_role.json()["status"] == 403
        for role in ("viewer", "finance", "admin"):
            assert httpx.get(base + path, headers=issuer.headers(role)).status_code == 200, role
    for path in ("/healthz", "/readyz", "/", "/auth/config"):
        assert httpx.get(base + path).status_code == 200, path
    config = httpx.get(base + "/auth/config").json()
    assert config["issuer"] == issuer.url
    assert config["authorization_endpoint"] == f"{issuer.url}/authorize"
    assert config["client_id"]
    assert "motcua_dossiers_resolved_total" in httpx.get(f"{base}/metrics").text
    me = httpx.get(base + "/v1/metrics/info", headers=issuer.headers("finance", sub="thu")).json()
    assert me["operator"] == {"sub": "thu", "roles": ["finance"], "role": "finance",
                              "agencies": None}  # fmt: skip


def scoped_expectations(
    events: list[Event], scope: frozenset[str]
) -> list[tuple[str, dict[str, str], dict[str, Any]]]:
    """(path, query, expected body) for an operator scoped to `scope`, from the reference store
    asked one agency at a time."""
    _, reference = oracle_run(events)
    outside = next(iter(sorted({e.data["agency_code"] for e in events
                                if e.data.get("agency_code")} - scope)))  # fmt: skip
    cases: list[tuple[str, dict[str, str], dict[str, Any]]] = []
    for start, end in RANGES[:2]:
        a, b = datetime.fromisoformat(start), datetime.fromisoformat(end)
        query = {"from": start, "to": end}
        for filters in ({}, {"tier": "district"}, {"agency_code": sorted(scope)[0]},
                        {"agency_code": outside}):  # fmt: skip
            counts = scoped_counters(reference, scope, a, b, filters)
            cases.append(("summary", {**query, **filters}, summary_of(counts, a, b)))
        by: Dimension
        for by in ("agency_code", "tier", "sector"):
            groups = scoped_breakdown(reference, by, scope, a, b)
            cases.append(("breakdown", {**query, "by": by}, groups))
    return cases


def test_a_scoped_viewer_sees_only_its_agencies(metrics_run: Run, issuer: Issuer) -> None:
    events = domain(metrics_run.events)
    wait_match(metrics_run.port, expected_cases(events), metrics_run.headers)  # all consumed
    codes = sorted({e.data["agency_code"] for e in events if e.type == "dossier.received"})
    scope = frozenset(codes[:2])
    headers = issuer.headers("viewer", agencies=sorted(scope))
    base = f"http://127.0.0.1:{metrics_run.port}"
    cases = scoped_expectations(events, scope)
    for path, query, expected in cases:
        response = httpx.get(f"{base}/v1/metrics/{path}", params=query, headers=headers)
        assert response.status_code == 200, response.text
        body = response.json()
        if path == "breakdown":
            got = {group[query["by"]]: group["dossiers"] for group in body["groups"]}
            assert got == expected, query
            if query["by"] == "agency_code":
                assert set(got) <= scope and got
        else:
            assert body == {**expected, "from": body["from"], "to": body["to"]}, query
    whole = {"from": WHOLE[0], "to": WHOLE[1]}
    summary = f"{base}/v1/metrics/summary"
    everyone = httpx.get(summary, params=whole, headers=metrics_run.headers).json()
    mine = httpx.get(summary, params=whole, headers=headers).json()
    assert 0 < mine["dossiers"]["received"] < everyone["dossiers"]["received"]
    info = httpx.get(f"{base}/v1/metrics/info", headers=headers).json()
    assert info["operator"]["agencies"] == sorted(scope)
    admin = issuer.headers("admin", agencies=sorted(scope))  # an admin sees every agency
    assert httpx.get(summary, params=whole, headers=admin).json() == everyone


def shown_figure(page: Any, name: str) -> str:
    return str(page.get_attribute(f'[data-figure="dossiers.{name}"]', "data-value"))


def reload_with(page: Any, action: Any) -> None:
    """Do `action` and wait for the page's next refresh (the page draws no refresh that began
    before the action's own)."""
    loaded = int(page.evaluate("document.body.dataset.loaded"))
    action()
    page.wait_for_function(f"Number(document.body?.dataset.loaded) > {loaded}", timeout=20000)


def open_again(page: Any) -> None:
    """Load the page's URL anew and wait for its first figures."""
    page.goto(page.url)
    page.wait_for_function("Number(document.body?.dataset.loaded) >= 1", timeout=20000)


def check_one_overdue_whatever_the_range(page: Any, base: str, headers: dict[str, str]) -> None:
    """The gauges are counts as of the end of the range, and every range ends now: the same
    open-overdue figure for "all data" and for the last 24 hours, the API's as of that end."""
    overdue_all = shown_figure(page, "overdue_open")
    assert int(overdue_all) > 0
    reload_with(page, lambda: page.select_option("#range", "24h"))
    assert "range=24h" in page.url
    assert shown_figure(page, "overdue_open") == overdue_all
    assert shown_figure(page, "received") == "0"  # 2019 data: nothing in the last 24 hours
    start, end = page.evaluate("[document.body.dataset.from, document.body.dataset.to]")
    api = httpx.get(
        f"{base}/v1/metrics/summary", params={"from": start, "to": end}, headers=headers
    ).json()
    assert str(api["dossiers"]["overdue_open"]) == overdue_all
    assert page.locator("#as-of").inner_text() != "—"
    reload_with(page, lambda: page.select_option("#range", "all"))


def check_filters_and_export(page: Any, base: str, headers: dict[str, str], out: Path) -> None:
    """Filters by tier, sector and agency, kept in the URL, chosen with the keyboard; the CSV
    holds what the page shows; readable at 375 px and 1920 px."""
    page.focus("#filter-tier")
    reload_with(page, lambda: page.keyboard.press("ArrowDown"))  # the first tier: province
    assert page.eval_on_selector("#filter-tier", "e => e.value") == "province"
    reload_with(page, lambda: page.select_option("#filter-sector", "land"))
    assert "tier=province" in page.url and "sector=land" in page.url
    start, end = page.evaluate("[document.body.dataset.from, document.body.dataset.to]")
    params = {"from": start, "to": end, "tier": "province", "sector": "land"}
    expected = httpx.get(f"{base}/v1/metrics/summary", params=params, headers=headers).json()
    for name in ("received", "resolved", "overdue_open", "online_eligible_resolved"):
        assert shown_figure(page, name) == str(expected["dossiers"][name]), name
    with page.expect_download() as download:
        page.click("#export")
    text = Path(download.value.path()).read_text(encoding="utf-8-sig")
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[0] == ["section", "key", "name", "label", "value"]
    exported = {(r[0], r[1]): r[4] for r in rows[1:]}
    assert exported["filter", "tier"] == "province" and exported["filter", "sector"] == "land"
    assert exported["summary", "dossiers.resolved"] == str(expected["dossiers"]["resolved"])
    assert any(r[0] == "series:day" for r in rows)
    # the URL alone shows the same (a bookmark, a link sent to a colleague)
    open_again(page)
    assert page.eval_on_selector("#filter-sector", "e => e.value") == "land"
    assert shown_figure(page, "received") == str(expected["dossiers"]["received"])
    reload_with(page, lambda: page.click("#clear-filters"))
    assert "sector=" not in page.url
    for width, name in ((375, "metrics-dashboard-375.png"), (1920, "metrics-dashboard-1920.png")):
        page.set_viewport_size({"width": width, "height": 900})
        reload_with(page, lambda: page.click("#clear-filters"))
        # nothing wider than the screen, no label over another
        assert page.evaluate("document.documentElement.scrollWidth") <= width
        page.screenshot(path=str(out / name), full_page=True)
    page.set_viewport_size({"width": 1400, "height": 1500})


FIGURES_SHOWN = """[...document.querySelectorAll('[data-figure]')]
    .filter(e => e.dataset.value !== undefined || e.textContent.trim() !== '—').length"""


def sign_in(page: Any, issuer: Issuer, sub: str, agencies: str = "") -> None:
    """Through the dev issuer's authorize page, as a viewer, back to the dashboard."""
    page.click("#sign-in")
    page.wait_for_url(f"{issuer.url}/authorize?*")
    page.check('input[name="role"][value="viewer"]')
    page.fill('input[name="sub"]', sub)
    page.fill('input[name="agencies"]', agencies)
    page.click('button[type="submit"]')
    # back on the dashboard: its document may still be loading when the redirect lands
    page.wait_for_url(lambda url: not url.startswith(issuer.url))
    page.wait_for_load_state("domcontentloaded")


def test_the_dashboard_shows_the_figures_of_the_api(metrics_run: Run, issuer: Issuer) -> None:
    from playwright import sync_api as playwright

    # .ci/run installs Debian's chromium; without it this test must fail, not quietly pass.
    assert Path("/usr/bin/chromium").exists(), (
        "chromium is not installed (apt-get install chromium)"
    )
    base = f"http://127.0.0.1:{metrics_run.port}"
    headers = metrics_run.headers
    out = ROOT / "test-output"
    out.mkdir(exist_ok=True)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"],
        )  # fmt: skip
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            outside: list[str] = []
            asked: list[str] = []
            page.on(
                "request",
                lambda r: None if r.url.startswith((base, issuer.url)) else outside.append(r.url),
            )
            page.on("request", lambda r: asked.append(r.url))
            page_errors: list[str] = []
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.goto(base + "/")
            # before sign-in: the sign-in button, no figure, and the API never asked
            page.wait_for_selector("#sign-in", state="visible")
            assert page.evaluate("document.body.dataset.signedIn") == "0"
            assert page.locator("#figures").is_hidden()
            assert page.evaluate(FIGURES_SHOWN) == 0
            assert not [url for url in asked if "/v1/metrics/" in url]
            sign_in(page, issuer, "dashboard-tester")
            page.wait_for_function("Number(document.body?.dataset.loaded) >= 1", timeout=20000)
            assert page.url == base + "/"
            assert page.inner_text("#who-name") == "dashboard-tester"
            assert page.inner_text("#who-role") == "viewer"
            start, end = page.evaluate("[document.body.dataset.from, document.body.dataset.to]")
            summary = httpx.get(
                f"{base}/v1/metrics/summary", params={"from": start, "to": end}, headers=headers
            )
            expected = summary.json()
            assert expected["dossiers"]["resolved"] > 0
            shown = page.evaluate(
                """Object.fromEntries([...document.querySelectorAll('[data-figure]')]
                   .map(e => [e.dataset.figure, e.dataset.value]))"""
            )
            assert len(shown) == 33
            assert page.inner_text("#satisfaction-target") == "80.0 %"  # the Center's target
            for figure, value in shown.items():
                block, name = figure.split(".")
                want = expected[block][name]
                assert value == ("null" if want is None else str(want)), figure
            tiers = httpx.get(
                f"{base}/v1/metrics/breakdown",
                params={"from": start, "to": end, "by": "tier"},
                headers=headers,
            ).json()
            bands = {group["tier"]: group["online_target"] for group in tiers["groups"]}
            assert bands["district"] == [0.30, 0.35]  # services/metrics/catalogue/online_targets
            for group in tiers["groups"]:
                bar = page.locator(f'#chart-tier [data-group="{group["tier"]}"]')
                rate = group["dossiers"]["online_rate_eligible"]  # what the targets compare with
                assert bar.get_attribute("data-value") == ("null" if rate is None else str(rate))
            assert page.locator("#chart-time path[data-series=on_time_rate]").count() == 1
            # the time chart spans the days that have data (weeks of 2019), a point a day
            info = httpx.get(f"{base}/v1/metrics/info", headers=headers).json()
            span = datetime.fromisoformat(info["watermark"]) - datetime.fromisoformat(
                info["first_event_time"]
            )
            chart = page.locator("#chart-time svg")
            assert chart.get_attribute("data-step") == "day"
            assert abs(int(chart.get_attribute("data-points") or 0) - span.days) <= 2
            assert page.locator("#overdue-table tbody tr").count() > 0
            agencies = httpx.get(
                f"{base}/v1/metrics/breakdown",
                params={"from": start, "to": end, "by": "agency_code"},
                headers=headers,
            ).json()["groups"]
            named = {g["agency_code"]: g["agency_name"] for g in agencies}
            assert named["000.00.02.H34"] == "Sở Tư pháp"  # from the agency catalogue
            assert info["sectors"]["land"] == {"vi": "Đất đai", "en": "Land"}
            sectors = httpx.get(
                f"{base}/v1/metrics/breakdown",
                params={"from": start, "to": end, "by": "sector"},
                headers=headers,
            ).json()["groups"]
            assert {g["sector"]: g["sector_name"] for g in sectors}["justice"] == {
                "vi": "Tư pháp",
                "en": "Justice",
            }
            week = {"from": "2019-03-04T00:00:00+07:00", "to": "2019-03-11T00:00:00+07:00"}
            series = httpx.get(
                f"{base}/v1/metrics/series", params={**week, "step": "day"}, headers=headers
            ).json()
            assert len(series["points"]) == 7
            third = series["points"][2]
            day = httpx.get(
                f"{base}/v1/metrics/summary",
                params={"from": third["from"], "to": third["to"]},
                headers=headers,
            ).json()
            assert third["dossiers"] == day["dossiers"]
            first_row = page.locator("#overdue-table tbody tr").first
            assert "Sở" in first_row.inner_text() or "UBND" in first_row.inner_text()
            check_one_overdue_whatever_the_range(page, base, headers)
            check_filters_and_export(page, base, headers, out)
            assert page_errors == []
            page.click("#lang")
            page.wait_for_function("document.documentElement.lang === 'en'")
            page.wait_for_function("Number(document.body?.dataset.loaded) >= 2", timeout=20000)
            assert "On-time rate" in page.inner_text("body")
            page.screenshot(path=str(out / "metrics-dashboard.png"), full_page=True)
            rows = page.locator("#overdue-table tbody tr")
            scope = {rows.nth(i).get_attribute("data-agency") or "" for i in range(2)}
            # signing out takes every figure away
            page.click("#sign-out")
            page.wait_for_selector("#sign-in", state="visible")
            assert page.locator("#figures").is_hidden()
            assert page.evaluate(FIGURES_SHOWN) == 0
            assert page.evaluate("sessionStorage.length") == 0

            # a viewer scoped to two agencies: only theirs in the agencies' table
            scoped = browser.new_context().new_page()
            scoped.on(
                "request",
                lambda r: None if r.url.startswith((base, issuer.url)) else outside.append(r.url),
            )
            scoped.goto(base + "/")
            scoped.wait_for_selector("#sign-in", state="visible")
            sign_in(scoped, issuer, "scoped-tester", ", ".join(sorted(scope)))
            scoped.wait_for_function("Number(document.body?.dataset.loaded) >= 1", timeout=20000)
            assert scope and scoped.inner_text("#who-agencies").endswith(", ".join(sorted(scope)))
            scoped_rows = scoped.locator("#overdue-table tbody tr")
            agencies = {
                scoped_rows.nth(i).get_attribute("data-agency") for i in range(scoped_rows.count())
            }
            assert agencies == scope
            assert outside == []  # works offline: nothing but the service and its issuer
        finally:
            browser.close()
