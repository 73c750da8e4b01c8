"""The per-dossier state as bytes for the state table (and its changelog): only its facts.

Every other field of `DossierState` is derived from the facts (`domain.derive`), and `memo` is a
cache, so a record is a JSON array of facts, each a positional array with the event type as a
small number and trailing empty fields left out: about 60-90 bytes a fact. Timestamps keep their
offset (the `dossier.overdue` id repeats `due_at` as it was written).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from services.metrics.domain import DossierState, Fact, derive, minute_of

FORMAT = 1
# The small numbers of format 1, fixed: records already in the changelog use them. A type not in
# this table is stored by its name.
_TYPES = (
    "dossier.apology_issued",
    "dossier.overdue",
    "dossier.received",
    "dossier.rejected",
    "dossier.resolved",
    "dossier.result_returned",
    "dossier.submitted",
    "dossier.supplement_received",
    "dossier.supplement_requested",
    "dossier.transferred",
    "dossier.withdrawn",
    "payment.callback_rejected",
    "payment.expired",
    "payment.failed",
    "payment.reconciliation_mismatch",
    "payment.refund_required",
    "payment.refunded",
    "payment.requested",
    "payment.succeeded",
    "postal.cod_collected",
    "postal.delivered",
    "postal.delivered_to_agency",
    "postal.failed",
    "postal.out_for_delivery",
    "postal.picked_up",
    "postal.pickup_requested",
    "postal.return_requested",
    "postal.returned_to_agency",
    "sms.delivered",
    "sms.failed",
    "sms.queued",
    "sms.sent",
    "sms.suppressed",
)
_TYPE_CODES = {name: code for code, name in enumerate(_TYPES)}


def _when(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _fact(fact: Fact) -> list[Any]:
    row: list[Any] = [
        fact.key[0],
        fact.key[1],
        _TYPE_CODES.get(fact.type, fact.type),
        fact.time.isoformat(),
        fact.agency_code,
        fact.amount,
        _when(fact.at),
        _when(fact.due_at),
        fact.tier,
        fact.sector,
        fact.channel,
        fact.online_level,  # a record written before it was kept decodes as None
        fact.previous_score,  # of a survey answer, as the two after it
        _when(fact.previous_at),
    ]
    while row[-1] is None or (len(row) == 6 and row[-1] == 0):
        row.pop()
    return row


def encode_state(state: DossierState) -> bytes:
    return orjson.dumps([FORMAT, [_fact(fact) for fact in state.facts]])


def _moment(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def decode_state(dossier_id: str, raw: bytes) -> DossierState:
    version, rows = orjson.loads(raw)
    if version != FORMAT:
        raise ValueError(f"unknown metrics state format {version!r}")
    facts = []
    for row in rows:
        padded = [*row, *([None] * (14 - len(row)))]
        (source, id_, kind, time, agency, amount, at, due) = padded[:8]
        tier, sector, channel, level, previous_score, previous_at = padded[8:]
        moment = datetime.fromisoformat(time)
        facts.append(
            Fact(
                key=(source, id_),
                type=_TYPES[kind] if isinstance(kind, int) else kind,
                time=moment,
                agency_code=agency,
                amount=amount or 0,
                at=_moment(at),
                due_at=_moment(due),
                tier=tier,
                sector=sector,
                channel=channel,
                minute=minute_of(moment),
                online_level=level,
                previous_score=previous_score,
                previous_at=_moment(previous_at),
            )
        )
    return derive(dossier_id, facts)
