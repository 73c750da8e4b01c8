"""Whatever intake accepts, no consumer dead-letters for its shape (issue 14, item 3).

Generated envelopes (valid ones, and near-invalid ones: extreme dates, long, blank or
control-character ids, long texts, optional fields left out) go through intake's validation
(`read_batch`, one event per request); every event it accepts goes, as the bytes intake
publishes, through the decode and the pure core of every consumer, and what those produce goes
on to the consumers of their topics:

- payments: `decode_input` (the submissions), the order, the VNPAY URL, `payment.requested` and
  `payment.succeeded`;
- postal: `decode_input`, `domain.apply` (bookings acknowledged), the `postal.*` envelopes, the
  state's changelog record;
- metrics: `event_decoder`, `apply_all`, the store, the state's changelog record, the
  `dossier.overdue` it would announce;
- SMS: `decode_item` and `fold` over all of the above (and a later tick), the records.

A consumer that raises, or an SMS fold that dead-letters, fails the property.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from services.common import topics
from services.common.consumer import event_decoder
from services.common.events import (
    ADDRESS_TEXT_MAX,
    CODE_MAX,
    ENVELOPE_ID_MAX,
    MONEY_MAX,
    NAME_MAX,
    PHONE_MAX,
    REASON_MAX,
    CloudEvent,
    make_event,
    parse_event,
)
from services.intake.domain import EARLIEST, HORIZON, BatchInvalid, canonical_json, read_batch
from services.metrics import codec as metrics_codec
from services.metrics import domain as metrics
from services.metrics.store import ColumnarStore
from services.metrics.worker import to_domain
from services.payments import vnpay
from services.payments.domain import Cause, GatewayAccount, apply, open_payment, order_for
from services.payments.ledger import LedgerRecord, outgoing_event
from services.payments.worker import decode_input as payments_decode
from services.postal import domain as postal
from services.postal import shipments
from services.postal.commands import BookOrder, PostalEvent
from services.postal.inputs import Event as PostalInput
from services.postal.inputs import OrderBooked
from services.postal.worker import SOURCE as POSTAL_SOURCE
from services.postal.worker import decode_input as postal_decode
from services.sms import record as sms_record
from services.sms.decisions import DEFAULT_POLICY
from services.sms.fold import Outcome, Rules, fold
from services.sms.inbox import Item, Tick, decode_item
from services.sms.quiet import DEFAULT_QUIET_HOURS
from services.sms.templates import load_templates

NOW = datetime(2026, 11, 26, 15, 0, tzinfo=UTC)
LATEST = NOW + HORIZON
PUBLIC_URL = "https://pay.motcua.example"
ACCOUNT = GatewayAccount("vnpay", "MOTCUA01")
SMS_RULES = Rules(load_templates(), frozenset(), DEFAULT_QUIET_HOURS, DEFAULT_POLICY)

# --- generated envelopes -------------------------------------------------------------------------
#
# Each field has its usual values and its odd ones (near-invalid: accepted or refused). An
# envelope has at most two odd fields, drawn among two more slots than it has fields: some
# envelopes are all usual (accepted, their values varying within the bounds), and a refused one is
# refused for one or two reasons, so the others around it are accepted.


@dataclass(frozen=True)
class Kind:
    usual: st.SearchStrategy[Any]
    odd: st.SearchStrategy[Any]


def one_of_weighted(*choices: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """A value of one of the strategies, each drawn `weight` times as often."""
    return st.sampled_from([s for weight, s in choices for _ in range(weight)]).flatmap(
        lambda chosen: chosen
    )


def repeated(char: str, sizes: range) -> st.SearchStrategy[str]:
    return st.sampled_from(sizes).map(lambda n: char * n)


ABSENT = object()  # a field left out
BLANK_OR_CONTROL = ["", " ", "\t", "\u3000\u00a0", "D-\x00-1", "D\n1", "D\u2028", "\x1b[31m"]
IDS = Kind(
    st.from_regex(r"[0-9A-Za-z][0-9A-Za-z.\-/:_ ]{0,30}", fullmatch=True),
    one_of_weighted(
        (2, st.sampled_from(BLANK_OR_CONTROL)),
        (1, st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)),  # controls too
        (1, repeated("D", range(CODE_MAX - 1, CODE_MAX + 2))),
        (1, repeated("\U0001f600", range(CODE_MAX - 1, CODE_MAX + 2))),  # two UTF-16 units each
        (1, repeated("Đ", range(ENVELOPE_ID_MAX - 1, ENVELOPE_ID_MAX + 2))),
        (1, st.just("D" * 10_000)),
    ),
)
offsets = st.integers(-12 * 60, 14 * 60).map(lambda m: timezone(timedelta(minutes=m)))


def stamped(wall_times: st.SearchStrategy[datetime]) -> st.SearchStrategy[str]:
    """RFC 3339 strings: a wall time with any offset from -12:00 to +14:00."""
    return st.tuples(wall_times, offsets).map(lambda p: p[0].replace(tzinfo=p[1]).isoformat())


# The window's edges, and the dates whose local day (UTC+7) or UTC instant is past year 9999 or
# before year 1: what a consumer's date arithmetic overflows on.
OVERFLOWING = [
    "9999-12-31T23:59:59+00:00",
    "9999-12-31T23:59:59-12:00",
    "9999-12-31T20:00:00.5+00:00",
    "0001-01-01T00:00:00+14:00",
    "0001-01-01T05:00:00+10:00",
]
EDGES = [
    "0001-01-01T00:00:00+00:00",
    "1999-12-31T23:59:59+00:00",
    "2000-01-01T06:59:59+07:00",
    EARLIEST.isoformat(),
    "2000-01-01T00:00:00-12:00",
    (LATEST - timedelta(seconds=1)).isoformat(),
    LATEST.isoformat(),
    (LATEST + timedelta(seconds=1)).isoformat(),
]
MOMENTS = Kind(
    stamped(st.datetimes(datetime(2000, 1, 2), (LATEST - timedelta(days=1)).replace(tzinfo=None))),
    one_of_weighted(
        (2, st.sampled_from(OVERFLOWING)),
        (1, st.sampled_from(EDGES)),
        (1, stamped(st.datetimes(datetime(1, 1, 2), datetime(9999, 12, 30)))),
    ),
)


def texts(limit: int) -> Kind:
    return Kind(
        st.text(st.characters(whitelist_categories=("L", "N", "Zs", "P")), min_size=1, max_size=60),
        one_of_weighted(
            (2, st.sampled_from(["", " ", " \n\t ", "\u3000", "a\x00b", "line\nbreak", "\x85"])),
            (1, repeated("x", range(limit - 1, limit + 2))),
            (1, repeated("ệ", range(limit - 1, limit + 2))),
            (1, repeated("\U0001f600", range(limit - 1, limit + 2))),
            (1, st.just("x" * 10_000)),
        ),
    )


# Usually a number the SMS service can send to, so that its messages are rendered.
PHONES = Kind(
    st.sampled_from(["0905123456", "0905 333 444", "+84 905 333 444", "(+84) 905-333-444"]),
    st.sampled_from(
        [ABSENT, None, "", "01623456789", "112", "not a phone", "0" * PHONE_MAX,
         "0" * (PHONE_MAX + 1), "0905\n123456"]
    ),
)  # fmt: skip
EMAILS = Kind(st.sampled_from([ABSENT, None, "a@b.vn"]), st.just("x" * 300 + "@b.vn"))
ADDRESSES = Kind(
    st.one_of(
        st.sampled_from([ABSENT, None]),
        st.fixed_dictionaries(
            {name: texts(60).usual for name in ("province", "district", "commune")},
            optional={"street": texts(200).usual},
        ),
    ),
    st.one_of(
        st.fixed_dictionaries({"province": texts(60).odd, "street": texts(1500).odd}),
        texts(ADDRESS_TEXT_MAX).usual,
        texts(ADDRESS_TEXT_MAX).odd,
        st.just({"province": None, "district": 7}),
    ),
)
AMOUNTS = Kind(
    st.sampled_from([0, 1, 15_000, 150_000, 2_000_000]),
    st.sampled_from([MONEY_MAX, MONEY_MAX + 1, -1, 2**63, 2**64 - 1]),
)


def present(**fields: Any) -> dict[str, Any]:
    return {name: value for name, value in fields.items() if value is not ABSENT}


@st.composite
def dossiers(draw: st.DrawFn) -> tuple[str, list[dict[str, Any]]]:
    """One dossier: its submission and one to three later events, each an envelope."""
    odd_fields: set[int] = set()  # which of the envelope's fields (in drawing order) are odd
    drawn = 0

    def pick(kind: Kind) -> Any:
        nonlocal drawn
        drawn += 1
        return draw(kind.odd if drawn in odd_fields else kind.usual)

    def one_of(*values: Any) -> Any:
        return draw(st.sampled_from(values))

    # shared by every envelope: odd once in eight dossiers
    dossier_id = draw(IDS.odd if draw(st.integers(0, 7)) == 0 else IDS.usual)

    def envelope(type_: str, data: Callable[[], dict[str, Any]], fields: int) -> dict[str, Any]:
        nonlocal odd_fields, drawn
        odd_fields, drawn = draw(st.sets(st.integers(1, fields + 2), max_size=2)), 0
        return {
            "specversion": "1.0",
            "id": pick(IDS),
            "source": "portal/dev",
            "type": type_,
            "subject": dossier_id,
            "time": pick(MOMENTS),
            "datacontenttype": "application/json",
            "data": {"dossier_id": dossier_id, "agency_code": pick(IDS), **data()},
        }

    later: dict[str, Callable[[], dict[str, Any]]] = {
        "dossier.received": lambda: {
            "received_at": pick(MOMENTS),
            "due_at": pick(MOMENTS),
            "receipt_no": pick(IDS),
        },
        "dossier.rejected": lambda: {"reason": pick(texts(REASON_MAX))},
        "dossier.supplement_requested": lambda: {
            "reason": pick(texts(REASON_MAX)),
            "requested_at": pick(MOMENTS),
        },
        "dossier.supplement_received": lambda: present(
            received_at=pick(MOMENTS), new_due_at=one_of(ABSENT, None, pick(MOMENTS))
        ),
        "dossier.transferred": lambda: {"to_agency_code": pick(IDS)},
        "dossier.resolved": lambda: {
            "resolved_at": pick(MOMENTS),
            "outcome": one_of("approved", "denied"),
        },
        "dossier.apology_issued": lambda: {
            "reason": pick(texts(REASON_MAX)),
            "new_due_at": pick(MOMENTS),
        },
        "dossier.result_returned": lambda: {
            "returned_at": pick(MOMENTS),
            "via": one_of("counter", "postal", "online"),
        },
        "dossier.withdrawn": lambda: {"withdrawn_at": pick(MOMENTS)},
    }
    submitted = envelope(
        "dossier.submitted",
        lambda: {
            "procedure_code": pick(IDS),
            "tier": one_of("province", "district", "commune", "vertical"),
            "sector": pick(IDS),
            "channel": one_of("online", "counter", "postal"),
            "online_level": one_of(None, 3, 4),
            "applicant": present(
                name=pick(texts(NAME_MAX)),
                phone=pick(PHONES),
                email=pick(EMAILS),
                address=pick(ADDRESSES),
            ),
            "fee": {
                "amount_vnd": pick(AMOUNTS),
                "method": one_of("online", "counter", "postal_cod", "none"),
            },
            "postal": present(
                mode=one_of("none", "pickup", "return", "pickup_and_return"),
                address=pick(ADDRESSES),
            ),
            "submitted_at": pick(MOMENTS),
        },
        12,
    )
    types = draw(st.lists(st.sampled_from(sorted(later)), min_size=1, max_size=3))
    return dossier_id, [submitted, *(envelope(t, later[t], 5) for t in types)]


# --- the consumers -------------------------------------------------------------------------------

Published = tuple[str, bytes]  # (topic, value), keyed by the dossier id


def record(topic: str, key: str, value: bytes) -> ConsumerRecord:
    return ConsumerRecord(
        topic=topic,
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        key=key.encode(),
        value=value,
        checksum=None,
        serialized_key_size=len(key),
        serialized_value_size=len(value),
        headers=(),
    )


def on_wire(event: CloudEvent[Any]) -> Published:
    return (event.topic, event.to_json())


def payments_core(dossier_id: str, inputs: list[Published]) -> list[Published]:
    """The order a submission opens, its URL and its events (the worker's `on_submitted`)."""
    out: list[Published] = []
    for topic, value in inputs:
        submission = payments_decode(record(topic, dossier_id, value))
        if submission is None:
            continue
        assert isinstance(submission, CloudEvent)
        if submission.type != "dossier.submitted":
            continue  # a withdrawal or rejection: it opens no order
        data = submission.data.model_dump(mode="json")
        order = order_for(data, account=ACCOUNT, submitted_at=submission.time)
        if order is None:
            continue
        params = vnpay.payment_params(order, return_url=f"{PUBLIC_URL}/return", ip_addr="1.2.3.4")
        url = vnpay.payment_url("https://sandbox.vnpayment.vn/pay", params, "secret")
        opened = open_payment(order, submission.id)
        ledger = LedgerRecord(
            payment=opened.payment, agency_code=order.agency_code, payment_url=url
        )
        out.append(on_wire(outgoing_event(ledger, 1, PUBLIC_URL)))
        paid = apply(opened.payment, Cause.GATEWAY_SUCCESS, order.created_at, "vnpay:1")
        assert not isinstance(paid, type(None))
        ledger = ledger.model_copy(update={"payment": paid.payment})  # type: ignore[union-attr]
        out.append(on_wire(outgoing_event(ledger, 2, PUBLIC_URL)))
        assert LedgerRecord.from_bytes(ledger.to_bytes()) == ledger
    return out


def postal_core(dossier_id: str, inputs: list[Published]) -> list[Published]:
    """`apply` on every input, bookings acknowledged, events as the worker wraps them."""
    state = shipments.initial_state(dossier_id)
    out: list[Published] = []
    pending: list[PostalInput] = []
    for topic, value in inputs:
        decoded = postal_decode(record(topic, dossier_id, value))
        if decoded is not None:
            pending.append(decoded)
    while pending:
        state, commands = postal.apply(state, pending.pop(0))
        for command in commands:
            if isinstance(command, PostalEvent):
                envelope = make_event(
                    command.type,
                    source=POSTAL_SOURCE,
                    id=command.event_id,
                    subject=command.dossier_id,
                    time=command.time,
                    data=command.data(),
                )
                out.append(on_wire(envelope))
            elif isinstance(command, BookOrder):
                pending.append(
                    OrderBooked(
                        command.dossier_id, command.leg, command.carrier, "VN000000001", NOW
                    )
                )
    assert shipments.decode_state(dossier_id, shipments.encode_state(state)) == state
    return out


def metrics_core(dossier_id: str, inputs: list[Published]) -> list[Published]:
    """The state, its contributions in the store, its changelog record; the overdue event."""
    decode = event_decoder()
    decoded = [decode(record(topic, dossier_id, value)) for topic, value in inputs]
    events = [to_domain(e) for e in decoded if e is not None]
    state, deltas = metrics.apply_all(metrics.new_state(dossier_id), events)
    store = ColumnarStore()
    store.apply(deltas)
    store.flush()
    watermark = None
    for e in events:
        watermark = metrics.advance_watermark(watermark, e.time)
    again = metrics_codec.decode_state(dossier_id, metrics_codec.encode_state(state))
    assert again.facts == state.facts
    if state.due_at is None:
        return []
    return [on_wire(parse_event(metrics.overdue_event(state, NOW)))]


def sms_core(dossier_id: str, inputs: list[Published]) -> None:
    """`fold` over every input, then a tick two days later: nothing dead-lettered."""
    items: list[Item] = []
    for topic, value in inputs:
        item = decode_item(topic, dossier_id.encode(), value)
        if item is not None:
            items.append(item)
    first = fold(lambda _: None, items, SMS_RULES, NOW)
    no_dead_letters(first)
    later = fold(first.records.get, [Tick(dossier_id)], SMS_RULES, NOW + timedelta(days=2))
    no_dead_letters(later)
    for kept in (*first.records.values(), *later.records.values()):
        assert sms_record.decode_record(sms_record.encode_record(kept)) == kept


def no_dead_letters(outcome: Outcome) -> None:
    assert not outcome.dead_letters, [str(d.error) for d in outcome.dead_letters]


def every_consumer(dossier_id: str, accepted: list[CloudEvent[Any]]) -> None:
    """What intake publishes, through every consumer, and what they publish on to the next."""
    dossier_events = [(topics.DOSSIER_EVENTS, canonical_json(e)) for e in accepted]
    outcomes = payments_core(dossier_id, dossier_events) + postal_core(dossier_id, dossier_events)
    overdue = metrics_core(dossier_id, dossier_events + outcomes)
    metrics_core(dossier_id, dossier_events + outcomes + overdue)
    sms_core(dossier_id, dossier_events + outcomes + overdue)


def accepted_by_intake(envelopes: list[dict[str, Any]]) -> list[CloudEvent[Any]]:
    """Each envelope posted alone: the events intake accepts (counted as hypothesis events)."""
    accepted = []
    for envelope in envelopes:
        try:
            [one] = read_batch(orjson.dumps(envelope), now=NOW)
        except BatchInvalid:
            event("refused by intake")
            continue
        event("accepted by intake")
        accepted.append(one)
    return accepted


# The CI machine is a loaded 2-core box: a fixed budget of examples, no per-example deadline.
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(dossiers())
def test_whatever_intake_accepts_no_consumer_dead_letters(
    dossier: tuple[str, list[dict[str, Any]]],
) -> None:
    dossier_id, envelopes = dossier
    accepted = accepted_by_intake(envelopes)
    if accepted:
        every_consumer(dossier_id, accepted)


# --- the property can fail -----------------------------------------------------------------------


def received(due_at: str, receipt_no: str = "BN-1", dossier_id: str = "D-1") -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": "e-1",
        "source": "portal/dev",
        "type": "dossier.received",
        "subject": dossier_id,
        "time": "2026-11-26T09:00:00+07:00",
        "data": {
            "dossier_id": dossier_id,
            "agency_code": "000.00.12.H34",
            "received_at": "2026-11-26T09:00:00+07:00",
            "due_at": due_at,
            "receipt_no": receipt_no,
        },
    }


def test_the_check_catches_what_intake_keeps_out() -> None:
    """Without intake's window a year-9999 `due_at` reaches the consumers, which fail on it
    (the dead letters issue 14 found): the property would see it."""
    far = received("9999-12-31T23:59:59+00:00")
    with pytest.raises(BatchInvalid):
        read_batch(orjson.dumps(far), now=NOW)
    with pytest.raises(OverflowError):
        every_consumer("D-1", [parse_event(far)])
    every_consumer("D-1", read_batch(orjson.dumps(received("2026-12-03T17:00:00+07:00")), now=NOW))
