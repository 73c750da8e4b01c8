"""The ledger: one record per dossier's payment, its outgoing events and where they are published.

- `LedgerRecord` is the payment, where to pay it and how far its events are published
  (`published_version`): the outbox. Each version of a payment is one event with an id derived
  from the dossier and the version (`outgoing_event`), so a crash between the write and the
  publish republishes the same ids.
- The records live in a `StateTable` on the compacted changelog
  `topics.PAYMENTS_LEDGER_CHANGELOG` (value: the record's JSON, key: the dossier id), which the
  batch consumer writes after each poll's handler and before its commit, and which the daily
  reconciliation reads back whole (`reconciliation.read_ledger`).
- `OrderSnapshots` keeps a copy of each record in Redis by txn ref: what the webhook decides an
  IPN on (read in the claim's round trip) and what `/pay/{txn_ref}` redirects with.
- `Ledger` keeps what a poll changed and, once the poll's work is done, copies the changed
  records to Redis and publishes their outboxes, all of them at once (`publish_pending`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import orjson
import redis.asyncio as aioredis
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, TypeAdapter

from services.common import topics
from services.common.coordination import Keys
from services.common.events import CloudEvent, make_event
from services.common.kafka import DurablePublisher
from services.common.logging import get_logger
from services.common.settings import Settings
from services.common.state import StateTable
from services.common.tz import VIETNAM_TZ
from services.payments.domain import (
    REFUND_REQUIRED_EVENT,
    REQUESTED_EVENT,
    GatewayNotification,
    HistoryEntry,
    Payment,
    PaymentState,
)

log = get_logger("motcua.payments")

SOURCE = "motcua/payments"
CALLBACK_REJECTED_EVENT = "payment.callback_rejected"
# Decoded records kept beside their bytes (the worker and the sweeper read the same ones).
LEDGER_CACHE_SIZE = 20_000

MISMATCHES = Counter(
    "motcua_payments_amount_mismatches_total", "Callbacks refused for amount/currency/merchant"
)

Publish = Callable[[Sequence[CloudEvent[Any]]], Awaitable[None]]

# The event each state is entered with (every edge into a state carries the same type).
EVENT_OF_STATE: dict[PaymentState, str] = {
    PaymentState.REQUESTED: REQUESTED_EVENT,
    PaymentState.SUCCEEDED: "payment.succeeded",
    PaymentState.FAILED: "payment.failed",
    PaymentState.EXPIRED: "payment.expired",
    PaymentState.REFUND_REQUIRED: REFUND_REQUIRED_EVENT,
    PaymentState.REFUNDED: "payment.refunded",
}


class LedgerRecord(BaseModel):
    """One ledger row: the payment, where to pay it, and how far its events are published."""

    model_config = ConfigDict(frozen=True)

    payment: Payment
    agency_code: str
    payment_url: str
    published_version: int = 0

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> LedgerRecord:
        return cls.model_validate_json(raw)

    @property
    def unpublished(self) -> range:
        """The versions whose events are not yet acknowledged by the broker."""
        return range(self.published_version + 1, self.payment.version + 1)


# --- the outgoing events (pure) ------------------------------------------------------------------


def event_id(dossier_id: str, version: int) -> str:
    return f"{dossier_id}/payment/{version}"


def short_url(public_url: str, txn_ref: str) -> str:
    """A link that fits an SMS: the service redirects it to the gateway's payment page."""
    return f"{public_url.rstrip('/')}/pay/{txn_ref}"


def outgoing_event(
    record: LedgerRecord, version: int, public_url: str | None = None
) -> CloudEvent[Any]:
    """The event of one version of a payment: deterministic id, data from the history entry."""
    p = record.payment
    entry: HistoryEntry = p.history[version - 1]
    data: dict[str, Any] = {
        "dossier_id": p.dossier_id,
        "amount_vnd": p.amount_vnd,
        "gateway": p.gateway,
        "txn_ref": p.txn_ref,
        "currency": p.currency,
        "version": version,
        "gateway_ref": entry.event_ref,
    }
    if entry.state == PaymentState.REQUESTED:
        data["payment_url"] = record.payment_url
        if public_url:
            data["short_url"] = short_url(public_url, p.txn_ref)
        data["expires_at"] = p.expires_at.isoformat()
        data["agency_code"] = record.agency_code
    elif entry.state in (PaymentState.SUCCEEDED, PaymentState.REFUND_REQUIRED):
        data["paid_at"] = entry.at.isoformat()
    if entry.state == PaymentState.FAILED:
        data["reason"] = entry.reason or "failed"
    elif entry.state == PaymentState.REFUND_REQUIRED:
        data["reason"] = "paid_after_order_closed"
    return make_event(
        EVENT_OF_STATE[entry.state],
        source=SOURCE,
        id=event_id(p.dossier_id, version),
        subject=p.dossier_id,
        time=entry.at,
        data=data,
    )


