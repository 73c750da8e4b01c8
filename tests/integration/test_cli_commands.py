"""The operators' and developers' commands, run as a user runs them (`motcua ...` in a
subprocess) against a real broker and a running intake (issue 14): `topics` creates every
declared topic, `schema` writes the event schema the models define, `hash-key` prints the
SHA-256 intake's settings expect, `simulate` posts a bounded stream that lands on
`dossier.events`, `reconcile` and `reconcile-cod` record one `audit.reconciliation_run` per run."""

from __future__ import annotations

import asyncio
import hashlib
import re
import secrets
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from jsonschema import Draft202012Validator  # type: ignore[import-untyped]

from services.common.audit import command_operator
from services.common.command_audit import CLI_SOURCE
from services.common.events import EVENT_MODELS, CloudEvent, decode_event, json_schemas
from services.common.kafka import ensure_topics
from services.common.settings import hash_key
from services.common.topics import DOSSIER_EVENTS, declared_topics
from services.dev.embedded import Broker, free_port
from tests.conftest import service_env
from tests.support.factories import submitted
from tests.support.kafka import audit_events_of, read_all
from tests.support.processes import motcua, run_cli
from tests.support.redis_keys import delete_namespace

pytestmark = pytest.mark.integration

SOURCE = "portal/cli-test"
SCRAPE_TOKEN = secrets.token_urlsafe(16)  # intake here runs behind Prometheus' scrape token
PROBE_ID = "cli-test-probe"  # the one event of SOURCE that is not the simulator's


