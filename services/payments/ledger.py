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
  IPN on (read in the claim's round trip) and what `/pay/{txn_ref}` redirects with. Redis is a
  copy only: when it misses, `Ledger.lookup` answers from the table by txn ref, and says when it
  cannot be sure (this member does not hold, or has not restored, every partition); a timer
  puts back the copies of a member's records once Redis lost them (`Ledger.heal_snapshots`).
- `Ledger` keeps what a poll changed and, once the poll's work is done, copies the changed
  records to Redis and publishes their outboxes, all of them at once (`publish_pending`).
- Retirement: a record whose story is over (`record_retire_at`: settled, its events published,
  past its late-success window and `PAYMENTS_RETIRE_AFTER_SECONDS`) is due in `retiring` (a
  `DueIndex`, rebuilt on every restore); the sweeper then sends a `retire` callback, and the
  worker retires it (`retire`): the table forgets it (its tombstone is written before the
  commit) and its Redis copy is saved again, so that it stays `PAYMENTS_IPN_DEDUPE_TTL_SECONDS`
  longer: what a late IPN is answered on (02, already confirmed) and what a submission read
  again finds (no second order). `motcua_states_live{service="payments"}` and
  `motcua_states_retired_total{service="payments"}` count them.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson
import redis.asyncio as aioredis
from aiokafka.structs import TopicPartition
from prometheus_client import Counter
from pydantic import BaseModel, ConfigDict, TypeAdapter
from redis.exceptions import RedisError

from services.common import topics, tracing
from services.common.coordination import Keys
from services.common.due import DueIndex
from services.common.events import CloudEvent, make_event
from services.common.kafka import DurablePublisher
from services.common.logging import get_logger
from services.common.settings import Settings
from services.common.state import STATES_LIVE, STATES_RETIRED, StateTable
from services.payments.domain import (
    REFUND_FAILED_EVENT,
    REFUND_REQUESTED_EVENT,
    REFUND_REQUIRED_EVENT,
    REQUESTED_EVENT,
    GatewayNotification,
    HistoryEntry,
    Payment,
    PaymentState,
    Retirement,
    refunded_vnd,
    retire_at,
    txn_ref_for,
)
from services.payments.receipts import ReceiptRequest, request_message

log = get_logger("motcua.payments")

PublishRaw = Callable[[Sequence[tuple[str, bytes | None, bytes | None]]], Awaitable[Any]]

SOURCE = "motcua/payments"
SERVICE = "payments"
CALLBACK_REJECTED_EVENT = "payment.callback_rejected"
# Decoded records kept beside their bytes (the worker and the sweeper read the same ones).
LEDGER_CACHE_SIZE = 20_000
# A member's marker that its records' Redis copies are there; refreshed at every check.
SNAPSHOT_MARKER_SECONDS = 3600

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
    PaymentState.REFUND_REQUESTED: REFUND_REQUESTED_EVENT,
    PaymentState.PARTIALLY_REFUNDED: "payment.refunded",
    PaymentState.REFUND_FAILED: REFUND_FAILED_EVENT,
}
# The states a refund finance started enters: their events name the refund and its amount.
REFUND_STATES = frozenset(
    {
        PaymentState.REFUND_REQUESTED,
        PaymentState.PARTIALLY_REFUNDED,
        PaymentState.REFUND_FAILED,
    }
)


class LedgerRecord(BaseModel):
    """One ledger row: the payment, where to pay it, and how far its events are published."""

    model_config = ConfigDict(frozen=True)

    payment: Payment
    agency_code: str
    payment_url: str
    published_version: int = 0
    # the trace context (`traceparent`...) of the input that made the latest version, for its
    # event; None when that input was not traced (and then not written)
    trace: dict[str, str] | None = None

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude={"trace"} if self.trace is None else None).encode()

    @classmethod
    def from_bytes(cls, raw: bytes) -> LedgerRecord:
        return cls.model_validate_json(raw)

    @property
    def unpublished(self) -> range:
        """The versions whose events are not yet acknowledged by the broker."""
        return range(self.published_version + 1, self.payment.version + 1)


def receipt_request(record: LedgerRecord, version: int) -> ReceiptRequest | None:
    """The receipt a version asks for: the one that made the payment succeed."""
    p = record.payment
    entry = p.history[version - 1]
    if entry.state != PaymentState.SUCCEEDED:
        return None
    return ReceiptRequest(
        dossier_id=p.dossier_id,
        agency_code=record.agency_code,
        amount_vnd=p.amount_vnd,
        currency=p.currency,
        paid_at=entry.at,
        txn_ref=p.txn_ref,
        gateway=p.gateway,
    )


def record_retire_at(record: LedgerRecord, retirement: Retirement) -> datetime | None:
    """From when a ledger record may leave (None: not over, or events still to publish)."""
    return None if record.unpublished else retire_at(record.payment, retirement)


# --- the outgoing events (pure) ------------------------------------------------------------------


def event_id(dossier_id: str, version: int) -> str:
    return f"{dossier_id}/payment/{version}"


# The short payment link's route (served by `routes.py`, routed by the public Ingress).
PAY_PATH = "/pay/{txn_ref}"


