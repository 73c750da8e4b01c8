"""VNPAY protocol pieces and the IPN decision (CONTRACT section 6)."""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime, timedelta
from urllib.parse import parse_qsl, urlsplit

import pytest

from services.common.signing import vnpay_canonical, vnpay_sign, vnpay_verify
from services.common.tz import VIETNAM_TZ
from services.payments.domain import (
    Applied,
    Cause,
    GatewayAccount,
    OrderRequest,
    Payment,
    PaymentState,
    RspCode,
    apply,
    decide_ipn,
    open_payment,
    order_for,
)
from services.payments.vnpay import (
    IpnParseError,
    failure_reason,
    handle_ipn,
    parse_ipn,
    payment_params,
    payment_url,
    to_notification,
)

SECRET = "dev-vnpay-secret"
SIGN = SECRET
CREATED = datetime(2024, 3, 4, 1, 15, 30, tzinfo=UTC)  # 08:15:30 in Hanoi


def make_order() -> OrderRequest:
    data = {
        "dossier_id": "000.00.12.H34-190304-0001",
        "agency_code": "000.00.12.H34",
        "fee": {"amount_vnd": 150_000, "method": "online"},
    }
    made = order_for(data, account=GatewayAccount("vnpay", "MOTCUA01"), submitted_at=CREATED)
    assert made is not None
    return made


ORDER = make_order()


def ledger(*payments: Payment) -> dict[str, Payment]:
    return {p.txn_ref: p for p in payments}


def ipn_params(**overrides: str) -> dict[str, str]:
    params = {
        "vnp_TmnCode": "MOTCUA01",
        "vnp_Amount": "15000000",
        "vnp_BankCode": "NCB",
        "vnp_BankTranNo": "VNP14226112",
        "vnp_CardType": "ATM",
        "vnp_PayDate": "20240304082001",
        "vnp_OrderInfo": ORDER.order_info,
        "vnp_TransactionNo": "14226112",
        "vnp_ResponseCode": "00",
        "vnp_TransactionStatus": "00",
        "vnp_TxnRef": ORDER.txn_ref,
        "vnp_SecureHashType": "HmacSHA512",
        **overrides,
    }
    params["vnp_SecureHash"] = vnpay_sign(params, SIGN)
    return params


# --- Payment URL --------------------------------------------------------------------------------


def test_payment_params() -> None:
    params = payment_params(ORDER, return_url="http://localhost/return", ip_addr="127.0.0.1")
    assert params == {
        "vnp_Version": "2.1.0",
        "vnp_Command": "pay",
        "vnp_TmnCode": "MOTCUA01",
        "vnp_Amount": "15000000",  # VND x 100
        "vnp_CurrCode": "VND",
        "vnp_TxnRef": ORDER.txn_ref,
        "vnp_OrderInfo": "Thanh toan le phi ho so 000.00.12.H34-190304-0001",
        "vnp_OrderType": "other",
        "vnp_Locale": "vn",
        "vnp_ReturnUrl": "http://localhost/return",
        "vnp_IpAddr": "127.0.0.1",
        "vnp_CreateDate": "20240304081530",  # GMT+7 whatever the input offset
        "vnp_ExpireDate": "20240304083030",
    }


def test_bank_code_only_when_given() -> None:
    params = payment_params(ORDER, return_url="r", ip_addr="1.2.3.4", bank_code="NCB")
    assert params["vnp_BankCode"] == "NCB"


def test_payment_url_carries_a_verifiable_hash() -> None:
    params = payment_params(ORDER, return_url="http://x/r?a=1&b=2", ip_addr="127.0.0.1")
    url = payment_url("https://sandbox.vnpayment.vn/paymentv2/vpcpay.html", params, SIGN)
    parts = urlsplit(url)
    assert parts.path == "/paymentv2/vpcpay.html"
    received = dict(parse_qsl(parts.query))
    assert {k: v for k, v in received.items() if k != "vnp_SecureHash"} == params
    assert vnpay_verify(received, [SIGN])


# --- Canonical string and signature -------------------------------------------------------------


def test_canonical_query_hand_computed() -> None:
    params = {
        "vnp_TxnRef": "ABC123",
        "vnp_OrderInfo": "Thanh toan le phi/ho so #1",
        "vnp_Amount": "1000000",
        "vnp_ReturnUrl": "https://a.vn/r?x=1&y=2",
        "vnp_SecureHash": "ignored",
        "vnp_SecureHashType": "HmacSHA512",
        "utm_source": "ignored too",
    }
    assert vnpay_canonical(params).decode() == (
        "vnp_Amount=1000000"
        "&vnp_OrderInfo=Thanh+toan+le+phi%2Fho+so+%231"
        "&vnp_ReturnUrl=https%3A%2F%2Fa.vn%2Fr%3Fx%3D1%26y%3D2"
        "&vnp_TxnRef=ABC123"
    )


