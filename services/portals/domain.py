"""What the portals service knows of a dossier, and how each input changes it: pure, no I/O.

A `DossierState` holds the dossier's owner (the `source` of its `dossier.submitted`), the status
summary a portal reads (`GET /v1/dossiers/{id}`, CONTRACT section 9) and the deliveries of its
events to the owner's subscription. Inputs, each a pure function of (state, input, now):

- `on_event`: an event of `dossier.events`, `payment.events`, `postal.events` or `sms.events`
  updates the summary; an event a portal hears whose type the owner's subscription wants
  becomes a pending `Delivery` due at once (an outcome that came before the submission waits in
  `held` until the owner is known);
- `on_attempt`: the outcome of one attempt (written by the deliverer on `portals.callbacks`):
  a 2xx is delivered; anything else is retried after the schedule's next wait, or given up
  after the last one (`Outcome.given_up`: the shell writes its dead letter);
- `on_redeliver`: a delivery starts a new series of attempts at once;
- `retire`: a dossier whose story is over (closed, or never owned) with nothing pending leaves
  the table after its grace.

`next_due` is the moment the worker must look at the dossier again (a delivery attempt or its
retirement); the worker keeps it in a `DueIndex`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

import orjson

from services.portals.subscriptions import Subscription, deliverable, matches

# Bounds on what one dossier holds: its SMS history, the deliveries kept in its log, and the
# outcome events held until its owner is known.
MAX_SMS = 50
MAX_DELIVERIES = 100
MAX_HELD = 50
CLOSING = frozenset({"dossier.withdrawn", "dossier.rejected", "dossier.result_returned"})
PICKUP_TYPES = frozenset(
    {"postal.pickup_requested", "postal.picked_up", "postal.delivered_to_agency"}
)
STATE_CHANGING_PAYMENTS = frozenset(
    {
        "payment.requested",
        "payment.succeeded",
        "payment.failed",
        "payment.expired",
        "payment.refunded",
        "payment.refund_required",
        "payment.refund_requested",
        "payment.refund_failed",
    }
)


class Status(StrEnum):
    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


@dataclass(frozen=True)
class Incoming:
    """The fields of an event the service uses, and its bytes as they came (the body a portal
    receives)."""

    type: str
    id: str
    source: str
    dossier_id: str
    time: datetime
    data: Mapping[str, Any]
    body: bytes


@dataclass(frozen=True)
class Delivery:
    id: str  # the event's id: `X-Motcua-Delivery`, the same on every attempt
    type: str
    portal: str
    body: str
    status: Status
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None
    last_status_code: int | None = None
    reason: str | None = None

    def listed(self, dossier_id: str) -> dict[str, Any]:
        """The delivery as its portal's log shows it (CONTRACT section 9)."""
        return {
            "id": self.id,
            "type": self.type,
            "dossier_id": dossier_id,
            "status": self.status.value,
            "attempts": self.attempts,
            "last_status_code": self.last_status_code,
            "next_attempt_at": _iso(self.next_attempt_at),
        }


@dataclass(frozen=True)
class DossierState:
    dossier_id: str
    touched_at: datetime  # wall clock of the last change (retirement counts from it)
    owner: str | None = None
    status: str | None = None
    updated_at: datetime | None = None  # event time of the latest event
    payment: Mapping[str, Any] | None = None
    postal: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    sms: tuple[Mapping[str, Any], ...] = ()
    overdue: bool = False
    closed: bool = False
    deliveries: tuple[Delivery, ...] = ()
    held: tuple[Incoming, ...] = ()

    def delivery(self, delivery_id: str) -> Delivery | None:
        for d in self.deliveries:
            if d.id == delivery_id:
                return d
        return None

    def summary(self) -> dict[str, Any]:
        """`GET /v1/dossiers/{dossier_id}` (CONTRACT section 9)."""
        return {
            "dossier_id": self.dossier_id,
            "status": self.status,
            "payment": dict(self.payment) if self.payment is not None else None,
            "postal": [
                {"leg": leg, **dict(fields)}
                for leg, fields in sorted(self.postal.items(), key=lambda kv: kv[0] != "pickup")
            ],
            "sms": [
                {"template": e.get("template"), "state": e.get("state"), "at": e.get("at")}
                for e in self.sms
            ],
            "overdue": self.overdue,
            "updated_at": _iso(self.updated_at),
        }


