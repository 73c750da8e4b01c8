"""Settled payments leave the ledger: the real broker, the real Redis, the VNPAY-style sandbox
over loopback HTTP and the worker as a real process (an order window of seconds, a grace of
seconds). A paid order is tombstoned in the ledger's changelog and counted; a restarted worker
holds only the open order; a late IPN is answered 02 and changes nothing; its submission read
again opens no second order; the day's reconciliation still finds it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import AbstractContextManager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiokafka import AIOKafkaProducer

from services.common import topics
from services.common.events import decode_event
from services.common.kafka import ensure_topics
from services.common.topics import declared_topics
from services.common.tz import VIETNAM_TZ
from services.dev.embedded import Broker, free_port
from tests.conftest import service_env
from tests.integration.test_payments import signed_success_ipn, submitted
from tests.support.kafka import read_all
from tests.support.processes import motcua, process, run_cli, until, wait_http
from tests.support.prometheus import metric_total

pytestmark = pytest.mark.integration


class Payments:
    def __init__(self, broker: Broker, env: dict[str, str], port: int) -> None:
        self.broker = broker
        self.env = env
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def figure(self, name: str, **labels: str) -> float:
        return metric_total(self.url, name, **labels)

    def ipn(self, params: dict[str, str]) -> str:
        url = f"{self.url}/v1/webhooks/payments/vnpay"
        code: str = httpx.get(url, params=params, timeout=10).json()["RspCode"]
        return code

    async def submit(self, events: list[dict[str, Any]]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.broker.bootstrap, acks="all")
        await producer.start()
        try:
            for event in events:
                await producer.send_and_wait(
                    topics.DOSSIER_EVENTS, orjson.dumps(event), key=event["subject"].encode()
                )
        finally:
            await producer.stop()

    def events(self, dossier_id: str, expect: int | None = None) -> list[Any]:
        """The dossier's payment events (once `expect` events of any dossier are there)."""
        records = asyncio.run(
            read_all(self.broker.bootstrap, topics.PAYMENT_EVENTS, expect=expect, timeout=60)
        )
        return [e for r in records if (e := decode_event(r.value)).subject == dossier_id]


@pytest.fixture(scope="module")
def payments(broker: Broker, redis_url: str) -> Iterator[Payments]:
    asyncio.run(ensure_topics(broker.bootstrap, declared_topics(4)))
    port, sandbox_port = free_port(), free_port()
    env = service_env(
        broker,
        redis_url,
        f"motcua-test-pay-retire-{uuid.uuid4().hex[:10]}",
        PAYMENTS_PORT=str(port),
        VNPAY_SANDBOX_PORT=str(sandbox_port),
        VNPAY_URL=f"http://127.0.0.1:{sandbox_port}",
        JSONPAY_URL=f"http://127.0.0.1:{sandbox_port}/jsonpay",
        PAYMENTS_PUBLIC_URL=f"http://127.0.0.1:{port}",
        # A window of a second, closed by the sweeper only a minute later: the test's IPN
        # always finds the order open, and its late window is over a second after it closed.
        PAYMENTS_ORDER_TTL_SECONDS="1",
        PAYMENTS_QUERY_OFFSETS_SECONDS="",
        PAYMENTS_EXPIRE_OFFSET_SECONDS="60",
        PAYMENTS_LATE_QUERY_OFFSETS_SECONDS="1",
        PAYMENTS_SWEEP_INTERVAL_SECONDS="0.3",
        PAYMENTS_RETIRE_AFTER_SECONDS="2",
        PAYMENTS_RECONCILE_ENABLED="false",
        PAYMENTS_RECONCILE_DIR=tempfile.mkdtemp(prefix="motcua-pay-retire-"),
    )
    with process(["services.cli", "run", "vnpay-sandbox"], env, "vnpay-retire"):
        wait_http(f"http://127.0.0.1:{sandbox_port}/healthz")
        yield Payments(broker, env, port)


def worker(payments: Payments) -> AbstractContextManager[subprocess.Popen[bytes]]:
    """The payments worker as a process, ready (its ledger restored) on entry."""
    return motcua("payments", payments.env, payments.port, log_name="payments-retire")


def tombstoned(bootstrap: str, dossier_id: str) -> bool:
    records = asyncio.run(read_all(bootstrap, topics.PAYMENTS_LEDGER_CHANGELOG, idle=0.5))
    mine = [r for r in records if r.key == dossier_id.encode()]
    return bool(mine) and mine[-1].value is None


def test_a_paid_order_leaves_and_its_late_inputs_change_nothing(
    payments: Payments, tmp_path: Path
) -> None:
    paid = "000.00.12.H34-261126-0101"
    still_open = "000.00.12.H34-261126-0102"  # its window opens in an hour: it stays
    submission = submitted(paid)
    with worker(payments):
        asyncio.run(payments.submit([submission, submitted(still_open, ahead=3600)]))
        [requested] = payments.events(paid, expect=2)  # both orders opened
        view = requested.to_dict()["data"]
        assert payments.ipn(signed_success_ipn(view, "70001")) == "00"

        # Paid, past its late window and grace: the record leaves, its tombstone written.
        until(
            lambda: payments.figure("motcua_states_retired_total", service="payments") >= 1,
            "the paid order retired",
        )
        assert payments.figure("motcua_states_live", service="payments") == 1  # the open one
        assert tombstoned(payments.broker.bootstrap, paid)

        # A late IPN (another attempt the gateway reports paid): already confirmed, nothing
        # moves; its submission read again: no second order.
        def consumed() -> float:
            return payments.figure("motcua_events_consumed_total")

        before = consumed()
        assert payments.ipn(signed_success_ipn(view, "70002")) == "02"
        asyncio.run(payments.submit([submission]))
        until(lambda: consumed() >= before + 2, "the late IPN and the submission read")
        assert payments.figure("motcua_dead_lettered_total") == 0  # the late IPN applied
        assert payments.figure("motcua_states_live", service="payments") == 1
    assert [e.type for e in payments.events(paid)] == [
        "payment.requested",
        "payment.succeeded",
        "payment.receipt_issued",  # numbered once, however often the payment is told again
    ]

    # A restarted worker restores the open order only.
    with worker(payments):
        assert payments.figure("motcua_states_live", service="payments") == 1

    # The day's reconciliation finds the retired order in its Redis copy: no difference.
    day = datetime.now(VIETNAM_TZ).date().isoformat()
    statement = tmp_path / "statement.csv"
    statement.write_text(
        "txn_ref,transaction_no,amount_vnd,status,paid_at,bank_code\n"
        f"{view['txn_ref']},70001,{view['amount_vnd']},succeeded,"
        f"{datetime.now(VIETNAM_TZ).isoformat(timespec='seconds')},NCB\n"
    )
    done = run_cli(
        *("reconcile", "--gateway", "vnpay", "--date", day, "--statement", str(statement)),
        *("--out", str(tmp_path)),
        env=payments.env,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.splitlines()[-1])["differences"] == 0
