"""The metrics the alert rules read where the services count them (deploy/prometheus/rules):
readiness at each scrape, SMS failover, the nightly reconciliation's runs and differences, data
keys that do not unwrap. What Prometheus would read, from the default registry."""

from __future__ import annotations

import asyncio
import base64
import os
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from services.common import service as service_module
from services.common.data_keys import DataKeys
from services.common.sealing import Keks, UnknownKek
from services.common.service import add_operational_routes
from services.common.settings import Settings
from services.payments.reconciliation import daily_reconciliation
from services.payments.settings import PaymentsSettings
from services.payments.statement import DifferenceKind
from services.sms.admission import Job
from services.sms.attempts import Attempt, Failure, RetryRules
from services.sms.partner import GatewayError
from services.sms.provider_calls import call_provider


def sample(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def scrape_ready(ready: Any) -> float | None:
    api = FastAPI()
    add_operational_routes(api, ready)
    assert TestClient(api).get("/metrics").status_code == 200
    return sample("motcua_ready")


def test_metrics_say_whether_the_service_is_ready_at_each_scrape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def ready() -> tuple[bool, str]:
        return True, "ready"

    async def starting() -> tuple[bool, str]:
        return False, "starting"

    async def hangs() -> tuple[bool, str]:
        await asyncio.sleep(5)
        return True, "ready"

    assert scrape_ready(ready) == 1.0
    assert scrape_ready(starting) == 0.0
    monkeypatch.setattr(service_module, "READY_AT_SCRAPE_SECONDS", 0.05)
    assert scrape_ready(hangs) == 0.0  # a check that does not answer in time: not ready


def test_a_message_failing_over_is_counted_by_the_provider_it_left() -> None:
    class Rejecting:
        name = "primary"

        async def send_batch(self, batch: list[Any]) -> list[GatewayError]:
            return [GatewayError("primary", Failure.REJECTED, "no", 0.01) for _ in batch]

    message = SimpleNamespace(
        to="+84900000000", text="t", key="k-1", dossier_id="D-1", template="received", origin="{}"
    )
    job = Job(message, Attempt(("primary", "secondary")), "claim", 0.0)  # type: ignore[arg-type]
    before = sample("motcua_sms_failovers_total", from_provider="primary") or 0.0
    answered = asyncio.run(
        call_provider(Rejecting(), [job], sender="MOTCUA", rules=RetryRules(), slow_seconds=2.0)  # type: ignore[arg-type]
    )
    assert answered.failing_over == [job] and job.attempt.provider == "secondary"
    assert sample("motcua_sms_failovers_total", from_provider="primary") == before + 1


def test_the_nightly_reconciliation_counts_a_run_that_failed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    payments = PaymentsSettings(default_gateway="vnpay", gateway_by_agency={})

    async def unreachable(*args: Any, **kwargs: Any) -> None:
        raise OSError("statement unreachable")

    monkeypatch.setattr("services.payments.reconciliation.run_reconciliation", unreachable)
    job = daily_reconciliation(Settings(), payments)
    # every series is there before the first run, at 0: an alert sees the first difference
    for kind in DifferenceKind:
        labels = {"gateway": "vnpay", "kind": kind.value}
        assert sample("motcua_payments_reconciliation_differences_total", **labels) is not None
    failed = {"gateway": "vnpay", "outcome": "failed"}
    before = sample("motcua_payments_reconciliation_runs_total", **failed)
    assert before is not None
    asyncio.run(job())
    assert sample("motcua_payments_reconciliation_runs_total", **failed) == before + 1


def test_a_data_key_whose_kek_is_no_longer_listed_is_counted() -> None:
    def kek() -> str:
        return base64.b64encode(os.urandom(32)).decode()

    old = Keks.parse(f"old:{kek()}")
    keys = DataKeys("127.0.0.1:1", Keks.parse(f"new:{kek()}"), partitions=1)
    keys.apply(b"D-1", old.wrap("D-1", os.urandom(32)).encode())
    before = sample("motcua_data_keys_unopenable_total", reason="unknown_kek")
    assert before is not None  # there from the start
    with pytest.raises(UnknownKek):
        asyncio.run(keys.data_key("D-1"))
    assert sample("motcua_data_keys_unopenable_total", reason="unknown_kek") == before + 1