def initial_state(dossier_id: str, now: datetime) -> DossierState:
    return DossierState(dossier_id=dossier_id, touched_at=now)


# --- the summary ---------------------------------------------------------------------------------


def _suffix(event_type: str) -> str:
    return event_type.partition(".")[2]


def _leg(event: Incoming) -> str:
    leg = event.data.get("leg")
    if leg in ("pickup", "return"):
        return str(leg)
    return "pickup" if event.type in PICKUP_TYPES else "return"


def summarised(state: DossierState, event: Incoming) -> DossierState:
    """The summary once `event` is known (the deliveries untouched)."""
    kind, _, what = event.type.partition(".")
    later = state.updated_at is None or event.time >= state.updated_at
    updated_at = event.time if later else state.updated_at
    if kind == "dossier":
        status = what if later or state.status is None else state.status
        return replace(
            state,
            status=status,
            updated_at=updated_at,
            overdue=state.overdue or event.type == "dossier.overdue",
            closed=state.closed or event.type in CLOSING,
        )
    if kind == "payment":
        if event.type not in STATE_CHANGING_PAYMENTS:
            return state
        amount = event.data.get("amount_vnd")
        if not isinstance(amount, int) and state.payment is not None:
            amount = state.payment.get("amount_vnd")
        named = event.data.get("state")  # a refund's event names it: partially_refunded
        payment = {
            "state": named if isinstance(named, str) and named else what,
            "amount_vnd": amount if isinstance(amount, int) else None,
            "updated_at": event.time.isoformat(),
        }
        known = state.payment.get("updated_at") if state.payment is not None else None
        if not later and known and datetime.fromisoformat(known) > event.time:
            return state
        return replace(state, payment=payment, updated_at=updated_at)
    if kind == "postal":
        leg = _leg(event)
        known = state.postal.get(leg)
        if known is not None and datetime.fromisoformat(known["updated_at"]) > event.time:
            return state
        legs = {**state.postal, leg: {"state": what, "updated_at": event.time.isoformat()}}
        return replace(state, postal=legs, updated_at=updated_at)
    if kind == "sms":
        if any(entry.get("id") == event.id for entry in state.sms):
            return state  # a redelivered input
        template = event.data.get("template")
        entry = {
            "id": event.id,
            "template": template if isinstance(template, str) else None,
            "state": what,
            "at": event.time.isoformat(),
        }
        return replace(state, sms=(*state.sms, entry)[-MAX_SMS:], updated_at=updated_at)
    return state


# --- deliveries ----------------------------------------------------------------------------------


def _new_delivery(event: Incoming, portal: str, now: datetime) -> Delivery:
    return Delivery(
        id=event.id,
        type=event.type,
        portal=portal,
        body=event.body.decode(),
        status=Status.PENDING,
        attempts=0,
        created_at=now,
        next_attempt_at=now,
    )


def _with_delivery(state: DossierState, delivery: Delivery) -> DossierState:
    """The deliveries with `delivery` added (the oldest settled ones dropped past the bound)."""
    deliveries = [*state.deliveries, delivery]
    while len(deliveries) > MAX_DELIVERIES:
        settled = next((d for d in deliveries if d.status is not Status.PENDING), None)
        if settled is None:
            break
        deliveries.remove(settled)
    return replace(state, deliveries=tuple(deliveries))


def _deliver(
    state: DossierState, event: Incoming, subscription: Subscription | None, now: datetime
) -> DossierState:
    if state.owner is None or subscription is None or subscription.source != state.owner:
        return state
    if not matches(subscription.types, event.type) or state.delivery(event.id) is not None:
        return state
    return _with_delivery(state, _new_delivery(event, state.owner, now))


