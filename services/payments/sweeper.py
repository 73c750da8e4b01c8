"""The payments timer: what the gateways did not tell on their own, asked and handed to the worker.

Every `PAYMENTS_SWEEP_INTERVAL_SECONDS`, over the ledger records this member holds:

- an order still `requested` is queried at the gateway on its schedule (`domain.check_plan`),
  and expired only once the last query found no payment (a failed query is retried on the next
  sweep: an order is never expired without asking);
- an `expired` order is queried again later (`PAYMENTS_LATE_QUERY_OFFSETS_SECONDS`): a payment
  whose IPN was lost shows up there, and is then refunded;
- a `refund_required` payment is refunded at the gateway when it refunds itself
  (`domain.refunds_itself`: money taken after the order closed, or the fee of a dossier
  withdrawn or rejected after payment in an agency of `PAYMENTS_AUTO_REFUND_AGENCIES`);
- a refund finance asked for (`refund_requested`) is asked of the gateway, by its id and amount;
  the answer goes to the worker as `refund_confirmed` or `refund_refused`;
- a record whose outbox was left unpublished gets a `flush` message;
- a record whose retirement is due (`Ledger.retiring`) gets a `retire` message.

The sweeper changes no record itself: a query's answer, an expiry and a confirmed refund are
messages on `payments.callbacks`, applied by the worker like every other change.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from prometheus_client import Counter

from services.common import topics
from services.common.due import DueIndex
from services.common.kafka import DurablePublisher
from services.common.logging import get_logger
from services.common.partner import PartnerError
from services.common.state import StateTable
from services.common.tz import VIETNAM_TZ
from services.payments.callbacks import CallbackMessage, notification_message
from services.payments.domain import (
    Payment,
    PaymentState,
    check_plan,
    checks_due,
    pending_refund,
    refunds_itself,
)
from services.payments.ledger import LedgerRecord
from services.payments.partner import Gateway
from services.payments.settings import PaymentsSettings

log = get_logger("motcua.payments")

# Gateway calls in flight at once during one sweep.
SWEEP_CONCURRENCY = 16
# A refund confirmed to the worker is not asked for again before this long (the worker applies
# the confirmation meanwhile; a repeated refund is harmless, the gateways answer it as done).
REFUND_QUIET = timedelta(seconds=60)
# `retire` messages per publish.
RETIRE_CHUNK = 5000

QUERIES = Counter("motcua_payments_queries_total", "Gateway status queries", ["gateway", "result"])
REFUNDS = Counter(
    "motcua_payments_refund_calls_total", "Gateway refund calls", ["gateway", "result"]
)


def refund_key(payment: Payment) -> str:
    """Which refund of a payment a gateway call was for: its late money, or the refund finance
    asked for that is under way (a payment may have several, one after the other)."""
    pending = pending_refund(payment)
    return payment.dossier_id if pending is None else f"{payment.dossier_id}/{pending.event_ref}"


class Sweeper:
    """Queries, expiries and refunds of the orders in the ledger (`sweep`, the timer's job)."""

    def __init__(
        self,
        ledger: StateTable[LedgerRecord],
        gateways: Mapping[str, Gateway],
        conf: PaymentsSettings,
        publisher: DurablePublisher,
        retiring: DueIndex | None = None,
    ) -> None:
        self.ledger = ledger
        self.retiring = retiring
        self.gateways = gateways
        self.conf = conf
        self.publisher = publisher
        self._last_sweep = datetime(1970, 1, 1, tzinfo=UTC)
        self._retry_expire: set[str] = set()
        self._refund_sent: dict[str, datetime] = {}  # by `refund_key`

    async def send(self, message: CallbackMessage) -> None:
        await self.publisher.publish(
            [(topics.PAYMENT_CALLBACKS, message.dossier_id.encode(), message.to_bytes())]
        )

    async def retire_due(self, now: datetime) -> None:
        """A `retire` message for every record whose retirement is due (the worker re-checks)."""
        if self.retiring is None:
            return
        due = self.retiring.pop_due(now)
        try:
            for start in range(0, len(due), RETIRE_CHUNK):
                await self.publisher.publish(
                    [
                        (
                            topics.PAYMENT_CALLBACKS,
                            d.encode(),
                            CallbackMessage(
                                kind="retire", dossier_id=d, at=now, ref="retire"
                            ).to_bytes(),
                        )
                        for d in due[start : start + RETIRE_CHUNK]
                    ]
                )
        except BaseException:
            for dossier_id in due:  # the next sweep sends them (again: the worker re-checks)
                self.retiring.set(dossier_id, now)
            raise

    async def sweep(self) -> None:
        now = datetime.now(VIETNAM_TZ)
        last, self._last_sweep = self._last_sweep, now
        await self.retire_due(now)
        in_hand = self.ledger.unsaved  # being changed by the poll in hand: looked at next time
        work: list[tuple[LedgerRecord, str]] = []
        refunding: set[str] = set()
        for dossier_id, _ in self.ledger.items_raw():
            record = self.ledger.get(dossier_id)
            if record is None or dossier_id in in_hand:
                continue
            p = record.payment
            if record.unpublished:
                await self.send(
                    CallbackMessage(kind="flush", dossier_id=dossier_id, at=now, ref="flush")
                )
            if p.state == PaymentState.REQUESTED:
                due = checks_due(
                    check_plan(p.created_at, p.expires_at, self.conf.schedule), last, now
                )
                actions = {c.action for c in due}
                if dossier_id in self._retry_expire:
                    actions.add("expire")
                if actions:
                    work.append((record, "expire" if "expire" in actions else "query"))
            elif p.state == PaymentState.EXPIRED:
                if self.conf.late_query_due(p.expires_at, last, now):
                    work.append((record, "query"))
            elif p.state == PaymentState.REFUND_REQUESTED or refunds_itself(
                p, record.agency_code in self.conf.auto_refund_agencies
            ):
                key = refund_key(p)
                refunding.add(key)
                sent = self._refund_sent.get(key)
                if sent is None or now - sent > REFUND_QUIET:
                    work.append((record, "refund"))
        # refunds the worker applied since: forget them
        self._refund_sent = {d: t for d, t in self._refund_sent.items() if d in refunding}
        if not work:
            return
        limit = asyncio.Semaphore(SWEEP_CONCURRENCY)

        async def one(record: LedgerRecord, action: str) -> None:
            async with limit:
                try:
                    if action == "refund":
                        await self.refund(record)
                    else:
                        await self.query(record, expire=action == "expire")
                except Exception as exc:  # a sweep never dies on one order
                    log.warning(
                        "sweep_check_failed",
                        dossier_id=record.payment.dossier_id,
                        error=str(exc)[:200],
                    )

        await asyncio.gather(*(one(r, a) for r, a in work))

    async def query(self, record: LedgerRecord, *, expire: bool) -> None:
        """Ask the gateway; its final word goes to the worker, else (when `expire`) the expiry."""
        p = record.payment
        gateway = self.gateways[p.gateway]
        try:
            note = await gateway.query(p)
        except PartnerError as exc:
            QUERIES.labels(gateway.name, "error").inc()
            log.warning("query_failed", dossier_id=p.dossier_id, error=str(exc))
            if expire:
                self._retry_expire.add(p.dossier_id)  # never expire without asking
            return
        QUERIES.labels(gateway.name, "final" if note else "pending").inc()
        self._retry_expire.discard(p.dossier_id)
        now = datetime.now(VIETNAM_TZ)
        if note is not None:
            await self.send(notification_message(note, p.dossier_id, now, "query"))
        elif expire:
            await self.send(
                CallbackMessage(kind="expire", dossier_id=p.dossier_id, at=now, ref="expiry")
            )

    async def refund(self, record: LedgerRecord) -> None:
        """Hand late money back; once the gateway confirms, the worker applies `refund_confirmed`
        (a refusal or an error: the next sweep asks again). A refund finance asked for
        (`refund_requested`) names its amount and id; the gateway's refusal of it is final
        (`refund_refused`), an error is asked again."""
        p = record.payment
        gateway = self.gateways[p.gateway]
        pending = pending_refund(p)
        try:
            if pending is not None:
                ok = await gateway.refund(p, pending.amount_vnd, pending.event_ref)
                REFUNDS.labels(gateway.name, "ok" if ok else "refused").inc()
                now = datetime.now(VIETNAM_TZ)
                await self.send(
                    CallbackMessage(
                        kind="refund_confirmed" if ok else "refund_refused",
                        dossier_id=p.dossier_id,
                        at=now,
                        ref=pending.event_ref,
                        via="timer",
                        reason=None if ok else "gateway_refused",
                    )
                )
                self._refund_sent[refund_key(p)] = now
                return
            ok = await gateway.refund(p)
        except PartnerError as exc:
            REFUNDS.labels(gateway.name, "error").inc()
            log.warning("refund_failed", dossier_id=p.dossier_id, error=str(exc)[:200])
            return
        REFUNDS.labels(gateway.name, "ok" if ok else "refused").inc()
        if not ok:
            return
        now = datetime.now(VIETNAM_TZ)
        await self.send(
            CallbackMessage(
                kind="refund_confirmed", dossier_id=p.dossier_id, at=now, ref="refund", via="timer"
            )
        )
        self._refund_sent[refund_key(p)] = now