_NOTIFICATION = TypeAdapter(GatewayNotification)


def callback_rejected_event(
    payment: Payment, note: GatewayNotification, fields: Sequence[str], via: str, at: datetime
) -> CloudEvent[Any]:
    """The alert for a notification that disagrees with its order (one id per notification)."""
    digest = hashlib.sha256(orjson.dumps(_NOTIFICATION.dump_python(note, mode="json"))).hexdigest()[
        :16
    ]
    return make_event(
        CALLBACK_REJECTED_EVENT,
        source=SOURCE,
        id=f"{payment.dossier_id}/rejected/{digest}",
        subject=payment.dossier_id,
        time=at,
        data={
            "dossier_id": payment.dossier_id,
            "reason": "mismatch:" + ",".join(fields),
            "amount_vnd": payment.amount_vnd,
            "notified_amount_vnd": note.amount_vnd,
            "gateway": note.gateway,
            "txn_ref": note.txn_ref,
            "via": via,
        },
    )


# --- where records live --------------------------------------------------------------------------


def ledger_table(settings: Settings, publisher: DurablePublisher) -> StateTable[LedgerRecord]:
    """The ledger's records on their changelog (co-partitioned with `dossier.events`)."""
    return StateTable.on_changelog(
        settings,
        publisher,
        topics.PAYMENTS_LEDGER_CHANGELOG,
        encode=LedgerRecord.to_bytes,
        decode=lambda _dossier_id, raw: LedgerRecord.from_bytes(raw),
        cache_size=LEDGER_CACHE_SIZE,
    )


class OrderSnapshots:
    """Each order's latest record in Redis, by txn ref, for as long as its IPNs are deduplicated."""

    def __init__(self, client: aioredis.Redis, keys: Keys, ttl_seconds: int) -> None:
        self._client = client
        self._keys = keys
        self._ttl = ttl_seconds

    def key(self, txn_ref: str) -> str:
        return self._keys("payments", "order", txn_ref)

    async def save(self, records: Sequence[LedgerRecord]) -> None:
        """Copy `records` in one round trip."""
        if not records:
            return
        pipe = self._client.pipeline(transaction=False)
        for record in records:
            pipe.set(self.key(record.payment.txn_ref), record.to_bytes(), ex=self._ttl)
        await pipe.execute()

    async def get(self, txn_ref: str) -> LedgerRecord | None:
        raw = await self._client.get(self.key(txn_ref))  # bytes: decode_responses is off
        return LedgerRecord.model_validate_json(raw) if raw else None


class Ledger:
    """The table, its Redis copies and its outbox: every write goes through `write`, and
    `publish_pending` finishes what the writes started."""

    def __init__(
        self,
        table: StateTable[LedgerRecord],
        snapshots: OrderSnapshots,
        publish: Publish,
        public_url: str | None,
    ) -> None:
        self.table = table
        self.snapshots = snapshots
        self._publish = publish
        self._public_url = public_url
        self._pending: set[str] = set()  # dossiers written since the last `publish_pending`

    def get(self, dossier_id: str) -> LedgerRecord | None:
        return self.table.get(dossier_id)

    def write(self, record: LedgerRecord) -> None:
        """Keep `record` (the batch consumer writes it to the changelog before its commit); its
        Redis copy and its events follow in `publish_pending`."""
        dossier_id = record.payment.dossier_id
        self.table.put(dossier_id, record)
        self._pending.add(dossier_id)

    def flush(self, record: LedgerRecord) -> None:
        """Have `publish_pending` publish whatever `record` has not published yet."""
        if record.unpublished:
            self._pending.add(record.payment.dossier_id)

    async def publish_pending(self) -> None:
        """Copy the records written since the last call to Redis, publish every version not yet
        published (acks=all, a dossier's in order), then mark them published in the table."""
        pending, self._pending = self._pending, set()
        records = [r for d in pending if (r := self.table.get(d)) is not None]
        try:
            await self.snapshots.save(records)
            await self._publish(
                [
                    outgoing_event(record, version, self._public_url)
                    for record in records
                    for version in record.unpublished
                ]
            )
        except BaseException:
            self._pending |= pending  # still to do: the retry's writes find them again
            raise
        for record in records:
            if record.unpublished:
                done = record.model_copy(update={"published_version": record.payment.version})
                self.table.put(record.payment.dossier_id, done)

    async def reject_callback(
        self, payment: Payment, note: GatewayNotification, fields: Sequence[str], via: str
    ) -> None:
        """Count, log and announce a notification whose amount, currency or merchant is wrong."""
        MISMATCHES.inc()
        log.warning(
            "callback_mismatch", dossier_id=payment.dossier_id, fields=",".join(fields), via=via
        )
        at = datetime.now(VIETNAM_TZ)
        await self._publish([callback_rejected_event(payment, note, fields, via, at)])