def on_event(
    state: DossierState,
    event: Incoming,
    subscription_of: Mapping[str, Subscription],
    now: datetime,
) -> DossierState:
    """`event` applied: the summary, the owner, and a delivery if the owner wants it."""
    before = state
    if event.type == "dossier.submitted" and state.owner is None:
        state = replace(state, owner=event.source)
        held, state = state.held, replace(state, held=())
        subscription = subscription_of.get(event.source)
        for waiting in held:
            state = _deliver(state, waiting, subscription, now)
    state = summarised(state, event)
    if deliverable(event.type):
        if state.owner is None:
            if all(h.id != event.id for h in state.held):
                state = replace(state, held=(*state.held, event)[-MAX_HELD:])
        else:
            state = _deliver(state, event, subscription_of.get(state.owner), now)
    return state if state == before else replace(state, touched_at=now)


@dataclass(frozen=True)
class Attempt:
    """The outcome of attempt number `attempt` of a delivery (1 is the first of its series)."""

    dossier_id: str
    delivery_id: str
    attempt: int
    ok: bool
    status_code: int | None
    error: str | None
    at: datetime


class Result(StrEnum):
    DELIVERED = "delivered"
    RETRIED = "retried"
    GIVEN_UP = "given_up"
    STALE = "stale"  # an outcome already applied, or of a delivery no longer pending


@dataclass(frozen=True)
class Outcome:
    state: DossierState
    result: Result
    delivery: Delivery | None = None  # the delivery as it now is (given up: its dead letter)


def on_attempt(state: DossierState, attempt: Attempt, schedule: Sequence[float]) -> Outcome:
    """Apply an attempt's outcome; an outcome seen before (a replay) changes nothing."""
    delivery = state.delivery(attempt.delivery_id)
    if (
        delivery is None
        or delivery.status is not Status.PENDING
        or attempt.attempt != delivery.attempts + 1
    ):
        return Outcome(state, Result.STALE)
    if attempt.ok:
        done = replace(
            delivery,
            status=Status.DELIVERED,
            attempts=attempt.attempt,
            next_attempt_at=None,
            last_status_code=attempt.status_code,
            reason=None,
        )
        return Outcome(_replaced(state, done, attempt.at), Result.DELIVERED, done)
    why = (
        f"HTTP {attempt.status_code}"
        if attempt.status_code is not None
        else (attempt.error or "no answer")
    )
    if attempt.attempt <= len(schedule):
        wait = timedelta(seconds=schedule[attempt.attempt - 1])
        again = replace(
            delivery,
            attempts=attempt.attempt,
            next_attempt_at=attempt.at + wait,
            last_status_code=attempt.status_code,
            reason=why[:300],
        )
        return Outcome(_replaced(state, again, attempt.at), Result.RETRIED, again)
    failed = replace(
        delivery,
        status=Status.FAILED,
        attempts=attempt.attempt,
        next_attempt_at=None,
        last_status_code=attempt.status_code,
        reason=f"given up after {attempt.attempt} attempts; last: {why}"[:300],
    )
    return Outcome(_replaced(state, failed, attempt.at), Result.GIVEN_UP, failed)


def on_redeliver(state: DossierState, delivery_id: str, at: datetime) -> DossierState:
    """A new series of attempts for a delivery, the first at once (a pending one is left as it
    is: it is being attempted)."""
    delivery = state.delivery(delivery_id)
    if delivery is None or delivery.status is Status.PENDING:
        return state
    again = replace(delivery, status=Status.PENDING, attempts=0, next_attempt_at=at, reason=None)
    return _replaced(state, again, at)


def _replaced(state: DossierState, delivery: Delivery, now: datetime) -> DossierState:
    deliveries = tuple(delivery if d.id == delivery.id else d for d in state.deliveries)
    return replace(state, deliveries=deliveries, touched_at=now)