async def partitions_by_topic(bootstrap: str) -> dict[str, int]:
    """What the broker's admin API reports: topic → number of partitions."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    await admin.start()
    try:
        names = await admin.list_topics()
        described = await admin.describe_topics(names) if names else []
    finally:
        await admin.close()
    return {t["topic"]: len(t["partitions"]) for t in described if t["error_code"] == 0}


async def test_topics_creates_every_declared_topic() -> None:
    own = Broker(port=free_port()).start()  # no service has created anything on it yet
    try:
        declared = {spec.name: spec.partitions for spec in declared_topics(3)}
        assert not set(declared) & set(await partitions_by_topic(own.bootstrap))
        env = {"KAFKA_BOOTSTRAP": own.bootstrap, "MOTCUA_TOPIC_PARTITIONS": "3"}

        created = run_cli("topics", env=env)
        assert created.returncode == 0, created.stderr
        printed = dict(line.split("\t") for line in created.stdout.splitlines())
        assert printed == {name: f"{n} partitions" for name, n in declared.items()}
        found = await partitions_by_topic(own.bootstrap)
        assert {name: found.get(name) for name in declared} == declared
    finally:
        own.stop()


def test_schema_writes_the_models_schema_and_checks_a_stale_file(tmp_path: Path) -> None:
    path = tmp_path / "events.schema.json"
    written = run_cli("schema", "--output", str(path))
    assert written.returncode == 0, written.stderr
    assert str(path) in written.stdout

    schema = orjson.loads(path.read_bytes())
    Draft202012Validator.check_schema(schema)
    assert schema == json_schemas()
    assert {ref["$ref"].removeprefix("#/$defs/") for ref in schema["oneOf"]} == set(EVENT_MODELS)
    # what the models accept the schema accepts; what they refuse it refuses
    validator = Draft202012Validator(schema)
    event = submitted()
    decode_event(orjson.dumps(event))
    assert not list(validator.iter_errors(event))
    event["data"]["channel"] = "pigeon"
    with pytest.raises(ValueError, match="channel"):
        decode_event(orjson.dumps(event))
    assert list(validator.iter_errors(event))

    path.write_bytes(path.read_bytes().replace(b'"oneOf"', b'"anyOf"'))
    stale = run_cli("schema", "--output", str(path), "--check")
    assert stale.returncode == 1 and "out of date" in stale.stderr


async def events_from(broker: Broker, source: str, expect: int) -> list[CloudEvent[Any]]:
    """The events of `source` on `dossier.events` (read until `expect` records are there, or
    quiet), each checked to be keyed by its dossier."""
    found: list[CloudEvent[Any]] = []
    records = await read_all(broker.bootstrap, DOSSIER_EVENTS, expect=expect, timeout=20)
    for record in records:
        event = decode_event(record.value)
        if event.source == source:
            assert record.key == event.subject.encode()
            found.append(event)
    return found


class Intake:
    def __init__(self, port: int, key: str, hashed: subprocess.CompletedProcess[str]) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.key = key
        self.hashed = hashed  # `motcua hash-key KEY` as the operator ran it

    def metric(self, name: str, **labels: str) -> float:
        scraper = {"Authorization": f"Bearer {SCRAPE_TOKEN}"}
        text = httpx.get(f"{self.url}/metrics", headers=scraper, timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{"):
                continue
            found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
            if all(found.get(k) == v for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


@pytest.fixture(scope="module")
def intake(broker: Broker, redis_url: str) -> Iterator[Intake]:
    """Intake knowing one portal, configured the way an operator does: the key's hash as
    `motcua hash-key` prints it."""
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    key = secrets.token_urlsafe(32)
    hashed = run_cli("hash-key", key)
    portals = orjson.dumps([{"source": SOURCE, "key_sha256": hashed.stdout.strip()}]).decode()
    port = free_port()
    namespace = f"motcua-test-{uuid.uuid4().hex[:10]}"
    env = service_env(
        broker,
        redis_url,
        namespace,
        INTAKE_PORT=str(port),
        MOTCUA_PORTALS=portals,
        MOTCUA_METRICS_SCRAPE_TOKEN=SCRAPE_TOKEN,
    )
    with motcua("intake", env, port, log_name="intake-cli"):
        yield Intake(port, key, hashed)
    delete_namespace(redis_url, namespace)


def test_a_service_with_a_scrape_token_refuses_other_scrapes(intake: Intake) -> None:
    for headers in ({}, {"Authorization": f"Bearer {SCRAPE_TOKEN}-not"}):
        refused = httpx.get(f"{intake.url}/metrics", headers=headers, timeout=10)
        assert refused.status_code == 401, refused.text
        assert refused.headers["www-authenticate"].startswith("Bearer")
        assert refused.headers["content-type"] == "application/problem+json"
    scraper = {"Authorization": f"Bearer {SCRAPE_TOKEN}"}
    allowed = httpx.get(f"{intake.url}/metrics", headers=scraper, timeout=10)
    assert allowed.status_code == 200 and "motcua_ready 1.0" in allowed.text
    assert httpx.get(f"{intake.url}/healthz", timeout=10).status_code == 200


def test_hash_key_prints_the_sha256_portal_settings_expect(intake: Intake) -> None:
    assert intake.hashed.returncode == 0, intake.hashed.stderr
    assert intake.hashed.stdout == hashlib.sha256(intake.key.encode()).hexdigest() + "\n"
    assert intake.hashed.stdout.strip() == hash_key(intake.key)
    # intake configured with that hash takes the key, and only it
    for key, status in ((intake.key, 202), (intake.key + "x", 401)):
        answer = httpx.post(
            f"{intake.url}/v1/events",
            content=orjson.dumps(submitted(source=SOURCE, event_id=PROBE_ID)),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
            timeout=30,
        )
        assert answer.status_code == status, answer.text


async def test_simulate_posts_a_bounded_stream_that_lands_on_dossier_events(
    intake: Intake, broker: Broker
) -> None:
    rate, duration = 4.0, 2.0
    accepted_before = intake.metric("motcua_intake_events_total", source=SOURCE, outcome="accepted")
    run = run_cli(
        "simulate",
        "--rate",
        str(rate),
        "--duration",
        str(duration),
        "--seed",
        "11",
        "--day-seconds",
        "1",
        "--intake-url",
        intake.url,
        "--key",
        intake.key,
        "--source",
        SOURCE,
        timeout=60,  # it stops by itself after --duration
    )
    assert run.returncode == 0, run.stdout + run.stderr

    # every post was answered 202, so what was accepted is on the topic already
    # (the only events on this module's broker are intake's)
    on_topic = intake.metric("motcua_intake_events_total", source=SOURCE, outcome="accepted")
    accepted = on_topic - accepted_before
    assert accepted > 0
    assert intake.metric("motcua_intake_requests_total", status="422") == 0
    found = await events_from(broker, SOURCE, expect=int(on_topic))
    events = [e for e in found if e.id != PROBE_ID]
    assert len(events) == accepted == len({e.id for e in events})
    submissions = [e for e in events if e.type == "dossier.submitted"]
    # a bounded stream: about `rate` new dossiers a second for `duration` seconds
    assert 1 <= len(submissions) <= rate * duration + 1
    assert {e.subject for e in events} == {e.subject for e in submissions}
    # the schema `motcua schema` documents holds for every event the simulator sent
    validator = Draft202012Validator(json_schemas())
    for event in events:
        assert not list(validator.iter_errors(orjson.loads(event.to_json()))), event.type


async def test_reconcile_cod_reports_and_announces_each_kind_of_difference(
    broker: Broker, tmp_path: Path
) -> None:
    """`motcua reconcile-cod FILE`: a remittance against the cash collected on
    `postal.events`; one `postal.cod_mismatch` per difference, the same ids when run again."""
    await ensure_topics(broker.bootstrap, declared_topics(4))
    run = uuid.uuid4().hex[:6]
    day = "2026-11-20"
    collected = [(f"D{run}-{i}", f"VN{run}{i}", amount) for i, amount in enumerate((150, 90, 80))]
    producer = AIOKafkaProducer(bootstrap_servers=broker.bootstrap, acks="all")
    await producer.start()
    try:
        for dossier_id, order_id, amount in collected:
            event = {
                "specversion": "1.0",
                "id": f"postal:{dossier_id}:return:3:cod_collected",
                "source": "motcua/postal",
                "type": "postal.cod_collected",
                "subject": dossier_id,
                "time": f"{day}T10:00:00+07:00",
                "datacontenttype": "application/json",
                "data": {"dossier_id": dossier_id, "order_id": order_id, "amount_vnd": amount},
            }
            await producer.send_and_wait(
                "postal.events", orjson.dumps(event), key=dossier_id.encode()
            )
    finally:
        await producer.stop()
    remittance = tmp_path / "remittance.csv"
    remittance.write_text(
        "order_id,dossier_id,amount_vnd,collected_at\n"
        f"VN{run}0,D{run}-0,150,{day}T10:30:00+07:00\n"  # as collected
        f"VN{run}1,D{run}-1,70,{day}T10:30:00+07:00\n"  # short
        f"VNX{run},D{run}-x,40,{day}T10:30:00+07:00\n",  # nobody collected it
        encoding="utf-8",
    )
    env = {"KAFKA_BOOTSTRAP": broker.bootstrap}
    for _ in range(2):
        done = run_cli("reconcile-cod", str(remittance), "--out", str(tmp_path), env=env)
        assert done.returncode == 0, done.stderr
    # the summary is the JSON line (the run's log lines go to stdout too)
    [line] = [x for x in done.stdout.splitlines() if x.startswith('{"date"')]
    result = orjson.loads(line)
    assert (result["date"], result["matched"], result["differences"]) == (day, 1, 3)
    assert result["by_kind"] == {
        "missing_in_remittance": 1,
        "extra_in_remittance": 1,
        "amount_mismatch": 1,
    }
    report = (tmp_path / f"cod-{day}.csv").read_text(encoding="utf-8").splitlines()
    assert sorted(line.split(",")[1] for line in report[1:]) == [
        f"D{run}-1",
        f"D{run}-2",
        f"D{run}-x",
    ]
    announced: dict[str, set[bytes]] = {}
    for record in await read_all(broker.bootstrap, "postal.events", idle=1.0):
        event = orjson.loads(record.value)
        if event["type"] == "postal.cod_mismatch" and event["subject"].startswith(f"D{run}"):
            announced.setdefault(event["id"], set()).add(record.value)
    assert len(announced) == 3 and all(len(copies) == 1 for copies in announced.values())
    bad = tmp_path / "bad.csv"
    bad.write_text("order_id,amount_vnd\n", encoding="utf-8")
    refused = run_cli("reconcile-cod", str(bad), env=env)
    assert refused.returncode == 2 and "line 1" in refused.stderr
    malformed = run_cli("reconcile-cod", str(remittance), "--date", "20-11-2026", env=env)
    assert malformed.returncode == 2  # refused before it ran: no action, no audit event
    # one audit event per run: the two runs (each its own action) and the one that failed
    audits = [
        e
        for e in await audit_events_of(broker.bootstrap, CLI_SOURCE)
        if e["subject"].startswith("cod/")
    ]
    assert sorted((e["type"], e["subject"], e["data"]["outcome"]) for e in audits) == [
        ("audit.reconciliation_run", f"cod/{day}", "succeeded"),
        ("audit.reconciliation_run", f"cod/{day}", "succeeded"),
        ("audit.reconciliation_run", "cod/undated", "failed"),
    ]
    assert len({e["id"] for e in audits}) == 3
    assert all(e["data"]["actor"] == command_operator().sub for e in audits)


async def test_reconcile_records_one_audit_event_per_run(broker: Broker, tmp_path: Path) -> None:
    """`motcua reconcile` records what `POST /v1/admin/reconciliations` records: one
    `audit.reconciliation_run` of `<gateway>/<day>` per run, `failed` when it did not finish;
    an unknown gateway runs nothing and records nothing."""
    await ensure_topics(broker.bootstrap, declared_topics(4))
    day = "2026-11-19"
    statement = tmp_path / "statement.csv"
    statement.write_text("txn_ref,transaction_no,amount_vnd,status,paid_at,bank_code\n")
    env = {"KAFKA_BOOTSTRAP": broker.bootstrap}
    args = ("reconcile", "--gateway", "vnpay", "--date", day, "--out", str(tmp_path))
    done = run_cli(*args, "--statement", str(statement), env=env)
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout.splitlines()[-1])["differences"] == 0
    unknown = run_cli("reconcile", "--gateway", "nopay", "--date", day, env=env)
    assert unknown.returncode == 2 and "unknown gateway 'nopay'" in unknown.stderr
    missing = run_cli(*args, "--statement", str(tmp_path / "no-such.csv"), env=env)
    assert missing.returncode == 2 and "reconciliation failed" in missing.stderr

    audits = [
        e
        for e in await audit_events_of(broker.bootstrap, CLI_SOURCE)
        if not e["subject"].startswith("cod/")
    ]
    assert sorted((e["type"], e["subject"], e["data"]["outcome"]) for e in audits) == [
        ("audit.reconciliation_run", f"vnpay/{day}", "failed"),
        ("audit.reconciliation_run", f"vnpay/{day}", "succeeded"),
    ]
    assert all(
        (e["data"]["actor"], e["data"]["roles"]) == (command_operator().sub, []) for e in audits
    )
