"""Postal cash reconciled: `motcua reconcile-cod FILE` and the daily job (the shell of `cod.py`).

A run reads the remittance statement, the `postal.cod_collected` events of its day from
`postal.events` (from two days before the day on, by broker time), writes the report
`cod-<day>.csv` and the summary `cod-<day>.json` under `PAYMENTS_RECONCILE_DIR`, and publishes
one `postal.cod_mismatch` per difference (acks=all; the same ids each time the day runs).

The daily job (`PAYMENTS_COD_CRON`, Vietnam time, on one payments process) reconciles yesterday
from `PAYMENTS_COD_INBOX/cod-remittance-<day>.csv`, where the post office's file is dropped; a
day without its file is logged (`cod_remittance_missing`) and counted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from pathlib import Path

import orjson
import typer
from prometheus_client import Counter

from services.common import topics
from services.common.changelog import read_to_end
from services.common.command_audit import AuditNotRecorded, audited_command
from services.common.events import AuditAction
from services.common.kafka import publish_once
from services.common.logging import get_logger
from services.common.settings import Settings
from services.common.tz import VIETNAM_TZ
from services.payments.cod import (
    CodReconciliation,
    Collected,
    RemittanceError,
    collected_of,
    days_of,
    mismatch_event,
    parse_remittance,
    reconcile_cod,
    report_csv,
    summary,
)
from services.payments.settings import PaymentsSettings

log = get_logger("motcua.payments.cod")

COD_DIFFERENCES = Counter(
    "motcua_payments_cod_differences_total",
    "Differences between the post office's remittances and the COD collected",
    ["kind"],
)
COD_RUNS = Counter(
    "motcua_payments_cod_runs_total", "Daily COD reconciliations by outcome", ["outcome"]
)
LOOK_BACK = timedelta(days=2)  # collections written late are read from this far before the day


@dataclass(frozen=True)
class CodOutcome:
    result: CodReconciliation
    report_path: Path
    summary_path: Path


async def collections_since(bootstrap: str, since: datetime) -> list[Collected]:
    found: list[Collected] = []
    since_ms = int(since.timestamp() * 1000)
    async for batch in read_to_end(bootstrap, topics.POSTAL_EVENTS, since_ms=since_ms):
        for records in batch.values():
            for record in records:
                try:
                    event = orjson.loads(record.value or b"")
                except orjson.JSONDecodeError:
                    continue
                if isinstance(event, dict) and (c := collected_of(event)) is not None:
                    found.append(c)
    return found


async def run_cod(
    settings: Settings, payments: PaymentsSettings, file: Path, day: date | None, out: Path | None
) -> CodOutcome:
    text = await asyncio.to_thread(file.read_text, encoding="utf-8")
    rows = parse_remittance(text)
    if day is None:
        days = days_of(rows)
        if len(days) != 1:
            raise RemittanceError(
                f"the file covers {len(days)} days; name the one to reconcile (--date)"
            )
        (day,) = days
    start = datetime.combine(day, time(), tzinfo=VIETNAM_TZ)
    collected = await collections_since(settings.kafka_bootstrap, start - LOOK_BACK)
    result = reconcile_cod(day, rows, collected)
    for difference in result.differences:
        COD_DIFFERENCES.labels(difference.kind.value).inc()
    directory = out or Path(payments.reconcile_dir)
    report_path = directory / f"cod-{day.isoformat()}.csv"
    summary_path = directory / f"cod-{day.isoformat()}.json"

    def write() -> None:
        directory.mkdir(parents=True, exist_ok=True)
        report_path.write_text(report_csv(result), encoding="utf-8")
        summary_path.write_text(json.dumps(summary(result), indent=2) + "\n", encoding="utf-8")

    await asyncio.to_thread(write)
    if result.differences:
        events = [mismatch_event(result, d) for d in result.differences]
        await publish_once(
            settings.kafka_bootstrap, [(e.topic, e.key, e.to_json()) for e in events]
        )
    log.info("cod_reconciled", date=day.isoformat(), differences=len(result.differences))
    return CodOutcome(result, report_path, summary_path)


def reconcile_cod_command(
    settings: Settings, file: Path, day_text: str | None, out: Path | None
) -> int:
    """`motcua reconcile-cod FILE`: prints the summary as JSON; 0 when it ran, 2 on bad input, 1
    when its audit record was not acknowledged. A run is recorded as `audit.reconciliation_run`
    with target `cod/<day>` (`cod/undated` when it failed before the file named its day; actor
    `cli/<OS user>`); a malformed --date runs nothing and records nothing."""
    try:
        day = date.fromisoformat(day_text) if day_text else None
    except ValueError:
        typer.echo(f"--date {day_text!r} is not YYYY-MM-DD", err=True)
        return 2

    def run() -> Awaitable[CodOutcome]:
        return run_cod(settings, PaymentsSettings(), file, day, out)

    def target(done: CodOutcome | None) -> str:
        ran = done.result.day if done is not None else day
        return f"cod/{ran.isoformat() if ran is not None else 'undated'}"

    action = AuditAction.RECONCILIATION_RUN
    unrecorded: AuditNotRecorded | None = None
    try:
        outcome = asyncio.run(audited_command(settings.kafka_bootstrap, action, target, run))
    except AuditNotRecorded as exc:
        outcome, unrecorded = exc.result, exc
    except (ValueError, OSError) as exc:
        typer.echo(f"COD reconciliation failed: {exc}", err=True)
        return 2
    typer.echo(json.dumps(summary(outcome.result)))
    typer.echo(f"report: {outcome.report_path}", err=True)
    if unrecorded is not None:
        typer.echo(f"the broker did not acknowledge its audit record ({unrecorded})", err=True)
        return 1
    return 0


def remittance_file(payments: PaymentsSettings, day: date) -> Path:
    return Path(payments.cod_inbox) / f"cod-remittance-{day.isoformat()}.csv"


def daily_cod(settings: Settings, payments: PaymentsSettings) -> Callable[[], Awaitable[None]]:
    """The daily job: yesterday's remittance (Vietnam time) from the inbox."""
    for outcome in ("ok", "missing", "failed"):
        COD_RUNS.labels(outcome)

    async def reconcile_yesterday() -> None:
        day = (datetime.now(VIETNAM_TZ) - timedelta(days=1)).date()
        file = remittance_file(payments, day)
        if not file.exists():
            COD_RUNS.labels("missing").inc()
            log.warning("cod_remittance_missing", date=day.isoformat(), file=str(file))
            return
        try:
            await run_cod(settings, payments, file, day, None)
        except (ValueError, OSError) as exc:
            COD_RUNS.labels("failed").inc()
            log.warning("cod_reconciliation_failed", date=day.isoformat(), error=str(exc)[:300])
            return
        COD_RUNS.labels("ok").inc()

    return reconcile_yesterday
