"""The pure pieces of the payments shell: outgoing events, the jsonpay signature and reading."""

from __future__ import annotations

from datetime import UTC, datetime

import orjson

from services.payments.domain import Applied, Cause, GatewayAccount, apply, open_payment, order_for
from services.payments.ledger import LedgerRecord, outgoing_event
from services.payments.partner import jsonpay_notification, jsonpay_sign, jsonpay_verify
from services.sandboxes.bank import pick

NOW = datetime(2024, 3, 4, 1, 15, tzinfo=UTC)


def record() -> LedgerRecord:
    order = order_for(
        {
            "dossier_id": "D-1",
            "agency_code": "A",
            "fee": {"amount_vnd": 150_000, "method": "online"},
        },
        account=GatewayAccount("vnpay", "M"),
        submitted_at=NOW,
    )
    assert order is not None
    return LedgerRecord(
        payment=open_payment(order, "ce-1").payment, agency_code="A", payment_url="http://pay"
    )


def test_requested_event_carries_what_the_sms_service_renders() -> None:
    event = outgoing_event(record(), 1)
    data = event.to_dict()["data"]
    assert event.type == "payment.requested" and event.id == "D-1/payment/1"
    assert event.subject == "D-1" and data["dossier_id"] == "D-1"
    assert data["amount_vnd"] == 150_000 and data["payment_url"] == "http://pay"
    assert datetime.fromisoformat(data["expires_at"]) > NOW


def test_each_version_has_its_own_deterministic_event() -> None:
    base = record()
    moved = apply(base.payment, Cause.GATEWAY_FAILURE, NOW, "ref", "cancelled")
    assert isinstance(moved, Applied)
    failed = base.model_copy(update={"payment": moved.payment})
    event = outgoing_event(failed, 2)
    assert event.type == "payment.failed" and event.id == "D-1/payment/2"
    assert event.to_dict()["data"]["reason"] == "cancelled"
    assert outgoing_event(failed, 2).to_json() == event.to_json()


def test_jsonpay_signature_and_reading() -> None:
    body = orjson.dumps(
        {
            "merchant": "M",
            "order_ref": "R",
            "amount": 1000,
            "currency": "VND",
            "status": "paid",
            "transaction_id": "T1",
            "paid_at": "2024-03-04T08:00:00+07:00",
        }
    )
    signature = jsonpay_sign(body, "s2")
    assert jsonpay_verify(body, signature, ["s1", "s2"])
    assert not jsonpay_verify(body + b" ", signature, ["s2"])
    assert not jsonpay_verify(body, None, ["s2"])
    note = jsonpay_notification(orjson.loads(body))
    assert note is not None and note.succeeded and note.amount_vnd == 1000
    assert jsonpay_notification({"status": "pending"}) is None
    assert jsonpay_notification({**orjson.loads(body), "amount": True}) is None


def test_sandbox_pick_is_a_cumulative_band() -> None:
    weights = {"a": 0.25, "b": 0.5}
    assert pick(weights, 0.1) == "a" and pick(weights, 0.5) == "b" and pick(weights, 0.9) is None