def short_url(public_url: str, txn_ref: str) -> str:
    """A link that fits an SMS: the service redirects it to the gateway's payment page."""
    return public_url.rstrip("/") + PAY_PATH.format(txn_ref=txn_ref)


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
        data["reason"] = entry.reason or "paid_after_order_closed"
    if entry.state in REFUND_STATES or entry.amount_vnd is not None:
        so_far = p.model_copy(update={"history": p.history[:version]})
        data["state"] = entry.state.value
        data["refund_id"] = entry.event_ref
        data["refund_amount_vnd"] = entry.amount_vnd
        data["refunded_vnd"] = refunded_vnd(so_far)
        if entry.reason:
            data["reason"] = entry.reason
    elif entry.state == PaymentState.REFUNDED:
        data["refunded_vnd"] = p.amount_vnd
    return make_event(
        EVENT_OF_STATE[entry.state],
        source=SOURCE,
        id=event_id(p.dossier_id, version),
        subject=p.dossier_id,
        time=entry.at,
        data=data,
        trace=record.trace if version == p.version else None,
    )


_NOTIFICATION = TypeAdapter(GatewayNotification)


def callback_rejected_event(
    payment: Payment, note: GatewayNotification, fields: Sequence[str], via: str
) -> CloudEvent[Any]:
    """The alert for a notification that disagrees with its order: one id per notification, and
    a body from the notification and the order alone (its time: the gateway's pay time, else the
    order's creation), so the webhook and the worker announcing it twice send the same bytes."""
    at: datetime = note.paid_at or payment.created_at
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

    async def get_many(self, txn_refs: Sequence[str]) -> dict[str, LedgerRecord]:
        """The copies there are of `txn_refs`, by txn ref, in one round trip."""
        if not txn_refs:
            return {}
        raws = await self._client.mget([self.key(ref) for ref in txn_refs])
        return {
            ref: LedgerRecord.model_validate_json(raw)
            for ref, raw in zip(txn_refs, raws, strict=True)
            if raw
        }

    async def still_there(self, marker: str, ttl_seconds: int) -> bool:
        """Whether the copies a member put back are still in Redis: its `marker` key is there
        (and is kept another `ttl_seconds`); False once Redis restarted empty."""
        key = self._keys("payments", "snapshots", marker)
        return bool(await self._client.set(key, b"1", xx=True, ex=ttl_seconds))

    async def save_missing(self, copies: Sequence[tuple[str, bytes]], chunk: int = 1000) -> None:
        """Put back (txn ref, record bytes) copies Redis lacks, never over one there (another
        member may have written a newer one)."""
        for start in range(0, len(copies), chunk):
            pipe = self._client.pipeline(transaction=False)
            for txn_ref, raw in copies[start : start + chunk]:
                pipe.set(self.key(txn_ref), raw, ex=self._ttl, nx=True)
            await pipe.execute()

    async def mark(self, marker: str, ttl_seconds: int) -> None:
        await self._client.set(self._keys("payments", "snapshots", marker), b"1", ex=ttl_seconds)


@dataclass(frozen=True)
class LedgerLookup:
    """A record looked up by txn ref in this member's table. `complete`: the table holds every
    partition, restored, so a record it lacks exists nowhere (else it may be another member's)."""

    record: LedgerRecord | None
    complete: bool