def due_deliveries(state: DossierState, now: datetime) -> list[Delivery]:
    """The pending deliveries whose next attempt is due at `now`."""
    return [
        d
        for d in state.deliveries
        if d.status is Status.PENDING and d.next_attempt_at is not None and d.next_attempt_at <= now
    ]


# --- retirement ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Retirement:
    """How long a dossier stays once its story is over (closed, or never owned) and once idle."""

    after: timedelta
    idle_after: timedelta


def retire_at(state: DossierState, rules: Retirement) -> datetime | None:
    """When the dossier may leave the table; None while a delivery is pending."""
    if any(d.status is Status.PENDING for d in state.deliveries):
        return None
    if state.closed or state.owner is None:
        return state.touched_at + rules.after
    return state.touched_at + rules.idle_after


def next_due(state: DossierState, rules: Retirement) -> datetime | None:
    """The next moment the worker must look at the dossier: an attempt, or its retirement."""
    pending = [
        d.next_attempt_at
        for d in state.deliveries
        if d.status is Status.PENDING and d.next_attempt_at is not None
    ]
    if pending:
        return min(pending)
    return retire_at(state, rules)


def retire(state: DossierState, rules: Retirement, now: datetime) -> bool:
    """Whether the dossier leaves the table at `now`."""
    at = retire_at(state, rules)
    return at is not None and at <= now


# --- encoding --------------------------------------------------------------------------------


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


def _delivery_json(d: Delivery) -> dict[str, Any]:
    return {
        "id": d.id,
        "type": d.type,
        "portal": d.portal,
        "body": d.body,
        "status": d.status.value,
        "attempts": d.attempts,
        "created_at": d.created_at.isoformat(),
        "next_attempt_at": _iso(d.next_attempt_at),
        "last_status_code": d.last_status_code,
        "reason": d.reason,
    }


def _incoming_json(e: Incoming) -> dict[str, Any]:
    return {
        "type": e.type,
        "id": e.id,
        "source": e.source,
        "time": e.time.isoformat(),
        "data": dict(e.data),
        "body": e.body.decode(),
    }


def encode_state(state: DossierState) -> bytes:
    return orjson.dumps(
        {
            "dossier_id": state.dossier_id,
            "touched_at": state.touched_at.isoformat(),
            "owner": state.owner,
            "status": state.status,
            "updated_at": _iso(state.updated_at),
            "payment": state.payment,
            "postal": state.postal,
            "sms": list(state.sms),
            "overdue": state.overdue,
            "closed": state.closed,
            "deliveries": [_delivery_json(d) for d in state.deliveries],
            "held": [_incoming_json(e) for e in state.held],
        }
    )


def decode_state(key: str, raw: bytes) -> DossierState:
    value = orjson.loads(raw)
    touched = _time(value["touched_at"])
    assert touched is not None
    return DossierState(
        dossier_id=value["dossier_id"],
        touched_at=touched,
        owner=value.get("owner"),
        status=value.get("status"),
        updated_at=_time(value.get("updated_at")),
        payment=value.get("payment"),
        postal=value.get("postal") or {},
        sms=tuple(value.get("sms") or ()),
        overdue=bool(value.get("overdue")),
        closed=bool(value.get("closed")),
        deliveries=tuple(
            Delivery(
                id=d["id"],
                type=d["type"],
                portal=d["portal"],
                body=d["body"],
                status=Status(d["status"]),
                attempts=d["attempts"],
                created_at=datetime.fromisoformat(d["created_at"]),
                next_attempt_at=_time(d.get("next_attempt_at")),
                last_status_code=d.get("last_status_code"),
                reason=d.get("reason"),
            )
            for d in value.get("deliveries") or ()
        ),
        held=tuple(
            Incoming(
                type=e["type"],
                id=e["id"],
                source=e["source"],
                dossier_id=value["dossier_id"],
                time=datetime.fromisoformat(e["time"]),
                data=e["data"],
                body=e["body"].encode(),
            )
            for e in value.get("held") or ()
        ),
    )
