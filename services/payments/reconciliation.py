"""The reconciliation run (imperative shell around `statement`): statement, ledger, report, events.

`motcua reconcile` runs it for one gateway and day; the worker runs it every night for the
previous day (`daily_reconciliation`, on one member). The ledger is read from its changelog topic
on Kafka (`topics.PAYMENTS_LEDGER_CHANGELOG`, last value per dossier), so the command needs no
running worker and sees every partition. A statement row whose order the ledger no longer holds
(retired: settled `PAYMENTS_RETIRE_AFTER_SECONDS` ago and more) is looked up in the orders'
Redis copies, which outlive a retired record by `PAYMENTS_IPN_DEDUPE_TTL_SECONDS`; a day older
than both reports such rows as `missing_in_ledger`. Each difference becomes a
`payment.reconciliation_mismatch` with an id derived from (gateway, day, kind, txn_ref) and a
body from the statement and the ledger alone (its time: the end of the reconciled day), so running
the same day twice republishes the same events, byte for byte. Operators start a run with
`POST /v1/admin/reconciliations` (`admin.py`).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path
from typing import Any

import typer
from prometheus_client import Counter
from redis.exceptions import RedisError

from services.common import topics
from services.common.changelog import read_latest
from services.common.command_audit import AuditNotRecorded, audited_command
from services.common.coordination import Keys, connect
from services.common.events import AuditAction, make_event
from services.common.kafka import publish_once
from services.common.logging import get_logger
from services.common.settings import Settings
from services.common.tz import VIETNAM_TZ
from services.payments.domain import Payment
from services.payments.ledger import SOURCE, LedgerRecord, OrderSnapshots
from services.payments.partner import GATEWAY_NAMES, gateways
from services.payments.settings import PaymentsSettings
from services.payments.statement import (
    Difference,
    DifferenceKind,
    Reconciliation,
    ledger_entry,
    parse_statement,
    reconcile,
    report_csv,
    summary,
)

log = get_logger("motcua.payments.reconcile")

MISMATCH_EVENT = "payment.reconciliation_mismatch"

DIFFERENCES = Counter(
    "motcua_payments_reconciliation_differences_total",
    "Differences found between a gateway's statement and the ledger",
    ["gateway", "kind"],
)
NIGHTLY_RUNS = Counter(
    "motcua_payments_reconciliation_runs_total",
    "Nightly reconciliation runs by outcome (ok, failed)",
    ["gateway", "outcome"],
)


async def read_ledger(
    bootstrap: str, topic: str = topics.PAYMENTS_LEDGER_CHANGELOG
) -> list[Payment]:
    """Every payment in the ledger: the last changelog value of each key, to the end offsets."""
    latest = await read_latest(bootstrap, topic)
    return [LedgerRecord.from_bytes(value).payment for value in latest.values()]


async def retired_payments(
    settings: Settings, payments: PaymentsSettings, txn_refs: list[str]
) -> list[Payment]:
    """The payments of `txn_refs` that their orders' Redis copies still hold."""
    if not txn_refs:
        return []
    client = connect(settings)
    try:
        snapshots = OrderSnapshots(
            client, Keys(settings.redis_namespace), payments.ipn_dedupe_ttl_seconds
        )
        found = await snapshots.get_many(txn_refs)
    except (RedisError, OSError) as exc:  # logged: their rows are reported missing
        log.warning("retired_orders_not_read", orders=len(txn_refs), error_type=type(exc).__name__)
        return []
    finally:
        await client.aclose()
    return [record.payment for record in found.values()]


def day_end(day: date) -> datetime:
    """The end of a Vietnamese calendar day: what a reconciliation of that day is as of."""
    return datetime.combine(day + timedelta(days=1), time(0), VIETNAM_TZ)


def mismatch_event(result: Reconciliation, d: Difference) -> Any:
    subject = d.dossier_id or d.txn_ref  # an order the ledger lacks is named by its txn_ref
    return make_event(
        MISMATCH_EVENT,
        source=SOURCE,
        id=f"reconcile/{result.gateway}/{result.day.isoformat()}/{d.kind.value}/{d.txn_ref}",
        subject=subject,
        time=day_end(result.day),
        data={
            "dossier_id": subject,
            "reason": d.kind.value,
            "amount_vnd": d.statement_amount_vnd or d.ledger_amount_vnd,
            "gateway": result.gateway,
            "date": result.day.isoformat(),
            "txn_ref": d.txn_ref,
            "transaction_no": d.transaction_no,
            "ledger_amount_vnd": d.ledger_amount_vnd,
            "statement_amount_vnd": d.statement_amount_vnd,
            "ledger_status": d.ledger_status,
            "statement_status": d.statement_status,
            "in_ledger": d.dossier_id is not None,
        },
    )