class Ledger:
    """The table, its Redis copies and its outbox: every write goes through `write`, and
    `publish_pending` finishes what the writes started."""

    def __init__(
        self,
        table: StateTable[LedgerRecord],
        snapshots: OrderSnapshots,
        publish: Publish,
        public_url: str | None,
        *,
        partitions: int = 1,
        retirement: Retirement | None = None,
        receipts: PublishRaw | None = None,
    ) -> None:
        self.table = table
        self._receipts = receipts  # where receipts are asked for (`receipts.py`)
        self.snapshots = snapshots
        self._publish = publish
        self._public_url = public_url
        self._pending: set[str] = set()  # dossiers written since the last `publish_pending`
        self._partitions = partitions  # of the changelog (and of every input topic)
        self._held: frozenset[int] = frozenset()  # partitions restored into the table
        self._ready: Callable[[], bool] = lambda: False  # the consumer's: assigned and restored
        self._by_txn_ref: dict[str, str] = {}  # txn ref -> dossier id (may hold stale entries)
        self._restores = 0  # assignments restored so far
        self._healed: int | None = None  # the restore whose records were last put back in Redis
        self._marker = uuid.uuid4().hex  # this member's "my copies are in Redis" key
        self.retirement = retirement or Retirement()
        self.retiring = DueIndex()  # dossier id -> when its record may leave
        self._retired: dict[str, LedgerRecord] = {}  # retired since the last `publish_pending`

    def follow(self, ready: Callable[[], bool]) -> None:
        """Trust the table's completeness only while `ready()` (the batch consumer's)."""
        self._ready = ready

    async def restored(self, assigned: Collection[TopicPartition]) -> None:
        """The batch consumer's `after_restore`: the table now holds these partitions."""
        self._held = frozenset(tp.partition for tp in assigned)
        self._by_txn_ref = {txn_ref_for(dossier_id): dossier_id for dossier_id in self.table}
        self._restores += 1
        self._retired = {}
        self.retiring.clear()
        for dossier_id, record in self.table.readable():
            self.retiring.set(dossier_id, record_retire_at(record, self.retirement))
        STATES_LIVE.labels(SERVICE).set(len(self.table))

    async def heal_snapshots(self) -> None:
        """A timer's job: once per assignment, and again whenever Redis lost them (restarted
        empty), put back the Redis copies of the records this member holds, so the webhook and
        `/pay` of every member find them again. One Redis round trip when nothing was lost."""
        if not self._ready():
            return
        try:
            if self._healed == self._restores and await self.snapshots.still_there(
                self._marker, SNAPSHOT_MARKER_SECONDS
            ):
                return
            restores = self._restores
            copies = [(txn_ref_for(d), raw) for d, raw in self.table.items_raw()]
            await self.snapshots.save_missing(copies)
            await self.snapshots.mark(self._marker, SNAPSHOT_MARKER_SECONDS)
        except (RedisError, OSError) as exc:
            log.warning("snapshots_not_restored", error_type=type(exc).__name__)
            return
        self._healed = restores
        log.info("snapshots_restored", records=len(copies))

    def lookup(self, txn_ref: str) -> LedgerLookup:
        """The record of `txn_ref` in this member's table, and whether a miss is final."""
        dossier_id = self._by_txn_ref.get(txn_ref)
        record = self.table.get(dossier_id) if dossier_id is not None else None
        if record is not None and record.payment.txn_ref != txn_ref:
            record = None
        complete = self._ready() and self._held >= frozenset(range(self._partitions))
        return LedgerLookup(record, complete)

    def get(self, dossier_id: str) -> LedgerRecord | None:
        return self.table.get(dossier_id)

    def write(self, record: LedgerRecord) -> None:
        """Keep `record` (the batch consumer writes it to the changelog before its commit); its
        Redis copy and its events follow in `publish_pending`."""
        dossier_id = record.payment.dossier_id
        trace = tracing.current_attributes()  # the input being handled, when it is traced
        if trace != record.trace:
            record = record.model_copy(update={"trace": trace})
        self.table.put(dossier_id, record)
        self._by_txn_ref[record.payment.txn_ref] = dossier_id
        self._pending.add(dossier_id)
        self.retiring.set(dossier_id, record_retire_at(record, self.retirement))

    def retire(self, record: LedgerRecord) -> None:
        """The record leaves the table (a tombstone goes with the poll's writes); its Redis copy
        is saved again by `publish_pending`, so it outlives the record."""
        dossier_id = record.payment.dossier_id
        self.table.delete(dossier_id)
        self.retiring.set(dossier_id, None)
        if self._by_txn_ref.get(record.payment.txn_ref) == dossier_id:
            del self._by_txn_ref[record.payment.txn_ref]
        self._pending.discard(dossier_id)
        self._retired[dossier_id] = record

    def flush(self, record: LedgerRecord) -> None:
        """Have `publish_pending` publish whatever `record` has not published yet."""
        if record.unpublished:
            self._pending.add(record.payment.dossier_id)

    async def publish_pending(self) -> None:
        """Copy the records written since the last call to Redis, publish every version not yet
        published (acks=all, a dossier's in order), then mark them published in the table."""
        pending, self._pending = self._pending, set()
        # retired, and not put back meanwhile (a failed attempt's changes are rolled back)
        retired = [r for d, r in self._retired.items() if d not in self.table]
        self._retired = {}
        records = [r for d in pending if (r := self.table.get(d)) is not None]
        try:
            await self.snapshots.save(records + retired)
            await self._publish(
                [
                    outgoing_event(record, version, self._public_url)
                    for record in records
                    for version in record.unpublished
                ]
            )
            if self._receipts is not None:  # after the payment.succeeded it follows
                asked = [
                    request_message(request)
                    for record in records
                    for version in record.unpublished
                    if (request := receipt_request(record, version)) is not None
                ]
                if asked:
                    await self._receipts(asked)
        except BaseException:
            self._pending |= pending  # still to do: the retry's writes find them again
            self._retired |= {r.payment.dossier_id: r for r in retired}
            raise
        for record in records:
            if record.unpublished:
                done = record.model_copy(update={"published_version": record.payment.version})
                self.table.put(record.payment.dossier_id, done)
                self.retiring.set(
                    record.payment.dossier_id, record_retire_at(done, self.retirement)
                )
        if retired:
            STATES_RETIRED.labels(SERVICE).inc(len(retired))
        STATES_LIVE.labels(SERVICE).set(len(self.table))

    async def reject_callback(
        self, payment: Payment, note: GatewayNotification, fields: Sequence[str], via: str
    ) -> None:
        """Count, log and announce a notification whose amount, currency or merchant is wrong."""
        MISMATCHES.inc()
        log.warning(
            "callback_mismatch", dossier_id=payment.dossier_id, fields=",".join(fields), via=via
        )
        await self._publish([callback_rejected_event(payment, note, fields, via)])
