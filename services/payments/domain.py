"""The payment state machine as data, and the pure decisions around it.

Nothing here does I/O: the worker looks things up, calls these functions, then writes what they
say. The allowed moves are the rows of `TRANSITIONS`; any other move is a `Rejected` value that the
worker counts and logs. Only a call that changes the state yields an outgoing event type, so
duplicate and out-of-order gateway callbacks can be applied blindly.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError


class PaymentState(StrEnum):
    REQUESTED = "requested"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    EXPIRED = "expired"
    REFUND_REQUIRED = "refund_required"  # money arrived for an order we had already closed
    REFUNDED = "refunded"  # every dong handed back
    # Refunds finance starts (`decide_refund`): one at a time per payment, full or partial.
    REFUND_REQUESTED = "refund_requested"  # a refund is asked of the gateway
    PARTIALLY_REFUNDED = "partially_refunded"  # a refund went through, some money is still kept
    REFUND_FAILED = "refund_failed"  # the gateway refused the last refund; the money is kept


class Cause(StrEnum):
    """What happened, as the caller observes it (it never needs to know the current state)."""

    GATEWAY_SUCCESS = "gateway_success"  # IPN or query said paid (VNPAY: both codes 00)
    GATEWAY_FAILURE = "gateway_failure"  # IPN or query gave any other final result
    EXPIRY = "expiry"  # the order's time ran out and the last query found no payment
    REFUND_CONFIRMED = "refund_confirmed"  # the gateway's refund call succeeded
    # Finance asked for a refund (the worker decided it is allowed: `decide_refund`).
    REFUND_ASKED = "refund_asked"
    # The gateway refunded part of the money: some is still kept (`refund_cause`).
    PARTIAL_REFUND_CONFIRMED = "partial_refund_confirmed"
    REFUND_REFUSED = "refund_refused"  # the gateway refused the refund
    DOSSIER_CLOSED = "dossier_closed"  # the dossier was withdrawn or rejected after payment


@dataclass(frozen=True)
class Edge:
    source: PaymentState
    cause: Cause
    target: PaymentState
    name: str  # label for logs and docs
    event_type: str | None  # outgoing event, present on every state-changing edge


_S, _C = PaymentState, Cause
# Beyond the contract's list of types, which it allows; tells the refund step to act.
REFUND_REQUIRED_EVENT = "payment.refund_required"
REFUND_REQUESTED_EVENT = "payment.refund_requested"
REFUND_FAILED_EVENT = "payment.refund_failed"

# Every allowed move. A self-loop (target == source) is a harmless repeat: applied, no change, no
# event. Any (state, cause) pair not listed is rejected.
TRANSITIONS: tuple[Edge, ...] = (
    Edge(_S.REQUESTED, _C.GATEWAY_SUCCESS, _S.SUCCEEDED, "success", "payment.succeeded"),
    Edge(_S.REQUESTED, _C.GATEWAY_FAILURE, _S.FAILED, "failure", "payment.failed"),
    Edge(_S.REQUESTED, _C.EXPIRY, _S.EXPIRED, "expiry", "payment.expired"),
    # Money taken after we closed the order: never drop it, hand it back.
    Edge(_S.EXPIRED, _C.GATEWAY_SUCCESS, _S.REFUND_REQUIRED, "late_success", REFUND_REQUIRED_EVENT),
    Edge(_S.FAILED, _C.GATEWAY_SUCCESS, _S.REFUND_REQUIRED, "late_success", REFUND_REQUIRED_EVENT),
    Edge(_S.REFUND_REQUIRED, _C.REFUND_CONFIRMED, _S.REFUNDED, "refund", "payment.refunded"),
    Edge(_S.SUCCEEDED, _C.REFUND_CONFIRMED, _S.REFUNDED, "refund", "payment.refunded"),
    # Repeats: the state already says what the signal says.
    Edge(_S.SUCCEEDED, _C.GATEWAY_SUCCESS, _S.SUCCEEDED, "duplicate_success", None),
    Edge(_S.REFUND_REQUIRED, _C.GATEWAY_SUCCESS, _S.REFUND_REQUIRED, "duplicate_success", None),
    # Every path into refunded went through a success, so a success now is that one again.
    Edge(_S.REFUNDED, _C.GATEWAY_SUCCESS, _S.REFUNDED, "duplicate_success", None),
    Edge(_S.REFUNDED, _C.REFUND_CONFIRMED, _S.REFUNDED, "duplicate_refund", None),
    Edge(_S.FAILED, _C.GATEWAY_FAILURE, _S.FAILED, "duplicate_failure", None),
    Edge(_S.EXPIRED, _C.EXPIRY, _S.EXPIRED, "duplicate_expiry", None),
    # Unpaid either way: a cancel arriving after expiry, or the expiry timer after a failure.
    Edge(_S.EXPIRED, _C.GATEWAY_FAILURE, _S.EXPIRED, "failure_after_expiry", None),
    Edge(_S.FAILED, _C.EXPIRY, _S.FAILED, "expiry_after_failure", None),
    # Refunds finance starts: one under way at a time, as many as the money allows.
    *(
        Edge(source, _C.REFUND_ASKED, _S.REFUND_REQUESTED, "refund_asked", REFUND_REQUESTED_EVENT)
        # (`decide_refund` refuses late money, which goes back by itself)
        for source in (_S.SUCCEEDED, _S.PARTIALLY_REFUNDED, _S.REFUND_FAILED, _S.REFUND_REQUIRED)
    ),
    # Paid, then withdrawn or rejected: the fee is owed back (finance confirms it, or the
    # sweeper refunds it where the agency's setting says so: `refunds_itself`).
    Edge(
        _S.SUCCEEDED,
        _C.DOSSIER_CLOSED,
        _S.REFUND_REQUIRED,
        "closed_after_payment",
        REFUND_REQUIRED_EVENT,
    ),
    Edge(_S.REFUND_REQUIRED, _C.DOSSIER_CLOSED, _S.REFUND_REQUIRED, "closed_again", None),
    Edge(_S.REFUND_REQUESTED, _C.REFUND_CONFIRMED, _S.REFUNDED, "refund", "payment.refunded"),
    Edge(
        _S.REFUND_REQUESTED,
        _C.PARTIAL_REFUND_CONFIRMED,
        _S.PARTIALLY_REFUNDED,
        "partial_refund",
        "payment.refunded",
    ),
    Edge(
        _S.REFUND_REQUESTED,
        _C.REFUND_REFUSED,
        _S.REFUND_FAILED,
        "refund_refused",
        REFUND_FAILED_EVENT,
    ),
    # The payment's success told again while its refunds go on.
    *(
        Edge(state, _C.GATEWAY_SUCCESS, state, "duplicate_success", None)
        for state in (_S.REFUND_REQUESTED, _S.PARTIALLY_REFUNDED, _S.REFUND_FAILED)
    ),
)

EDGES: Mapping[tuple[PaymentState, Cause], Edge] = {(e.source, e.cause): e for e in TRANSITIONS}

# Once a payment leaves `requested` it never returns there.
SETTLED_STATES: frozenset[PaymentState] = frozenset(PaymentState) - {PaymentState.REQUESTED}
# States the gateway counts as money received (what reconciliation compares).
PAID_STATES: frozenset[PaymentState] = frozenset(
    {
        PaymentState.SUCCEEDED,
        PaymentState.REFUND_REQUIRED,
        PaymentState.REFUNDED,
        PaymentState.REFUND_REQUESTED,
        PaymentState.PARTIALLY_REFUNDED,
        PaymentState.REFUND_FAILED,
    }
)

REQUESTED_EVENT = "payment.requested"


class HistoryEntry(BaseModel):
    model_config = ConfigDict(frozen=True)

    state: PaymentState
    cause: str  # a Cause, or "order_created" for the first entry
    at: AwareDatetime
    event_ref: str  # what caused it: the gateway transaction no, the CloudEvent id, ...
    reason: str | None = None  # why a failure failed (goes to data.reason)
    amount_vnd: int | None = None  # a refund's amount, on the entries of refunds


class Payment(BaseModel):
    """One order of one dossier, as kept in the ledger."""

    model_config = ConfigDict(frozen=True)

    dossier_id: str
    txn_ref: str
    gateway: str
    merchant: str
    amount_vnd: int = Field(gt=0)
    currency: str = "VND"
    created_at: AwareDatetime
    expires_at: AwareDatetime
    state: PaymentState = PaymentState.REQUESTED
    version: int = 1  # +1 per change; lets readers drop stale copies
    history: tuple[HistoryEntry, ...] = ()


@dataclass(frozen=True)
class Applied:
    payment: Payment
    changed: bool
    event_type: str | None  # set only when changed


@dataclass(frozen=True)
class Rejected:
    state: PaymentState
    cause: Cause
    reason: str


Outcome = Applied | Rejected


def _require_aware(at: datetime) -> None:
    if at.tzinfo is None or at.utcoffset() is None:
        raise ValueError(f"naive datetime {at.isoformat()}: payments need an offset")


def apply(
    payment: Payment,
    cause: Cause,
    at: datetime,
    event_ref: str,
    reason: str | None = None,
    amount_vnd: int | None = None,
) -> Outcome:
    """Move `payment` by `cause` if the table allows it (`amount_vnd`: a refund's amount)."""
    _require_aware(at)
    edge = EDGES.get((payment.state, cause))
    if edge is None:
        return Rejected(payment.state, cause, f"no transition from {payment.state} on {cause}")
    if edge.target == payment.state:
        return Applied(payment, changed=False, event_type=None)
    entry = HistoryEntry(
        state=edge.target,
        cause=cause,
        at=at,
        event_ref=event_ref,
        reason=reason,
        amount_vnd=amount_vnd,
    )
    moved = payment.model_copy(
        update={
            "state": edge.target,
            "version": payment.version + 1,
            "history": (*payment.history, entry),
        }
    )
    return Applied(moved, changed=True, event_type=edge.event_type)


# --- Orders -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GatewayAccount:
    """Which gateway and merchant code (vnp_TmnCode) take the agency's fees."""

    gateway: str
    merchant: str


class OrderRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    dossier_id: str
    agency_code: str
    txn_ref: str
    gateway: str
    merchant: str
    amount_vnd: int = Field(gt=0)
    currency: str = "VND"
    order_info: str
    created_at: AwareDatetime
    expires_at: AwareDatetime


class _Fee(BaseModel):
    amount_vnd: int = Field(strict=True)
    method: Literal["online", "counter", "postal_cod", "none"]


class _Submitted(BaseModel):
    """The part of `dossier.submitted` data that payments reads; the rest is ignored."""

    dossier_id: str = Field(min_length=1)
    agency_code: str
    fee: _Fee


TXN_REF_MAX = 100  # VNPAY: vnp_TxnRef is alphanumeric, 1..100 characters


def txn_ref_for(dossier_id: str) -> str:
    """Deterministic: every redelivery of a dossier maps to the same gateway order.

    Dossier ids carry '.' and '-', which gateways refuse, so they are dropped; a short hash of the
    full id keeps "A.B-1" and "AB.-1" apart.
    """
    digest = hashlib.sha256(dossier_id.encode()).hexdigest()[:10].upper()
    readable = re.sub(r"[^0-9A-Za-z]", "", dossier_id)[: TXN_REF_MAX - len(digest)]
    return readable + digest


def order_window(submitted_at: datetime, ttl: timedelta) -> tuple[datetime, datetime]:
    """When an order opens and expires, from the submission's event time alone (whole seconds,
    as the gateways count): every redelivery of one `dossier.submitted` gets the same window,
    hence the same payment URL and the same `payment.requested`, whenever it is recomputed."""
    _require_aware(submitted_at)
    created = submitted_at.replace(microsecond=0)
    return created, created + ttl


def order_for(
    submitted: Mapping[str, Any],
    *,
    account: GatewayAccount,
    submitted_at: datetime,
    ttl: timedelta = timedelta(minutes=15),
) -> OrderRequest | None:
    """The order a `dossier.submitted` (its `data`, and its event `time` as `submitted_at`)
    calls for, or None when it owes nothing online. Nothing here reads a clock.

    Raises ValueError (pydantic's ValidationError) naming the field when the data is malformed.
    """
    try:
        created_at, expires_at = order_window(submitted_at, ttl)
    except OverflowError:
        raise ValueError(
            f"event time {submitted_at.isoformat()} leaves no room for an order"
        ) from None
    try:
        data = _Submitted.model_validate(submitted)
    except ValidationError as exc:
        raise ValueError(f"dossier.submitted data unusable for payments: {exc}") from exc
    if data.fee.method != "online" or data.fee.amount_vnd <= 0:
        return None
    return OrderRequest(
        dossier_id=data.dossier_id,
        agency_code=data.agency_code,
        txn_ref=txn_ref_for(data.dossier_id),
        gateway=account.gateway,
        merchant=account.merchant,
        amount_vnd=data.fee.amount_vnd,
        # Gateways want plain ASCII without special characters here.
        order_info=f"Thanh toan le phi ho so {data.dossier_id}",
        created_at=created_at,
        expires_at=expires_at,
    )


def expired_on_arrival(order: OrderRequest, now: datetime) -> bool:
    """An order whose window (from the submission's time) closed before it could be opened: the
    worker opens it on arrival instead (`order_for` with the arrival as `submitted_at`). The
    only clock-dependent decision, taken once: an order opened before is reused from the ledger
    or its stored copy, never decided again."""
    _require_aware(now)
    return order.expires_at <= now


def open_payment(order: OrderRequest, event_ref: str) -> Applied:
    """The ledger's first entry for an order; the worker publishes `payment.requested`."""
    entry = HistoryEntry(
        state=PaymentState.REQUESTED,
        cause="order_created",
        at=order.created_at,
        event_ref=event_ref,
    )
    payment = Payment(
        dossier_id=order.dossier_id,
        txn_ref=order.txn_ref,
        gateway=order.gateway,
        merchant=order.merchant,
        amount_vnd=order.amount_vnd,
        currency=order.currency,
        created_at=order.created_at,
        expires_at=order.expires_at,
        history=(entry,),
    )
    return Applied(payment, changed=True, event_type=REQUESTED_EVENT)


def paid_at(payment: Payment) -> datetime | None:
    """When the money arrived (the first move into a paid state), if it did."""
    return next((h.at for h in payment.history if h.state in PAID_STATES), None)


# --- Refunds finance starts ---------------------------------------------------------------------

# Why finance hands money back: codes, never free text (a reason written by hand could carry
# personal data into the events).
REFUND_REASONS = (
    "dossier_withdrawn",
    "dossier_rejected",
    "duplicate_payment",
    "overcharged",
    "service_not_provided",
    "other",
)
_REFUND_ENTRY_STATES = frozenset({PaymentState.REFUNDED, PaymentState.PARTIALLY_REFUNDED})
REFUNDABLE_STATES: frozenset[PaymentState] = frozenset(
    {
        PaymentState.SUCCEEDED,
        PaymentState.PARTIALLY_REFUNDED,
        PaymentState.REFUND_FAILED,
        PaymentState.REFUND_REQUIRED,
    }
)


def late_money(payment: Payment) -> bool:
    """Owed back because it was paid after the order closed (the sweeper refunds it)."""
    return (
        payment.state == PaymentState.REFUND_REQUIRED
        and bool(payment.history)
        and payment.history[-1].cause == Cause.GATEWAY_SUCCESS
    )


def refunds_itself(payment: Payment, agency_refunds_automatically: bool) -> bool:
    """Whether the sweeper hands this payment's money back without finance: late money always;
    the fee of a dossier withdrawn or rejected after payment where the agency's setting says so
    (`PAYMENTS_AUTO_REFUND_AGENCIES`)."""
    if payment.state != PaymentState.REFUND_REQUIRED:
        return False
    return late_money(payment) or agency_refunds_automatically


def refunded_vnd(payment: Payment) -> int:
    """What went back so far: each confirmed refund's amount (a refund of late money, which
    names none, is the whole amount)."""
    return sum(
        h.amount_vnd if h.amount_vnd is not None else payment.amount_vnd
        for h in payment.history
        if h.state in _REFUND_ENTRY_STATES
    )


def refundable_vnd(payment: Payment) -> int:
    """What may still go back now (0 while a refund is under way or nothing was paid)."""
    if payment.state not in REFUNDABLE_STATES:
        return 0
    return payment.amount_vnd - refunded_vnd(payment)


def pending_refund(payment: Payment) -> HistoryEntry | None:
    """The refund under way (its id is `event_ref`, its amount `amount_vnd`), if any."""
    if payment.state != PaymentState.REFUND_REQUESTED or not payment.history:
        return None
    return payment.history[-1]


@dataclass(frozen=True)
class RefundRefused:
    """Why a refund may not start: `status` is the HTTP answer (409 the payment's state, 422
    the amount)."""

    status: int
    title: str
    detail: str


def decide_refund(payment: Payment, amount_vnd: int | None) -> int | RefundRefused:
    """The amount a refund of `payment` may hand back (`amount_vnd` None: all that is left), or
    why it may not."""
    if payment.state == PaymentState.REFUND_REQUESTED:
        return RefundRefused(409, "Refund Under Way", "a refund of this payment is under way")
    if late_money(payment):
        return RefundRefused(
            409,
            "Refund Under Way",
            "this payment came after its order closed: it goes back by itself",
        )
    left = refundable_vnd(payment)
    if left <= 0:
        what = "was refunded in full" if payment.state == PaymentState.REFUNDED else "is not paid"
        return RefundRefused(409, "Nothing To Refund", f"this payment {what}")
    wanted = left if amount_vnd is None else amount_vnd
    if wanted <= 0:
        return RefundRefused(422, "Invalid Refund", "a refund's amount_vnd is at least 1")
    if wanted > left:
        return RefundRefused(
            422,
            "Refund Exceeds Payment",
            f"{wanted} VND asked, {left} VND left to refund of {payment.amount_vnd} VND paid",
        )
    return wanted


def refund_cause(payment: Payment, confirmed: bool) -> Cause:
    """The cause of the gateway's answer to the refund under way: all of what was left went
    back, part of it did, or the gateway refused."""
    if not confirmed:
        return Cause.REFUND_REFUSED
    pending = pending_refund(payment)
    left = payment.amount_vnd - refunded_vnd(payment)
    if pending is None or pending.amount_vnd is None or pending.amount_vnd >= left:
        return Cause.REFUND_CONFIRMED
    return Cause.PARTIAL_REFUND_CONFIRMED


def refund_id_for(dossier_id: str, idempotency_key: str) -> str:
    """One refund per (dossier, Idempotency-Key): the same key always names the same refund,
    whatever Redis remembers; also the gateway's request id (alphanumeric, 32 characters)."""
    return hashlib.sha256(f"{dossier_id}\0{idempotency_key}".encode()).hexdigest()[:32].upper()


# --- Retirement ---------------------------------------------------------------------------------

# States in which the story goes on here: an order open, money to hand back.
LIVE_STATES: frozenset[PaymentState] = frozenset(
    {PaymentState.REQUESTED, PaymentState.REFUND_REQUIRED, PaymentState.REFUND_REQUESTED}
)


@dataclass(frozen=True)
class Retirement:
    """How long a settled payment stays in the ledger (why these defaults: `PaymentsSettings`)."""

    after: timedelta = timedelta(days=35)  # past its last change and its late window
    late_window: timedelta = timedelta(days=1)  # after expiry: the last late query


def retire_at(payment: Payment, retirement: Retirement) -> datetime | None:
    """From when a payment may leave the ledger (None: its story is not over): once settled
    (paid, failed, expired, refunded), `after` past both its last change and the end of its
    late-success window (`expires_at` + `late_window`, when the last query looks for a payment
    whose IPN was lost)."""
    if payment.state in LIVE_STATES:
        return None
    last = payment.history[-1].at if payment.history else payment.created_at
    return max(last, payment.expires_at + retirement.late_window) + retirement.after


# --- IPN decision -------------------------------------------------------------------------------


class RspCode(StrEnum):
    CONFIRMED = "00"
    ORDER_NOT_FOUND = "01"
    ALREADY_CONFIRMED = "02"
    INVALID_AMOUNT = "04"
    INVALID_SIGNATURE = "97"
    UNKNOWN_ERROR = "99"


RSP_MESSAGES: Mapping[RspCode, str] = {
    RspCode.CONFIRMED: "Confirm Success",
    RspCode.ORDER_NOT_FOUND: "Order not found",
    RspCode.ALREADY_CONFIRMED: "Order already confirmed",
    RspCode.INVALID_AMOUNT: "Invalid amount",
    RspCode.INVALID_SIGNATURE: "Invalid signature",
    RspCode.UNKNOWN_ERROR: "Unknown error",
}


@dataclass(frozen=True)
class GatewayNotification:
    """A gateway's final word on one transaction, whatever the gateway's wire format."""

    gateway: str
    merchant: str
    txn_ref: str
    amount_vnd: int
    currency: str
    succeeded: bool
    failure_reason: str | None  # None when succeeded
    transaction_no: str  # the gateway's own id for the attempt
    event_ref: str  # dedupe key of this notification, recorded in the payment's history
    paid_at: datetime | None


@dataclass(frozen=True)
class IpnDecision:
    rsp_code: RspCode
    cause: Cause | None  # what to apply to the found payment; None means apply nothing
    mismatched: tuple[str, ...] = ()  # fields that disagree with the order (alert on these)

    @property
    def message(self) -> str:
        return RSP_MESSAGES[self.rsp_code]

    def reply(self) -> dict[str, str]:
        """The HTTP 200 body the gateway expects."""
        return {"RspCode": self.rsp_code.value, "Message": self.message}


def decide_ipn(
    *,
    signature_ok: bool,
    notification: GatewayNotification | None,
    find_payment: Callable[[str], Payment | None],
) -> IpnDecision:
    """VNPAY's order: checksum, find the order, check amount, check status, decide.

    `notification` is None when the signed parameters could not be parsed. `find_payment` (a ledger
    lookup by txn ref) is called only once the signature and the parameters are good.
    """
    if not signature_ok:
        return IpnDecision(RspCode.INVALID_SIGNATURE, None)
    if notification is None:
        return IpnDecision(RspCode.UNKNOWN_ERROR, None)
    payment = find_payment(notification.txn_ref)
    if payment is None or payment.gateway != notification.gateway:
        return IpnDecision(RspCode.ORDER_NOT_FOUND, None)
    mismatched = tuple(
        name
        for name, ours, theirs in (
            ("amount_vnd", payment.amount_vnd, notification.amount_vnd),
            ("currency", payment.currency, notification.currency),
            ("merchant", payment.merchant, notification.merchant),
        )
        if ours != theirs
    )
    if mismatched:
        return IpnDecision(RspCode.INVALID_AMOUNT, None, mismatched)
    cause = Cause.GATEWAY_SUCCESS if notification.succeeded else Cause.GATEWAY_FAILURE
    # Still applied when already settled: a late success must reach refund_required.
    if payment.state != PaymentState.REQUESTED:
        return IpnDecision(RspCode.ALREADY_CONFIRMED, cause)
    return IpnDecision(RspCode.CONFIRMED, cause)


def decide_ipn_on_lookup(
    notification: GatewayNotification, found: Payment | None, *, certain: bool
) -> IpnDecision:
    """`decide_ipn` on the order found for a verified notification: its Redis copy, else the
    ledger. `certain` is False when neither could be read in full (Redis lost its copy and this
    member does not hold, or has not restored, every ledger partition): then the answer is 99,
    which the gateway retries, never 01, which it takes as final."""
    if found is None and not certain:
        return IpnDecision(RspCode.UNKNOWN_ERROR, None)
    return decide_ipn(signature_ok=True, notification=notification, find_payment=lambda _: found)


# --- Stuck orders -------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuerySchedule:
    """When to ask the gateway about an unpaid order, relative to its expiry (negative = before).

    The expiry comes last and only if the queries found no payment: the gateway may still be
    finishing a payment begun just before the deadline, and a lost IPN shows only in a query.
    """

    query_offsets: tuple[timedelta, ...] = (timedelta(minutes=-5), timedelta(minutes=1))
    expire_offset: timedelta = timedelta(minutes=1)


@dataclass(frozen=True)
class Check:
    at: datetime
    action: Literal["query", "expire"]


def check_plan(
    created_at: datetime, expires_at: datetime, schedule: QuerySchedule = QuerySchedule()
) -> tuple[Check, ...]:
    """Every query, then the expiry, in time order."""
    _require_aware(created_at)
    _require_aware(expires_at)
    expire_at = max(expires_at + schedule.expire_offset, created_at)
    query_times = sorted({expires_at + offset for offset in schedule.query_offsets})
    # A query after the expiry could no longer change it; one before creation makes no sense.
    queries = [Check(t, "query") for t in query_times if created_at <= t <= expire_at]
    # At equal times the query goes first, so the expiry can heed its answer.
    return (*queries, Check(expire_at, "expire"))


def checks_due(plan: tuple[Check, ...], after: datetime, now: datetime) -> tuple[Check, ...]:
    """The checks that fell due in (after, now], for a sweeper that remembers its last run."""
    return tuple(c for c in plan if after < c.at <= now)
