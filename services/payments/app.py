"""Payments: orders for online fees, the IPN webhook, the ledger, stuck orders and refunds.

The shell around `domain` (the state machine as data), `vnpay` and `reconcile`:

- `dossier.submitted` (fee online, amount > 0) → one order per dossier (`txn_ref_for` is
  deterministic, and the ledger is checked first) → `payment.requested` with the payment URL.
- `GET|POST /v1/webhooks/payments/{gateway}` verifies on the raw parameters, dedupes on the
  gateway's transaction reference (Redis), checks amount, currency and merchant against the order,
  writes the notification to `payments.callbacks` (acks=all) and only then replies.
- One agent applies everything that moves a payment (notifications, query answers, expiries,
  refunds) to the `ledger` table (changelog-backed, keyed by dossier id). Outgoing events are
  published from an outbox kept in the record (`published_version`), with ids derived from the
  dossier and the version, so a crash between write and publish republishes the same ids.
- A timer queries pending orders at the gateway on the configured schedule before expiring them,
  and retries refunds; a crontab runs the daily reconciliation on the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta
from typing import Any, Literal

import orjson
from fastapi import Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from prometheus_client import Counter
from pydantic import AwareDatetime, BaseModel, ConfigDict, TypeAdapter, ValidationError

from services.common import topics
from services.common.claims import Claims
from services.common.coordination import Keys, connect
from services.common.events import CloudEvent, make_event
from services.common.kafka import BrokerUnavailable, DurablePublisher, ensure_topics
from services.common.logging import get_logger
from services.common.partner import PartnerError
from services.common.problems import problem
from services.common.service import PoisonMessage, Service, create_service, run_service
from services.common.settings import Settings
from services.payments.domain import (
    REFUND_REQUIRED_EVENT,
    REQUESTED_EVENT,
    VIETNAM_TZ,
    Applied,
    Cause,
    GatewayNotification,
    HistoryEntry,
    IpnDecision,
    Payment,
    PaymentState,
    RspCode,
    apply,
    check_plan,
    checks_due,
    decide_ipn,
    open_payment,
    order_for,
    txn_ref_for,
)
from services.payments.partner import Gateway, InboundCall, gateways
from services.payments.settings import PaymentsSettings

log = get_logger("motcua.payments")

SOURCE = "motcua/payments"
LEDGER_TABLE = "ledger"
CALLBACK_REJECTED_EVENT = "payment.callback_rejected"

ORDERS = Counter("motcua_payments_orders_total", "Payment orders created", ["gateway"])
CALLBACKS = Counter(
    "motcua_payments_callbacks_total", "Gateway callbacks by reply code", ["gateway", "rsp_code"]
)
CALLBACK_DUPLICATES = Counter(
    "motcua_payments_callback_duplicates_total", "Callbacks seen before", ["gateway"]
)
TRANSITIONS = Counter(
    "motcua_payments_transitions_total", "State changes applied", ["from_state", "to_state"]
)
REJECTED = Counter(
    "motcua_payments_rejected_transitions_total", "Moves the table refuses", ["state", "cause"]
)
QUERIES = Counter("motcua_payments_queries_total", "Gateway status queries", ["gateway", "result"])
REFUNDS = Counter(
    "motcua_payments_refund_calls_total", "Gateway refund calls", ["gateway", "result"]
)
MISMATCHES = Counter(
    "motcua_payments_amount_mismatches_total", "Callbacks refused for amount/currency/merchant"
)

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


_NOTIFICATION = TypeAdapter(GatewayNotification)


class CallbackMessage(BaseModel):
    """What `payments.callbacks` carries (internal, keyed by dossier id)."""

    kind: Literal["notification", "expire", "refund_confirmed", "flush"]
    dossier_id: str
    at: AwareDatetime
    ref: str
    via: str = "ipn"  # ipn | query | timer
    notification: dict[str, Any] | None = None

    def parsed_notification(self) -> GatewayNotification:
        if self.notification is None:
            raise ValueError("notification message without a notification")
        return _NOTIFICATION.validate_python(self.notification)


def notification_dict(n: GatewayNotification) -> dict[str, Any]:
    value: dict[str, Any] = _NOTIFICATION.dump_python(n, mode="json")
    return value


# --- Pure helpers -------------------------------------------------------------------------------


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


def lookup_view(record: LedgerRecord) -> dict[str, Any]:
    p = record.payment
    return {
        "dossier_id": p.dossier_id,
        "state": p.state.value,
        "gateway": p.gateway,
        "txn_ref": p.txn_ref,
        "amount_vnd": p.amount_vnd,
        "currency": p.currency,
        "payment_url": record.payment_url,
        "created_at": p.created_at.isoformat(),
        "expires_at": p.expires_at.isoformat(),
        "version": p.version,
        "history": [h.model_dump(mode="json") for h in p.history],
    }


def reply(decision: IpnDecision) -> JSONResponse:
    return JSONResponse(decision.reply(), status_code=200)


def rsp(code: RspCode) -> JSONResponse:
    return reply(IpnDecision(code, None))


# --- The service --------------------------------------------------------------------------------


class Payments:
    def __init__(self, settings: Settings, payments: PaymentsSettings) -> None:
        self.settings = settings
        self.conf = payments
        self.service: Service = create_service("payments", settings, title="motcua payments")
        self.app = self.service.app
        self.gateways: dict[str, Gateway] = gateways(settings, payments)
        self.redis = connect(settings)
        # Webhook writes go straight through aiokafka (acks=all): faust's producer path costs
        # more per message, and an IPN answered 00 must already be on the log.
        self.callbacks = DurablePublisher(settings.kafka_bootstrap)
        self.keys = Keys(settings.redis_namespace)
        self.claims = Claims(self.redis, payments.ipn_dedupe_ttl_seconds)
        # use_partitioner: the changelog partition is the key's (as on the co-partitioned input
        # topics), so batch handlers, which mix partitions, write each record where recovery
        # expects it.
        self.ledger = self.app.Table(
            LEDGER_TABLE,
            default=None,
            partitions=settings.topic_partitions,
            key_type=bytes,
            value_type=bytes,
            use_partitioner=True,
        )
        self._last_sweep = datetime(1970, 1, 1, tzinfo=UTC)
        self._retry_expire: set[str] = set()
        self._busy: set[str] = set()
        self._wire()

    # Redis: the order snapshot the webhook decides on, and the callback dedupe claims.
    def snapshot_key(self, txn_ref: str) -> str:
        return self.keys("payments", "order", txn_ref)

    def dedupe_key(self, gateway: str, event_ref: str) -> str:
        return self.keys("payments", "callback", gateway, event_ref)

    async def save_snapshot(self, record: LedgerRecord) -> None:
        await self.redis.set(
            self.snapshot_key(record.payment.txn_ref),
            record.to_bytes(),
            ex=self.conf.ipn_dedupe_ttl_seconds,
        )

    def record_of(self, dossier_id: str) -> LedgerRecord | None:
        raw = self.ledger.get(dossier_id.encode())
        return LedgerRecord.from_bytes(raw) if raw else None

    def store(self, record: LedgerRecord) -> None:
        self.ledger[record.payment.dossier_id.encode()] = record.to_bytes()

    async def flush(self, record: LedgerRecord) -> LedgerRecord:
        """Publish every version not yet published (acks=all), then mark them in the ledger."""
        if record.published_version >= record.payment.version:
            return record
        for version in range(record.published_version + 1, record.payment.version + 1):
            await self.service.publish(
                outgoing_event(record, version, self.settings.payments_public_url)
            )
        done = record.model_copy(update={"published_version": record.payment.version})
        self.store(done)
        return done

    # --- agents ---------------------------------------------------------------------------------

    async def on_submissions(self, events: Sequence[CloudEvent[Any]]) -> None:
        """A batch of submissions: many dossiers at once, one dossier's events in order.

        Every dossier's work finishes before the batch fails, so a retry of the batch never
        runs beside a first attempt (two orders for one dossier).
        """
        by_dossier: dict[str, list[CloudEvent[Any]]] = {}
        for event in events:
            by_dossier.setdefault(event.subject, []).append(event)
        limit = asyncio.Semaphore(self.conf.order_concurrency)

        async def one_dossier(items: list[CloudEvent[Any]]) -> None:
            async with limit:
                for item in items:
                    await self.on_submitted(item)

        outcomes = await asyncio.gather(
            *(one_dossier(items) for items in by_dossier.values()), return_exceptions=True
        )
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def on_submitted(self, event: CloudEvent[Any]) -> None:
        dossier_id = event.subject
        existing = self.record_of(dossier_id)
        if existing is not None:  # a redelivery: the order exists; finish its outbox if needed
            await self.flush(existing)
            return
        data = event.data.model_dump(mode="json")
        agency = str(data.get("agency_code", ""))
        gateway = self.gateways.get(self.conf.gateway_for(agency))
        if gateway is None:
            raise PoisonMessage(f"no gateway configured for agency {agency!r}")
        try:
            order = order_for(
                data,
                account=gateway.account(),
                now=datetime.now(VIETNAM_TZ).replace(microsecond=0),
                ttl=self.conf.order_ttl,
            )
        except ValueError as exc:
            raise PoisonMessage(str(exc)[:300]) from None
        if order is None:
            return
        url = await gateway.payment_url(order)
        opened = open_payment(order, event.id)
        record = LedgerRecord(payment=opened.payment, agency_code=agency, payment_url=url)
        self.store(record)
        await self.save_snapshot(record)
        await self.flush(record)
        ORDERS.labels(gateway.name).inc()
        log.info("order_created", dossier_id=dossier_id, gateway=gateway.name, txn=order.txn_ref)

    async def wait_record(self, dossier_id: str, seconds: float = 15.0) -> LedgerRecord | None:
        """After a crash the order's own message may be re-applied after its callbacks: wait."""
        deadline = asyncio.get_running_loop().time() + seconds
        while True:
            record = self.record_of(dossier_id)
            if record is not None or asyncio.get_running_loop().time() > deadline:
                return record
            await asyncio.sleep(0.2)

    async def on_callback(self, key: bytes | None, value: bytes) -> None:
        try:
            message = CallbackMessage.model_validate_json(value)
        except ValidationError as exc:
            raise PoisonMessage(f"not a callback message: {exc.error_count()} errors") from None
        record = await self.wait_record(message.dossier_id)
        if record is None:
            raise PoisonMessage("callback for an order the ledger does not hold")
        record = await self.flush(record)
        if message.kind == "flush":
            return
        payment = record.payment
        outcome: Applied | None
        if message.kind == "notification":
            try:
                note = message.parsed_notification()
            except ValidationError as exc:
                raise PoisonMessage(f"bad notification: {exc.error_count()} errors") from None
            if any(h.event_ref == note.event_ref for h in payment.history):
                return  # this very notification is applied already
            decision = decide_ipn(
                signature_ok=True,
                notification=note,
                find_payment=lambda ref: payment if ref == payment.txn_ref else None,
            )
            if decision.cause is None:
                if decision.mismatched:
                    await self.alert(payment, note, decision.mismatched, message.via)
                return
            outcome = self.move(payment, decision.cause, note.paid_at or message.at, note)
        elif message.kind == "expire":
            outcome = self.move(payment, Cause.EXPIRY, message.at, None, ref="expiry")
        else:
            outcome = self.move(payment, Cause.REFUND_CONFIRMED, message.at, None, ref=message.ref)
        if outcome is None or not outcome.changed:
            return
        record = await self.commit(record, outcome.payment)
        if record.payment.state == PaymentState.REFUND_REQUIRED:
            await self.try_refund(record)

    def move(
        self,
        payment: Payment,
        cause: Cause,
        at: datetime,
        note: GatewayNotification | None,
        *,
        ref: str = "",
    ) -> Applied | None:
        outcome = apply(
            payment,
            cause,
            at,
            note.event_ref if note else ref,
            note.failure_reason if note else None,
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

    async def commit(self, record: LedgerRecord, moved: Payment) -> LedgerRecord:
        TRANSITIONS.labels(record.payment.state.value, moved.state.value).inc()
        log.info(
            "payment_moved",
            dossier_id=moved.dossier_id,
            from_state=record.payment.state.value,
            to_state=moved.state.value,
        )
        updated = record.model_copy(update={"payment": moved})
        self.store(updated)
        await self.save_snapshot(updated)
        return await self.flush(updated)

    async def try_refund(self, record: LedgerRecord) -> None:
        """Hand late money back; on success the refund is applied here, else the timer retries."""
        gateway = self.gateways[record.payment.gateway]
        try:
            ok = await gateway.refund(record.payment)
        except PartnerError as exc:
            REFUNDS.labels(gateway.name, "error").inc()
            log.warning("refund_failed", dossier_id=record.payment.dossier_id, error=str(exc))
            return
        REFUNDS.labels(gateway.name, "ok" if ok else "refused").inc()
        if not ok:
            return
        outcome = self.move(
            record.payment, Cause.REFUND_CONFIRMED, datetime.now(VIETNAM_TZ), None, ref="refund"
        )
        if outcome is not None and outcome.changed:
            await self.commit(record, outcome.payment)

    async def alert(
        self, payment: Payment, note: GatewayNotification, fields: Sequence[str], via: str
    ) -> None:
        MISMATCHES.inc()
        log.warning(
            "callback_mismatch", dossier_id=payment.dossier_id, fields=",".join(fields), via=via
        )
        digest = hashlib.sha256(orjson.dumps(notification_dict(note))).hexdigest()[:16]
        await self.service.publish(
            make_event(
                CALLBACK_REJECTED_EVENT,
                source=SOURCE,
                id=f"{payment.dossier_id}/rejected/{digest}",
                subject=payment.dossier_id,
                time=datetime.now(VIETNAM_TZ),
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
        )

    # --- webhook --------------------------------------------------------------------------------

    async def webhook(self, gateway_name: str, request: Request) -> JSONResponse:
        gateway = self.gateways.get(gateway_name)
        if gateway is None:
            CALLBACKS.labels("unknown", RspCode.ORDER_NOT_FOUND.value).inc()
            return rsp(RspCode.ORDER_NOT_FOUND)
        body = await request.body()
        call = InboundCall(
            query=request.scope.get("query_string", b""), body=body, headers=request.headers
        )
        read = gateway.read_callback(call)
        if not read.signature_ok or read.notification is None:
            code = RspCode.INVALID_SIGNATURE if not read.signature_ok else RspCode.UNKNOWN_ERROR
            CALLBACKS.labels(gateway.name, code.value).inc()
            return rsp(code)
        note = read.notification
        claim_key = self.dedupe_key(gateway.name, note.event_ref)
        try:
            claim = await self.claims.claim(claim_key, read=self.snapshot_key(note.txn_ref))
        except Exception as exc:
            log.warning("webhook_redis_error", error_type=type(exc).__name__)
            CALLBACKS.labels(gateway.name, RspCode.UNKNOWN_ERROR.value).inc()
            return rsp(RspCode.UNKNOWN_ERROR)
        claimed, snapshot = claim.claimed, claim.record
        payment = LedgerRecord.from_bytes(snapshot).payment if snapshot else None
        decision = decide_ipn(
            signature_ok=True, notification=note, find_payment=lambda ref: payment
        )
        CALLBACKS.labels(gateway.name, decision.rsp_code.value).inc()
        if decision.cause is None or payment is None:
            if claimed:
                with contextlib.suppress(Exception):
                    await self.claims.release(claim_key)
            if decision.mismatched and payment is not None:
                try:
                    await self.alert(payment, note, decision.mismatched, "ipn")
                except Exception:
                    return rsp(RspCode.UNKNOWN_ERROR)
            return reply(decision)
        if not claimed:
            CALLBACK_DUPLICATES.labels(gateway.name).inc()
            return reply(decision)
        message = CallbackMessage(
            kind="notification",
            dossier_id=payment.dossier_id,
            at=datetime.now(VIETNAM_TZ),
            ref=note.event_ref,
            via="ipn",
            notification=notification_dict(note),
        )
        try:
            await self.callbacks.publish(
                [
                    (
                        topics.PAYMENT_CALLBACKS,
                        payment.dossier_id.encode(),
                        message.model_dump_json().encode(),
                    )
                ]
            )
        except BrokerUnavailable as exc:
            log.warning("callback_not_durable", error=str(exc))
            with contextlib.suppress(Exception):
                await self.claims.release(claim_key)
            return rsp(RspCode.UNKNOWN_ERROR)
        return reply(decision)

    # --- timers ---------------------------------------------------------------------------------

    async def send_message(self, message: CallbackMessage) -> None:
        await self.service.send(
            topics.PAYMENT_CALLBACKS,
            message.dossier_id.encode(),
            message.model_dump_json().encode(),
        )

    async def check(self, record: LedgerRecord, action: str) -> None:
        p = record.payment
        gateway = self.gateways[p.gateway]
        now = datetime.now(VIETNAM_TZ)
        if action == "refund":
            await self.try_refund_by_message(record)
            return
        try:
            note = await gateway.query(p)
        except PartnerError as exc:
            QUERIES.labels(gateway.name, "error").inc()
            log.warning("query_failed", dossier_id=p.dossier_id, error=str(exc))
            if action == "expire":
                self._retry_expire.add(p.dossier_id)  # never expire without asking
            return
        QUERIES.labels(gateway.name, "final" if note else "pending").inc()
        self._retry_expire.discard(p.dossier_id)
        if note is not None:
            await self.send_message(
                CallbackMessage(
                    kind="notification",
                    dossier_id=p.dossier_id,
                    at=now,
                    ref=note.event_ref,
                    via="query",
                    notification=notification_dict(note),
                )
            )
        elif action == "expire":
            await self.send_message(
                CallbackMessage(kind="expire", dossier_id=p.dossier_id, at=now, ref="expiry")
            )

    async def try_refund_by_message(self, record: LedgerRecord) -> None:
        gateway = self.gateways[record.payment.gateway]
        try:
            ok = await gateway.refund(record.payment)
        except PartnerError:
            REFUNDS.labels(gateway.name, "error").inc()
            return
        REFUNDS.labels(gateway.name, "ok" if ok else "refused").inc()
        if ok:
            await self.send_message(
                CallbackMessage(
                    kind="refund_confirmed",
                    dossier_id=record.payment.dossier_id,
                    at=datetime.now(VIETNAM_TZ),
                    ref="refund",
                    via="timer",
                )
            )

    async def sweep(self) -> None:
        now = datetime.now(VIETNAM_TZ)
        last, self._last_sweep = self._last_sweep, now
        work: list[tuple[LedgerRecord, str]] = []
        for _, raw in list(self.ledger.items()):
            if not raw:
                continue
            record = LedgerRecord.from_bytes(raw)
            p = record.payment
            if p.dossier_id in self._busy:
                continue
            if record.published_version < p.version:
                await self.send_message(
                    CallbackMessage(kind="flush", dossier_id=p.dossier_id, at=now, ref="flush")
                )
            if p.state == PaymentState.REQUESTED:
                due = checks_due(
                    check_plan(p.created_at, p.expires_at, self.conf.schedule), last, now
                )
                actions = {c.action for c in due}
                if p.dossier_id in self._retry_expire:
                    actions.add("expire")
                if actions:
                    work.append((record, "expire" if "expire" in actions else "query"))
            elif p.state == PaymentState.EXPIRED:
                if self.conf.late_query_due(p.expires_at, last, now):
                    work.append((record, "query"))
            elif p.state == PaymentState.REFUND_REQUIRED:
                entered = p.history[-1].at
                if now - entered > timedelta(seconds=self.conf.sweep_interval_seconds):
                    work.append((record, "refund"))
        if not work:
            return
        limit = asyncio.Semaphore(16)

        async def one(record: LedgerRecord, action: str) -> None:
            dossier_id = record.payment.dossier_id
            async with limit:
                self._busy.add(dossier_id)
                try:
                    await self.check(record, action)
                except Exception as exc:  # a sweep never dies on one order
                    log.warning("sweep_check_failed", dossier_id=dossier_id, error=str(exc)[:200])
                finally:
                    self._busy.discard(dossier_id)

        await asyncio.gather(*(one(r, a) for r, a in work))

    async def reconcile_yesterday(self) -> None:
        from services.payments.reconciling import run_reconciliation

        day = (datetime.now(VIETNAM_TZ) - timedelta(days=1)).date()
        for name in sorted({r for r in self.conf.gateway_by_agency.values()} | {"vnpay"}):
            try:
                await run_reconciliation(self.settings, self.conf, name, day, None)
            except Exception as exc:
                log.warning("reconciliation_failed", gateway=name, error=str(exc)[:300])

    # --- wiring ---------------------------------------------------------------------------------

    def _wire(self) -> None:
        service, api = self.service, self.service.api
        service.consume_batches(
            topics.DOSSIER_EVENTS,
            self.on_submissions,
            types=frozenset({"dossier.submitted"}),
            max_batch=500,
            within=0.05,
        )
        service.consume_raw(topics.PAYMENT_CALLBACKS, self.on_callback)

        @self.app.on_before_shutdown.connect
        async def close_publisher(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
            await self.callbacks.close()

        async def redis_reachable() -> bool:
            try:
                return bool(await self.redis.ping())
            except Exception:
                return False

        service.add_ready_check(redis_reachable)

        @self.app.timer(self.conf.sweep_interval_seconds)  # type: ignore[untyped-decorator]
        async def sweep_pending() -> None:
            try:
                await self.sweep()
            except Exception as exc:
                log.warning("sweep_failed", error=str(exc)[:300])

        if self.conf.reconcile_enabled:

            @self.app.crontab(self.conf.reconcile_cron, timezone=VIETNAM_TZ, on_leader=True)
            async def daily_reconciliation() -> None:
                await self.reconcile_yesterday()

        async def ipn(request: Request) -> JSONResponse:
            """Gateway IPN (CONTRACT section 6); always 200 with RspCode."""
            return await self.webhook(request.path_params["gateway"], request)

        # A plain Starlette route: the webhook reads the raw query itself, and FastAPI's
        # parameter solving was a tenth of its cost.
        api.add_route("/v1/webhooks/payments/{gateway}", ipn, methods=["GET", "POST"])

        @api.get("/pay/{txn_ref}", summary="Short payment link: redirects to the gateway's page")
        async def pay(txn_ref: str) -> Response:
            raw = await self.redis.get(self.snapshot_key(txn_ref))
            if not raw:
                return problem(404, "Not Found", "no open payment for this link")
            record = LedgerRecord.from_bytes(raw if isinstance(raw, bytes) else raw.encode())
            return RedirectResponse(record.payment_url, status_code=302)

        @api.get("/v1/payments/return", summary="Browser return page (display only)")
        async def browser_return(request: Request) -> dict[str, str]:
            return {"message": "Thank you. The result is confirmed by the gateway separately."}

        @api.get("/v1/payments/{dossier_id}", summary="A dossier's payment, state and history")
        async def lookup(dossier_id: str) -> JSONResponse:
            record = self.record_of(dossier_id)
            if record is None:
                raw = await self.redis.get(self.snapshot_key(txn_ref_for(dossier_id)))
                record = (
                    LedgerRecord.from_bytes(raw if isinstance(raw, bytes) else raw.encode())
                    if raw
                    else None
                )
            if record is None or record.payment.dossier_id != dossier_id:
                return problem(404, "Not Found", "no payment for this dossier")
            return JSONResponse(lookup_view(record))


def create(settings: Settings, payments: PaymentsSettings | None = None) -> Payments:
    return Payments(settings, payments or PaymentsSettings())


def today() -> date:
    return datetime.now(VIETNAM_TZ).date()


def run(settings: Settings) -> None:
    with contextlib.suppress(Exception):
        asyncio.run(
            ensure_topics(
                settings.kafka_bootstrap,
                topics.declared_topics(settings.topic_partitions),
                settings.topic_replication,
            )
        )
    payments = create(settings)
    run_service(payments.service, settings.payments_port)
