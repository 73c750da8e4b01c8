"""The payments worker: every change of a payment is applied here, one dossier's inputs in order.

It reads, in the same batches, `dossier.events` (only `dossier.submitted`, and
`dossier.withdrawn` / `dossier.rejected`, which make a paid fee owed back; the other types are
skipped before validation) and `payments.callbacks` (`callbacks.CallbackMessage`: gateway
notifications from the webhook and from queries, expiries, confirmed refunds, outbox flushes,
refunds finance asks for and the gateway's answers to them).

- A refund finance asks for (`refund_asked`) is decided here, in order with the dossier's other
  inputs (`domain.decide_refund`), and its answer left in Redis for the route
  (`refunds.RefundAnswers`), once; the sweeper's `refund_confirmed` / `refund_refused` for the
  refund under way moves it to `refunded`, `partially_refunded` or `refund_failed`.

- `on_batch` groups a poll by dossier and handles the dossiers concurrently (at most
  `PAYMENTS_ORDER_CONCURRENCY` at once), each dossier's inputs in order: its submissions first,
  so a callback finds the order even when both came in the same poll. Every dossier's work
  finishes before the batch fails, so a retry never runs beside a first attempt.
- A submission that owes an online fee opens one order: `payment.requested` with the payment
  URL. Everything about it derives from the input, never from the clock at the time it is
  (re)computed: the txn ref from the dossier id, the order's window from the event's `time`
  (`domain.order_window`), the event ids from the dossier and the version. A redelivery finds
  the order in the ledger, else in its Redis copy (saved before `payment.requested` was
  published, so a crash between that publish and the changelog write reuses it), else computes
  the same order again, byte for byte. A submission whose window closed before it arrived
  (`domain.expired_on_arrival`) opens its order on arrival instead, the one read of the clock,
  for an order never opened before (counted in `motcua_payments_orders_opened_on_arrival_total`).
- A callback moves the payment along `domain.TRANSITIONS`; one for an order the ledger does not
  hold is applied to the order's Redis copy (a retired order's, see below), and is a poison
  message (dead-lettered) when there is none either, since a dossier's inputs are applied in
  order.
- Retirement: a `retire` callback (sent by the sweeper when `Ledger.retiring` says so) retires
  the dossier's record if it still may (`ledger.record_retire_at`, against the worker's clock).
  A late input for a retired order finds its Redis copy, kept `PAYMENTS_IPN_DEDUPE_TTL_SECONDS`
  past the retirement: a `dossier.submitted` read again opens no second order and writes
  nothing; a gateway notification is applied to the copy: a repeat changes nothing and writes
  nothing (the webhook answered it 02, already confirmed), a success after the order failed or
  expired brings the record back as `refund_required`, and the money is handed back.
- Each change is written to the ledger (`ledger.Ledger.write`); once every dossier of the poll
  is done, the changed records are copied to Redis and their outboxes published in one go
  (`Ledger.publish_pending`); the batch consumer then writes the ledger's changelog and only
  then commits.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from aiokafka.structs import ConsumerRecord
from prometheus_client import Counter

from services.common import topics
from services.common.consumer import event_decoder, for_each_dossier
from services.common.dead_letters import PoisonMessage
from services.common.events import CloudEvent
from services.common.logging import get_logger
from services.common.tz import VIETNAM_TZ
from services.payments.callbacks import CallbackMessage, decode_callback
from services.payments.domain import (
    Applied,
    Cause,
    GatewayNotification,
    Payment,
    PaymentState,
    RefundRefused,
    apply,
    decide_ipn,
    decide_refund,
    expired_on_arrival,
    open_payment,
    order_for,
    pending_refund,
    refund_cause,
    txn_ref_for,
)
from services.payments.ledger import Ledger, LedgerRecord, record_retire_at
from services.payments.partner import Gateway
from services.payments.refunds import RefundAnswer, RefundAnswers
from services.payments.settings import PaymentsSettings

log = get_logger("motcua.payments")

SUBMITTED = "dossier.submitted"
# A paid dossier closed without its service: the fee is owed back (`Cause.DOSSIER_CLOSED`).
CLOSING = {"dossier.withdrawn": "dossier_withdrawn", "dossier.rejected": "dossier_rejected"}

ORDERS = Counter("motcua_payments_orders_total", "Payment orders created", ["gateway"])
TRANSITIONS = Counter(
    "motcua_payments_transitions_total", "State changes applied", ["from_state", "to_state"]
)
OPENED_ON_ARRIVAL = Counter(
    "motcua_payments_orders_opened_on_arrival_total",
    "Orders whose window opened when the worker got the submission, its own having closed",
)
REJECTED = Counter(
    "motcua_payments_rejected_transitions_total", "Moves the table refuses", ["state", "cause"]
)

Input = CloudEvent[Any] | CallbackMessage

_submissions = event_decoder(frozenset({SUBMITTED, *CLOSING}))


def decode_input(record: ConsumerRecord[bytes, bytes]) -> Input | None:
    """A submission from `dossier.events` (other types: None), a message from
    `payments.callbacks`; `PoisonMessage` for what is neither."""
    if record.topic == topics.PAYMENT_CALLBACKS:
        return decode_callback(record.value or b"")
    return _submissions(record)


def dossier_of(item: Input) -> str:
    return item.dossier_id if isinstance(item, CallbackMessage) else item.subject


class PaymentsWorker:
    """Applies submissions and callbacks to the ledger (a `StateTable`, see `ledger.py`)."""

    def __init__(
        self,
        ledger: Ledger,
        gateways: Mapping[str, Gateway],
        conf: PaymentsSettings,
        *,
        clock: Callable[[], datetime] = lambda: datetime.now(VIETNAM_TZ),
        answers: RefundAnswers | None = None,
    ) -> None:
        self.ledger = ledger
        self.answers = answers  # where a refund finance asked for gets its answer
        self.gateways = gateways
        self.conf = conf
        self.clock = clock  # read only for an order never opened before, that came too late
        # this poll's submissions the ledger lacks: their orders' Redis copies, by txn ref
        self._stored: dict[str, LedgerRecord] = {}

    # --- consuming -------------------------------------------------------------------------

    async def on_batch(self, items: Sequence[Input]) -> None:
        new = {
            txn_ref_for(i.subject)
            for i in items
            if not isinstance(i, CallbackMessage)
            and i.type == SUBMITTED
            and self.ledger.get(i.subject) is None
        }
        self._stored = await self.ledger.snapshots.get_many(sorted(new))
        await for_each_dossier(
            items, dossier_of, self.on_dossier, concurrency=self.conf.order_concurrency
        )
        await self.ledger.publish_pending()

    async def on_dossier(self, dossier_id: str, inputs: list[Input]) -> None:
        # the order before its callbacks; each kind in the order it came
        for item in sorted(inputs, key=lambda i: isinstance(i, CallbackMessage)):
            if isinstance(item, CallbackMessage):
                await self.on_callback(item)
            elif item.type in CLOSING:
                await self.on_closed(item)
            else:
                await self.on_submitted(item)

    async def on_submitted(self, event: CloudEvent[Any]) -> None:
        dossier_id = event.subject
        existing = self.ledger.get(dossier_id)
        if existing is not None:  # a redelivery: the order exists; finish its outbox if needed
            self.ledger.flush(existing)
            return
        stored = self._stored.get(txn_ref_for(dossier_id))
        if stored is not None and stored.payment.dossier_id == dossier_id:
            moment = record_retire_at(stored, self.ledger.retirement)
            if moment is not None and moment <= self.clock():
                return  # a retired order's submission read again: it stays retired
            # Published (its copy is saved first), then the process died before the changelog
            # write: the same order again, not a new one.
            self.ledger.write(stored)
            return
        data = event.data.model_dump(mode="json")
        agency = str(data.get("agency_code", ""))
        gateway = self.gateways.get(self.conf.gateway_for(agency))
        if gateway is None:
            raise PoisonMessage(f"no gateway configured for agency {agency!r}")
        try:
            order = order_for(
                data, account=gateway.account(), submitted_at=event.time, ttl=self.conf.order_ttl
            )
        except ValueError as exc:
            raise PoisonMessage(str(exc)[:300]) from None
        if order is None:
            return
        arrived = self.clock()
        if expired_on_arrival(order, arrived):
            # Its window closed before it got here (a backlog, a portal's clock behind): the
            # order opens on arrival instead. Its copy is saved before the publish, so a
            # redelivery reuses this very order rather than deciding again.
            order = order_for(
                data, account=gateway.account(), submitted_at=arrived, ttl=self.conf.order_ttl
            )
            if order is None:  # pragma: no cover - the same data owed a fee a moment ago
                return
            OPENED_ON_ARRIVAL.inc()
            log.info("order_opened_on_arrival", dossier_id=dossier_id, submitted=event.time)
        url = await gateway.payment_url(order)
        opened = open_payment(order, event.id)
        self.ledger.write(LedgerRecord(payment=opened.payment, agency_code=agency, payment_url=url))
        ORDERS.labels(gateway.name).inc()
        log.info("order_created", dossier_id=dossier_id, gateway=gateway.name, txn=order.txn_ref)

    async def on_closed(self, event: CloudEvent[Any]) -> None:
        """A dossier withdrawn or rejected: a payment that went through is owed back
        (`payment.refund_required`; the sweeper refunds it where the agency's setting says so,
        else finance does). Anything else (no payment, unpaid, refunded) changes nothing."""
        record = self.ledger.get(event.subject)
        if record is None:
            record = await self.ledger.snapshots.get(txn_ref_for(event.subject))
            if record is None or record.payment.dossier_id != event.subject:
                return
        if record.payment.state != PaymentState.SUCCEEDED:
            return
        outcome = self.move(
            record.payment,
            Cause.DOSSIER_CLOSED,
            event.time,
            None,
            ref=event.id,
            reason=CLOSING[event.type],
        )
        if outcome is not None and outcome.changed:
            self.commit(record, outcome.payment)

    async def on_callback(self, message: CallbackMessage) -> None:
        record = self.ledger.get(message.dossier_id)
        if record is None:
            if message.kind in ("retire", "flush"):
                return  # retired already: nothing left to do
            record = await self.ledger.snapshots.get(txn_ref_for(message.dossier_id))
            if record is None or record.payment.dossier_id != message.dossier_id:
                raise PoisonMessage("callback for an order the ledger does not hold")
        if message.kind == "retire":
            moment = record_retire_at(record, self.ledger.retirement)
            if moment is not None and moment <= self.clock():
                self.ledger.retire(record)
            return
        self.ledger.flush(record)
        if message.kind == "flush":
            return
        payment = record.payment
        outcome: Applied | None
        if message.notification is not None:
            note = message.notification
            if any(h.event_ref == note.event_ref for h in payment.history):
                return  # this very notification is applied already
            decision = decide_ipn(
                signature_ok=True,
                notification=note,
                find_payment=lambda ref: payment if ref == payment.txn_ref else None,
            )
            if decision.cause is None:
                if decision.mismatched:
                    await self.ledger.reject_callback(
                        payment, note, decision.mismatched, message.via
                    )
                return
            outcome = self.move(payment, decision.cause, note.paid_at or message.at, note)
        elif message.kind == "expire":
            outcome = self.move(payment, Cause.EXPIRY, message.at, None, ref="expiry")
        elif message.kind == "refund_asked":
            outcome = await self.on_refund_asked(payment, message)
        elif (pending := pending_refund(payment)) is not None:
            if pending.event_ref != message.ref:
                return  # the gateway's answer about another refund than the one under way
            cause = refund_cause(payment, confirmed=message.kind == "refund_confirmed")
            outcome = self.move(
                payment,
                cause,
                message.at,
                None,
                ref=message.ref,
                amount=pending.amount_vnd,
                reason=message.reason,
            )
        elif message.kind == "refund_refused" or any(
            h.event_ref == message.ref and h.amount_vnd is not None for h in payment.history
        ):
            return  # an answer to a refund finance asked for, answered already
        else:  # refund_confirmed of late money (`refund_required`)
            outcome = self.move(payment, Cause.REFUND_CONFIRMED, message.at, None, ref=message.ref)
        if outcome is not None and outcome.changed:
            self.commit(record, outcome.payment)

    async def on_refund_asked(self, payment: Payment, message: CallbackMessage) -> Applied | None:
        """Decide a refund finance asked for (once: a refund already in the history, or already
        answered, is answered as it was) and leave the answer for the route."""
        if self.answers is None:
            raise PoisonMessage("refunds are not answered by this worker")
        done = next((h for h in payment.history if h.event_ref == message.ref), None)
        if done is not None:
            await self.answers.put(
                RefundAnswer(
                    refund_id=message.ref,
                    dossier_id=payment.dossier_id,
                    accepted=True,
                    amount_vnd=done.amount_vnd,
                    reason=done.reason,
                )
            )
            return None
        # Answered before: refused for good; accepted, yet not in the history (the poll that
        # took it failed after the answer was out, and is handled again): taken again.
        stored = await self.answers.get(message.ref)
        if stored is not None and not stored.accepted:
            return None
        decided = decide_refund(
            payment, stored.amount_vnd if stored is not None else message.amount_vnd
        )
        if isinstance(decided, RefundRefused):
            if stored is not None:
                log.warning("refund_answered_but_refused", dossier_id=payment.dossier_id)
                return None
            await self.answers.put(RefundAnswer.refused(message.ref, payment.dossier_id, decided))
            log.info("refund_refused", dossier_id=payment.dossier_id, why=decided.title)
            return None
        outcome = self.move(
            payment,
            Cause.REFUND_ASKED,
            message.at,
            None,
            ref=message.ref,
            amount=decided,
            reason=message.reason,
        )
        if outcome is not None and stored is None:
            await self.answers.put(
                RefundAnswer(
                    refund_id=message.ref,
                    dossier_id=payment.dossier_id,
                    accepted=True,
                    amount_vnd=decided,
                    reason=message.reason,
                )
            )
        return outcome

    def move(
        self,
        payment: Payment,
        cause: Cause,
        at: datetime,
        note: GatewayNotification | None,
        *,
        ref: str = "",
        amount: int | None = None,
        reason: str | None = None,
    ) -> Applied | None:
        outcome = apply(
            payment,
            cause,
            at,
            note.event_ref if note else ref,
            note.failure_reason if note else reason,
            amount,
        )
        if not isinstance(outcome, Applied):
            REJECTED.labels(outcome.state.value, outcome.cause.value).inc()
            log.warning(
                "transition_rejected",
                dossier_id=payment.dossier_id,
                state=outcome.state.value,
                cause=outcome.cause.value,
            )
            return None
        return outcome

    def commit(self, record: LedgerRecord, moved: Payment) -> None:
        TRANSITIONS.labels(record.payment.state.value, moved.state.value).inc()
        log.info(
            "payment_moved",
            dossier_id=moved.dossier_id,
            from_state=record.payment.state.value,
            to_state=moved.state.value,
        )
        self.ledger.write(record.model_copy(update={"payment": moved}))