def write_outputs(result: Reconciliation, report_path: Path, summary_path: Path) -> None:
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(report_csv(result), encoding="utf-8")
    summary_path.write_text(json.dumps(summary(result), indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class Outcome:
    result: Reconciliation
    report_path: Path
    summary_path: Path


async def run_reconciliation(
    settings: Settings,
    payments: PaymentsSettings,
    gateway_name: str,
    day: date,
    statement_file: Path | None,
    out_dir: Path | None = None,
) -> Outcome:
    adapters = gateways(settings, payments)
    if gateway_name not in adapters:
        raise ValueError(f"unknown gateway {gateway_name!r}; known: {', '.join(adapters)}")
    try:
        if statement_file is not None:
            text = await asyncio.to_thread(statement_file.read_text, encoding="utf-8")
        else:
            text = await adapters[gateway_name].statement(day)
    finally:
        for adapter in adapters.values():
            await adapter.aclose()
    rows = parse_statement(text)
    payments_all = await read_ledger(settings.kafka_bootstrap)
    held = {p.txn_ref for p in payments_all}
    retired = sorted({row.txn_ref for row in rows} - held)
    payments_all += await retired_payments(settings, payments, retired)
    entries = [ledger_entry(p) for p in payments_all if p.gateway == gateway_name]
    result = reconcile(day, rows, entries, gateway=gateway_name)
    for difference in result.differences:
        DIFFERENCES.labels(gateway_name, difference.kind.value).inc()

    directory = out_dir or Path(payments.reconcile_dir)
    stem = f"reconciliation-{gateway_name}-{day.isoformat()}"
    report_path = directory / f"{stem}.csv"
    summary_path = directory / f"{stem}.json"
    await asyncio.to_thread(write_outputs, result, report_path, summary_path)

    if result.differences:
        events = [mismatch_event(result, d) for d in result.differences]
        await publish_once(
            settings.kafka_bootstrap, [(e.topic, e.key, e.to_json()) for e in events]
        )
    log.info(
        "reconciled",
        gateway=gateway_name,
        date=day.isoformat(),
        differences=len(result.differences),
        statement_rows=result.statement_rows,
    )
    return Outcome(result, report_path, summary_path)


def reconcile_command(
    settings: Settings, gateway: str, day_text: str, statement: Path | None, out: Path | None
) -> int:
    """`motcua reconcile`: prints the summary as JSON; exit 0 when it ran, 2 on bad input, 1 when
    its audit record was not acknowledged. A run is recorded as `audit.reconciliation_run`
    (target `<gateway>/<day>`, as `POST /v1/admin/reconciliations` records it; actor
    `cli/<OS user>`), `failed` when it did not finish; a malformed date or an unknown gateway
    runs nothing and records nothing."""
    try:
        day = date.fromisoformat(day_text)
    except ValueError:
        typer.echo(f"--date {day_text!r} is not YYYY-MM-DD", err=True)
        return 2
    if gateway not in GATEWAY_NAMES:
        typer.echo(f"unknown gateway {gateway!r}; known: {', '.join(GATEWAY_NAMES)}", err=True)
        return 2

    def run() -> Awaitable[Outcome]:
        return run_reconciliation(settings, PaymentsSettings(), gateway, day, statement, out)

    target = f"{gateway}/{day.isoformat()}"
    action = AuditAction.RECONCILIATION_RUN
    unrecorded: AuditNotRecorded | None = None
    try:
        outcome = asyncio.run(
            audited_command(settings.kafka_bootstrap, action, lambda _: target, run)
        )
    except AuditNotRecorded as exc:
        outcome, unrecorded = exc.result, exc
    except (ValueError, OSError) as exc:
        typer.echo(f"reconciliation failed: {exc}", err=True)
        return 2
    typer.echo(json.dumps(summary(outcome.result)))
    typer.echo(f"report: {outcome.report_path}", err=True)
    typer.echo(f"summary: {outcome.summary_path}", err=True)
    if unrecorded is not None:
        typer.echo(f"the broker did not acknowledge its audit record ({unrecorded})", err=True)
        return 1
    return 0


def configured_gateways(payments: PaymentsSettings) -> list[str]:
    """The gateways some agency's fees go to: those the daily run reconciles."""
    return sorted(set(payments.gateway_by_agency.values()) | {payments.default_gateway})


def daily_reconciliation(
    settings: Settings, payments: PaymentsSettings
) -> Callable[[], Awaitable[None]]:
    """The nightly job: yesterday (Vietnam time) for every configured gateway; a gateway that
    fails is logged and the others still run."""
    names = configured_gateways(payments)
    for name in names:  # every series from the start, so an alert sees the first increase
        for kind in DifferenceKind:
            DIFFERENCES.labels(name, kind.value)
        for outcome in ("ok", "failed"):
            NIGHTLY_RUNS.labels(name, outcome)

    async def reconcile_yesterday() -> None:
        day = (datetime.now(VIETNAM_TZ) - timedelta(days=1)).date()
        for name in names:
            try:
                await run_reconciliation(settings, payments, name, day, None)
            except Exception as exc:
                NIGHTLY_RUNS.labels(name, "failed").inc()
                log.warning("reconciliation_failed", gateway=name, error=str(exc)[:300])
            else:
                NIGHTLY_RUNS.labels(name, "ok").inc()

    return reconcile_yesterday
