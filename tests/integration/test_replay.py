"""The half-year replay at F = 0.01 through the real stack: Tansu, Redis, and `motcua run intake`,
`metrics`, `postal` and `vnpost-sandbox` as processes; every figure of the table asserted. The
metrics are read as an operator with the role `viewer`, tokens of the dev issuer (CONTRACT 8)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from rich.console import Console

from services.common.kafka import ensure_topics
from services.common.topics import declared_topics
from services.dev.embedded import Broker, free_port
from services.simulator.plan import targets
from services.simulator.shell import replay, table
from tests.conftest import PORTAL_KEY
from tests.support.operators import Issuer
from tests.support.postal import Ports, postal_env
from tests.support.processes import ROOT, motcua
from tests.support.redis_keys import delete_namespace

SCALE = 0.01
SEED = 2019

pytestmark = pytest.mark.integration


@dataclass
class Stack:
    intake_url: str
    metrics_url: str
    issuer: Issuer


@pytest.fixture(scope="module")
def stack(broker: Broker, redis_url: str, issuer: Issuer) -> Iterator[Stack]:
    namespace = f"motcua-test-{uuid.uuid4().hex[:10]}"
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    ports = Ports()
    intake_port, metrics_port = free_port(), free_port()
    env = postal_env(
        broker,
        redis_url,
        namespace,
        ports,
        INTAKE_PORT=str(intake_port),
        METRICS_PORT=str(metrics_port),
        METRICS_OVERDUE_CLOCK="watermark",
        MOTCUA_OIDC_ISSUER=issuer.url,
    )
    env["MOTCUA_DATA_DIR"] = tempfile.mkdtemp(prefix="motcua-replay-test-")
    # Slow carrier steps and default stale timers: this test counts the orders booked
    # (`postal.*_requested`), and a thousand shipments racing through their webhooks at once
    # would only compete with the bookings for the two cores.
    env["VNPOST_SANDBOX_STEP_SECONDS"] = "120"
    for name in ("POSTAL_STALE_QUERY_AFTER_HOURS", "POSTAL_STALE_GIVE_UP_AFTER_DAYS"):
        env.pop(name)
    env["POSTAL_SCAN_INTERVAL_SECONDS"] = "2"
    env["POSTAL_REBOOK_AFTER_SECONDS"] = "5"
    with (
        motcua("vnpost-sandbox", env, ports.sandbox, ready=False, log_name="replay-vnpost"),
        motcua("postal", env, ports.postal, log_name="replay-postal"),
        motcua("intake", env, intake_port, log_name="replay-intake"),
        motcua("metrics", env, metrics_port, log_name="replay-metrics"),
    ):
        yield Stack(f"http://127.0.0.1:{intake_port}", f"http://127.0.0.1:{metrics_port}", issuer)
    delete_namespace(redis_url, namespace)


async def test_replay_at_one_percent_reproduces_every_figure(stack: Stack) -> None:
    result = await replay(
        SCALE,
        SEED,
        intake_url=stack.intake_url,
        key=PORTAL_KEY,
        metrics_url=stack.metrics_url,
        operator_token=stack.issuer.token("viewer"),
        source="portal/test",
        wait_seconds=150,
        settle_seconds=20,
    )
    Console(width=200).print(table(result))  # shown when the test fails
    t = targets(SCALE)
    assert (t.received, t.resolved, t.late, t.online_resolved) == (2_957, 2_791, 83, 478)
    assert (t.pickups, t.returns) == (11, 1_031)
    assert result.sent.accepted == result.sent.events > 10_000
    by_label = {c.label: c for c in result.checks}
    expected = {
        "received": 2_957,
        "resolved": 2_791,
        "early or on time": 2_708,
        "late": 83,
        "resolved online": 478,
        "Tourism: all": 4,
        "Tourism: online": 4,
        "Agriculture: all": 69,
        "Agriculture: online": 48,
        "Natural Resources & Environment: all": 44,
        "Natural Resources & Environment: online": 24,
        "Industry & Trade: all": 46,
        "Industry & Trade: online": 25,
        "Culture & Sports: all": 7,
        "Culture & Sports: online": 3,
        "postal pickups": 11,
        "postal returns": 1_031,
    }
    for label, figure in expected.items():
        check = by_label[label]
        assert (check.target, check.read) == (figure, figure), label
    for label in (
        "on-time rate",
        "online rate",
        "late rate, construction",
        "late rate, land",
        "late rate, labour-invalids-social",
    ):
        check = by_label[label]
        assert check.read is not None and check.ok, (label, check.read, check.target)
    assert len(result.checks) == len(expected) + 5
    assert result.ok


def test_replaying_the_same_seed_again_changes_nothing(stack: Stack) -> None:
    """The command line end to end: same seed, same event ids and bytes, so intake answers
    duplicates only, the figures stay put, and the table still passes (exit 0). No token is
    given: the command reads the metrics with a viewer's token of the dev issuer it is
    pointed at, as under `motcua dev`."""
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "replay",
            "--scale",
            str(SCALE),
            "--seed",
            str(SEED),
            "--intake-url",
            stack.intake_url,
            "--metrics-url",
            stack.metrics_url,
            "--key",
            PORTAL_KEY,
            "--source",
            "portal/test",
            "--wait",
            "60",
        ],
        cwd=ROOT,
        env={
            **{k: v for k, v in os.environ.items() if k != "MOTCUA_OPERATOR_TOKEN"},
            "COLUMNS": "200",
            "MOTCUA_OIDC_ISSUER": stack.issuer.url,
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    assert "(0 accepted" in completed.stdout
    assert "received" in completed.stdout and "postal returns" in completed.stdout
