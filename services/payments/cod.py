"""Postal cash (COD): the post office's remittance statement of one day against the fees its
carriers said they collected (`postal.cod_collected`), the pure part.

The remittance statement is a CSV file, UTF-8 (a BOM is allowed), one row per parcel whose cash
the post office hands over, with a header row:

    order_id        the carrier's order id (as in `postal.cod_collected` data.order_id)
    dossier_id      the dossier
    amount_vnd      the cash remitted, whole VND
    collected_at    when it was collected, RFC 3339 with an offset

The rows of one Vietnamese day (`collected_at`) are compared with the `postal.cod_collected`
events of that day (event time), matched by order id, else by dossier id:

- `missing_in_remittance`: collected, not remitted;
- `extra_in_remittance`: remitted, with no collection known;
- `amount_mismatch`: remitted another amount than collected.

Each difference is one `postal.cod_mismatch` event (id `<dossier>/cod/<day>/<kind>`: a day run
again announces the same events) and one row of the report.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Any

from services.common.events import CloudEvent, make_event
from services.common.tz import VIETNAM_TZ

COD_EVENT = "postal.cod_collected"
MISMATCH_EVENT = "postal.cod_mismatch"
SOURCE = "motcua/payments"
COLUMNS = ("order_id", "dossier_id", "amount_vnd", "collected_at")


class CodKind(StrEnum):
    MISSING_IN_REMITTANCE = "missing_in_remittance"
    EXTRA_IN_REMITTANCE = "extra_in_remittance"
    AMOUNT_MISMATCH = "amount_mismatch"


class RemittanceError(ValueError):
    """The file is not a remittance statement; the message names the line."""


@dataclass(frozen=True)
class Remitted:
    order_id: str
    dossier_id: str
    amount_vnd: int
    collected_at: datetime


@dataclass(frozen=True)
class Collected:
    """One `postal.cod_collected`: what the carrier said it collected, and when."""

    order_id: str
    dossier_id: str
    amount_vnd: int
    collected_at: datetime


@dataclass(frozen=True)
class CodDifference:
    kind: CodKind
    dossier_id: str
    order_id: str
    remitted_vnd: int | None
    collected_vnd: int | None


@dataclass(frozen=True)
class CodReconciliation:
    day: date
    remitted_rows: int
    collections: int
    matched: int
    differences: tuple[CodDifference, ...]
    remitted_vnd: int
    collected_vnd: int


def parse_remittance(text: str) -> list[Remitted]:
    """The rows of a remittance statement; `RemittanceError` naming the line otherwise."""
    reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff")))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise RemittanceError(f"line 1: the header lacks {', '.join(missing)}")
    rows: list[Remitted] = []
    for line, row in enumerate(reader, start=2):
        try:
            amount = int(row["amount_vnd"])
            at = datetime.fromisoformat(row["collected_at"].strip())
        except (TypeError, ValueError):
            raise RemittanceError(f"line {line}: amount_vnd or collected_at unreadable") from None
        if at.tzinfo is None or amount < 0 or not (row["dossier_id"] or "").strip():
            raise RemittanceError(
                f"line {line}: collected_at needs an offset, amount_vnd >= 0, a dossier_id"
            )
        rows.append(Remitted(row["order_id"].strip(), row["dossier_id"].strip(), amount, at))
    return rows


def vietnam_day(at: datetime) -> date:
    return at.astimezone(VIETNAM_TZ).date()


def days_of(rows: Sequence[Remitted]) -> set[date]:
    return {vietnam_day(r.collected_at) for r in rows}


def collected_of(event: Mapping[str, Any]) -> Collected | None:
    """The collection a decoded `postal.cod_collected` tells, or None (another type, no
    amount)."""
    if event.get("type") != COD_EVENT:
        return None
    data = event.get("data")
    if not isinstance(data, Mapping) or not isinstance(data.get("amount_vnd"), int):
        return None
    try:
        at = datetime.fromisoformat(str(event.get("time")))
    except ValueError:
        return None
    return Collected(
        order_id=str(data.get("order_id") or ""),
        dossier_id=str(data.get("dossier_id") or event.get("subject") or ""),
        amount_vnd=int(data["amount_vnd"]),
        collected_at=at,
    )


def reconcile_cod(
    day: date, remitted: Sequence[Remitted], collected: Iterable[Collected]
) -> CodReconciliation:
    """The differences of `day` between the remittance rows and the collections."""
    rows = [r for r in remitted if vietnam_day(r.collected_at) == day]
    seen = [c for c in collected if vietnam_day(c.collected_at) == day]
    by_order = {c.order_id: c for c in seen if c.order_id}
    by_dossier = {c.dossier_id: c for c in seen}
    used: set[int] = set()
    differences: list[CodDifference] = []
    matched = 0
    for row in rows:
        found = by_order.get(row.order_id) if row.order_id else None
        if found is None:
            candidate = by_dossier.get(row.dossier_id)
            if candidate is not None and (not row.order_id or not candidate.order_id):
                found = candidate
        if found is None or id(found) in used:
            differences.append(
                CodDifference(
                    CodKind.EXTRA_IN_REMITTANCE, row.dossier_id, row.order_id, row.amount_vnd, None
                )
            )
            continue
        used.add(id(found))
        if found.amount_vnd != row.amount_vnd:
            differences.append(
                CodDifference(
                    CodKind.AMOUNT_MISMATCH,
                    found.dossier_id,
                    found.order_id or row.order_id,
                    row.amount_vnd,
                    found.amount_vnd,
                )
            )
        else:
            matched += 1
    for c in seen:
        if id(c) not in used:
            differences.append(
                CodDifference(
                    CodKind.MISSING_IN_REMITTANCE, c.dossier_id, c.order_id, None, c.amount_vnd
                )
            )
    return CodReconciliation(
        day=day,
        remitted_rows=len(rows),
        collections=len(seen),
        matched=matched,
        differences=tuple(sorted(differences, key=lambda d: (d.kind, d.dossier_id, d.order_id))),
        remitted_vnd=sum(r.amount_vnd for r in rows),
        collected_vnd=sum(c.amount_vnd for c in seen),
    )


def mismatch_event(result: CodReconciliation, difference: CodDifference) -> CloudEvent[Any]:
    """One difference as `postal.cod_mismatch`: the same id and bytes each time the day runs
    (its time: the end of the reconciled day)."""
    end = datetime.combine(result.day, datetime.max.time().replace(microsecond=0))
    return make_event(
        MISMATCH_EVENT,
        source=SOURCE,
        id=f"{difference.dossier_id}/cod/{result.day.isoformat()}/{difference.kind.value}",
        subject=difference.dossier_id,
        time=end.replace(tzinfo=VIETNAM_TZ),
        data={
            "dossier_id": difference.dossier_id,
            "reason": difference.kind.value,
            "day": result.day.isoformat(),
            "order_id": difference.order_id,
            "remitted_vnd": difference.remitted_vnd,
            "collected_vnd": difference.collected_vnd,
        },
    )


def summary(result: CodReconciliation) -> dict[str, Any]:
    by_kind = {kind.value: 0 for kind in CodKind}
    for d in result.differences:
        by_kind[d.kind.value] += 1
    return {
        "date": result.day.isoformat(),
        "remitted_rows": result.remitted_rows,
        "collections": result.collections,
        "matched": result.matched,
        "differences": len(result.differences),
        "by_kind": by_kind,
        "remitted_vnd": result.remitted_vnd,
        "collected_vnd": result.collected_vnd,
    }


def report_csv(result: CodReconciliation) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(("kind", "dossier_id", "order_id", "remitted_vnd", "collected_vnd"))
    for d in result.differences:
        writer.writerow(
            (
                d.kind.value,
                d.dossier_id,
                d.order_id,
                "" if d.remitted_vnd is None else d.remitted_vnd,
                "" if d.collected_vnd is None else d.collected_vnd,
            )
        )
    return out.getvalue()