def test_secure_hash_is_hmac_sha512_of_the_canonical_string() -> None:
    params = {"vnp_Amount": "1000000", "vnp_TxnRef": "ABC123"}
    expected = hmac.new(
        SECRET.encode(), b"vnp_Amount=1000000&vnp_TxnRef=ABC123", hashlib.sha512
    ).hexdigest()
    assert vnpay_sign(params, SIGN) == expected


def test_signature_checks() -> None:
    good = ipn_params()
    assert vnpay_verify(good, [SIGN])
    assert vnpay_verify(good, ["old", SIGN])  # rotation
    assert vnpay_verify({**good, "vnp_SecureHash": good["vnp_SecureHash"].upper()}, [SIGN])
    assert not vnpay_verify(good, ["other"])
    assert not vnpay_verify(good, [])
    assert not vnpay_verify({**good, "vnp_Amount": "15000100"}, [SIGN])
    assert not vnpay_verify({k: v for k, v in good.items() if k != "vnp_SecureHash"}, [SIGN])
    assert not vnpay_verify({**good, "vnp_SecureHash": "zz\u00e9"}, [SIGN])


# --- IPN parsing --------------------------------------------------------------------------------


def test_parse_ipn() -> None:
    ipn = parse_ipn(ipn_params())
    assert ipn.amount_vnd == 150_000
    assert ipn.currency == "VND"
    assert ipn.pay_date == datetime(2024, 3, 4, 8, 20, 1, tzinfo=VIETNAM_TZ)
    assert ipn.succeeded
    note = to_notification(ipn)
    assert (note.gateway, note.merchant, note.txn_ref) == ("vnpay", "MOTCUA01", ORDER.txn_ref)
    assert note.failure_reason is None and note.paid_at == ipn.pay_date


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("vnp_Amount", None, "required"),
        ("vnp_Amount", "15000000.0", "digits only"),
        ("vnp_Amount", "-100", "digits only"),
        ("vnp_Amount", "\u0661\u0660\u0660", "digits only"),  # Arabic-Indic digits
        ("vnp_Amount", "0", "positive"),
        ("vnp_Amount", "15000050", "whole number of VND"),
        ("vnp_TxnRef", "", "required"),
        ("vnp_ResponseCode", "0", "two digits"),
        ("vnp_TransactionStatus", None, "required"),
        ("vnp_PayDate", "2024-03-04", "yyyyMMddHHmmss"),
        ("vnp_PayDate", "20241304082001", "yyyyMMddHHmmss"),
    ],
)
def test_parse_ipn_errors_name_the_field(field: str, value: str | None, problem: str) -> None:
    params = ipn_params()
    if value is None:
        del params[field]
    else:
        params[field] = value
    with pytest.raises(IpnParseError, match=problem) as caught:
        parse_ipn(params)
    assert caught.value.field == field
    assert field in str(caught.value)


@pytest.mark.parametrize(
    ("response", "status", "reason"),
    [
        ("00", "00", None),
        ("24", "02", "cancelled"),
        ("51", "02", "insufficient_funds"),
        ("11", "02", "timeout"),
        ("07", "07", "suspected_fraud"),
        ("00", "02", "transaction_error"),
        ("00", "04", "reversed"),
        ("42", "02", "response_code_42"),
        ("00", "88", "transaction_status_88"),
    ],
)
def test_failure_reasons(response: str, status: str, reason: str | None) -> None:
    assert failure_reason(response, status) == reason
    ipn = parse_ipn(ipn_params(vnp_ResponseCode=response, vnp_TransactionStatus=status))
    assert ipn.succeeded == (reason is None)
    assert to_notification(ipn).failure_reason == reason


def test_event_ref_tells_attempts_apart() -> None:
    cancelled = parse_ipn(ipn_params(vnp_ResponseCode="24", vnp_TransactionNo="0"))
    timed_out = parse_ipn(ipn_params(vnp_ResponseCode="11", vnp_TransactionNo="0"))
    assert cancelled.event_ref != timed_out.event_ref


# --- IPN decision -------------------------------------------------------------------------------


def must_not_look(_: str) -> Payment | None:
    raise AssertionError("the ledger must not be consulted yet")


def requested() -> Payment:
    return open_payment(ORDER, "ce-1").payment


def settled(state: PaymentState) -> Payment:
    return requested().model_copy(update={"state": state, "version": 2})


def test_bad_signature_is_97_before_anything_else() -> None:
    # Wrong amount and unknown order too, yet the signature is judged first.
    forged = {**ipn_params(vnp_Amount="1", vnp_TxnRef="nope"), "vnp_SecureHash": "00" * 64}
    decision, note = handle_ipn(forged, secrets=[SIGN], find_payment=must_not_look)
    assert decision.rsp_code == RspCode.INVALID_SIGNATURE and decision.cause is None
    assert note is None
    assert decision.reply() == {"RspCode": "97", "Message": "Invalid signature"}


def test_unparseable_but_signed_is_99_without_lookup() -> None:
    decision, note = handle_ipn(
        ipn_params(vnp_Amount="abc"), secrets=[SIGN], find_payment=must_not_look
    )
    assert (decision.rsp_code, decision.cause, note) == (RspCode.UNKNOWN_ERROR, None, None)


def test_unknown_order_is_01() -> None:
    decision, _ = handle_ipn(ipn_params(), secrets=[SIGN], find_payment=ledger().get)
    assert decision.reply() == {"RspCode": "01", "Message": "Order not found"}
    assert decision.cause is None


def test_order_of_another_gateway_is_01() -> None:
    other = requested().model_copy(update={"gateway": "viettelpay"})
    decision, _ = handle_ipn(ipn_params(), secrets=[SIGN], find_payment=ledger(other).get)
    assert decision.rsp_code == RspCode.ORDER_NOT_FOUND


@pytest.mark.parametrize(
    ("overrides", "mismatched"),
    [
        ({"vnp_Amount": "15000100"}, ("amount_vnd",)),
        ({"vnp_CurrCode": "USD"}, ("currency",)),
        ({"vnp_TmnCode": "OTHER"}, ("merchant",)),
        ({"vnp_Amount": "100", "vnp_TmnCode": "OTHER"}, ("amount_vnd", "merchant")),
    ],
)
def test_mismatch_is_04_and_applies_nothing(
    overrides: dict[str, str], mismatched: tuple[str, ...]
) -> None:
    for state in PaymentState:  # amount is checked before the status
        payment = settled(state) if state != PaymentState.REQUESTED else requested()
        decision, note = handle_ipn(
            ipn_params(**overrides), secrets=[SIGN], find_payment=ledger(payment).get
        )
        assert decision.rsp_code == RspCode.INVALID_AMOUNT
        assert decision.cause is None
        assert decision.mismatched == mismatched
        assert note is not None  # the app raises its alert from it


def test_success_on_a_pending_order_is_confirmed() -> None:
    payment = requested()
    decision, note = handle_ipn(ipn_params(), secrets=[SIGN], find_payment=ledger(payment).get)
    assert decision.reply() == {"RspCode": "00", "Message": "Confirm Success"}
    assert decision.cause == Cause.GATEWAY_SUCCESS
    assert note is not None
    outcome = apply(payment, decision.cause, note.paid_at or CREATED, note.event_ref)
    assert isinstance(outcome, Applied) and outcome.event_type == "payment.succeeded"


def test_failure_on_a_pending_order_is_confirmed() -> None:
    decision, note = handle_ipn(
        ipn_params(vnp_ResponseCode="24", vnp_TransactionStatus="02"),
        secrets=[SIGN],
        find_payment=ledger(requested()).get,
    )
    assert (decision.rsp_code, decision.cause) == (RspCode.CONFIRMED, Cause.GATEWAY_FAILURE)
    assert note is not None and note.failure_reason == "cancelled"


@pytest.mark.parametrize(
    "state",
    [
        PaymentState.SUCCEEDED,
        PaymentState.FAILED,
        PaymentState.EXPIRED,
        PaymentState.REFUND_REQUIRED,
        PaymentState.REFUNDED,
    ],
)
def test_settled_order_is_02(state: PaymentState) -> None:
    decision, _ = handle_ipn(ipn_params(), secrets=[SIGN], find_payment=ledger(settled(state)).get)
    assert decision.reply() == {"RspCode": "02", "Message": "Order already confirmed"}
    # Still passed on: the state machine turns it into a no-op or a late success.
    assert decision.cause == Cause.GATEWAY_SUCCESS


def test_success_after_expiry_is_02_and_becomes_refund_required() -> None:
    payment = settled(PaymentState.EXPIRED)
    decision, _ = handle_ipn(ipn_params(), secrets=[SIGN], find_payment=ledger(payment).get)
    assert decision.rsp_code == RspCode.ALREADY_CONFIRMED and decision.cause is not None
    outcome = apply(payment, decision.cause, CREATED + timedelta(hours=1), "t")
    assert isinstance(outcome, Applied)
    assert outcome.payment.state == PaymentState.REFUND_REQUIRED


def test_decide_ipn_directly() -> None:
    refused = decide_ipn(signature_ok=False, notification=None, find_payment=must_not_look)
    assert refused.rsp_code == RspCode.INVALID_SIGNATURE
    note = to_notification(parse_ipn(ipn_params()))
    found = decide_ipn(signature_ok=True, notification=note, find_payment=ledger(requested()).get)
    assert found.rsp_code == RspCode.CONFIRMED
