"""The VNPAY protocol (v2.1.0), pure: payment URL parameters, the signed string, IPN parsing.

Signing is `services.common.signing` (one implementation of the VNPAY hash for the service, the
sandbox and every secret of a rotation); this module only names the parameters and reads the
answers.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from services.common.signing import vnpay_canonical, vnpay_sign, vnpay_verify
from services.common.tz import VIETNAM_TZ
from services.payments.domain import (
    GatewayNotification,
    IpnDecision,
    OrderRequest,
    Payment,
    decide_ipn,
)

GATEWAY = "vnpay"
VERSION = "2.1.0"
TIME_FORMAT = "%Y%m%d%H%M%S"  # yyyyMMddHHmmss, always GMT+7


def format_time(at: datetime) -> str:
    if at.tzinfo is None:
        raise ValueError(f"naive datetime {at.isoformat()}: VNPAY times need an offset")
    return at.astimezone(VIETNAM_TZ).strftime(TIME_FORMAT)


def payment_params(
    order: OrderRequest,
    *,
    return_url: str,
    ip_addr: str,
    locale: str = "vn",
    order_type: str = "other",
    bank_code: str | None = None,
) -> dict[str, str]:
    """The unsigned parameters of the payment URL for `order` (the merchant is its vnp_TmnCode)."""
    params = {
        "vnp_Version": VERSION,
        "vnp_Command": "pay",
        "vnp_TmnCode": order.merchant,
        "vnp_Amount": str(order.amount_vnd * 100),  # VNPAY counts in 1/100 VND
        "vnp_CurrCode": order.currency,
        "vnp_TxnRef": order.txn_ref,
        "vnp_OrderInfo": order.order_info,
        "vnp_OrderType": order_type,  # required by 2.1.0 though not in the contract's list
        "vnp_Locale": locale,
        "vnp_ReturnUrl": return_url,
        "vnp_IpAddr": ip_addr,
        "vnp_CreateDate": format_time(order.created_at),
        "vnp_ExpireDate": format_time(order.expires_at),
    }
    if bank_code:
        params["vnp_BankCode"] = bank_code
    return params


def payment_url(base_url: str, params: Mapping[str, str], secret: str) -> str:
    return (
        f"{base_url}?{vnpay_canonical(params).decode()}&vnp_SecureHash={vnpay_sign(params, secret)}"
    )


# --- IPN ----------------------------------------------------------------------------------------


class IpnParseError(ValueError):
    def __init__(self, field: str, value: str | None, problem: str) -> None:
        self.field, self.value, self.problem = field, value, problem
        shown = "missing" if value is None else repr(value)
        super().__init__(f"{field}={shown}: {problem}")


@dataclass(frozen=True)
class VnpayIpn:
    tmn_code: str
    txn_ref: str
    amount_vnd: int
    currency: str
    response_code: str
    transaction_status: str
    transaction_no: str
    bank_code: str | None
    bank_tran_no: str | None
    card_type: str | None
    pay_date: datetime | None
    order_info: str | None

    @property
    def succeeded(self) -> bool:
        return self.response_code == "00" and self.transaction_status == "00"

    @property
    def event_ref(self) -> str:
        # Unpaid attempts may all carry vnp_TransactionNo "0", so the result is part of the key.
        return f"{self.tmn_code}:{self.txn_ref}:{self.transaction_no}:{self.response_code}"


# vnp_ResponseCode values other than 00, as reasons for payment.failed.
RESPONSE_REASONS: Mapping[str, str] = {
    "07": "suspected_fraud",
    "09": "not_registered_for_internet_banking",
    "10": "authentication_failed_too_often",
    "11": "timeout",
    "12": "account_locked",
    "13": "wrong_otp",
    "24": "cancelled",
    "51": "insufficient_funds",
    "65": "daily_limit_exceeded",
    "75": "bank_maintenance",
    "79": "wrong_password_too_often",
    "99": "gateway_error",
}
# vnp_TransactionStatus values other than 00, for when the response code alone says 00.
STATUS_REASONS: Mapping[str, str] = {
    "01": "not_completed",
    "02": "transaction_error",
    "04": "reversed",
    "05": "refund_in_progress",
    "06": "refund_in_progress",
    "07": "suspected_fraud",
    "09": "refund_rejected",
}


def failure_reason(response_code: str, transaction_status: str) -> str | None:
    """None for a success, else why it failed (unknown codes keep their number)."""
    if response_code != "00":
        return RESPONSE_REASONS.get(response_code, f"response_code_{response_code}")
    if transaction_status != "00":
        return STATUS_REASONS.get(transaction_status, f"transaction_status_{transaction_status}")
    return None


_DIGITS = re.compile(r"[0-9]+")
_CODE = re.compile(r"[0-9]{2}")
_TIME = re.compile(r"[0-9]{14}")


def _required(params: Mapping[str, str], field: str) -> str:
    value = params.get(field)
    if value is None or value == "":
        raise IpnParseError(field, value, "required")
    return value


def _code(params: Mapping[str, str], field: str) -> str:
    value = _required(params, field)
    if not _CODE.fullmatch(value):
        raise IpnParseError(field, value, "expected two digits")
    return value


def _amount_vnd(params: Mapping[str, str]) -> int:
    value = _required(params, "vnp_Amount")
    if not _DIGITS.fullmatch(value):
        raise IpnParseError("vnp_Amount", value, "expected digits only (VND x 100)")
    hundredths = int(value)
    if hundredths == 0:
        raise IpnParseError("vnp_Amount", value, "must be positive")
    if hundredths % 100:
        raise IpnParseError("vnp_Amount", value, "not a whole number of VND (x100)")
    return hundredths // 100


def _pay_date(params: Mapping[str, str]) -> datetime | None:
    value = params.get("vnp_PayDate") or None
    if value is None:
        return None
    try:
        if not _TIME.fullmatch(value):
            raise ValueError
        return datetime.strptime(value, TIME_FORMAT).replace(tzinfo=VIETNAM_TZ)
    except ValueError:
        raise IpnParseError("vnp_PayDate", value, "expected a yyyyMMddHHmmss time") from None


def parse_ipn(params: Mapping[str, str]) -> VnpayIpn:
    """Typed IPN from its (already verified) parameters; IpnParseError names the bad field."""
    return VnpayIpn(
        tmn_code=_required(params, "vnp_TmnCode"),
        txn_ref=_required(params, "vnp_TxnRef"),
        amount_vnd=_amount_vnd(params),
        # VNPAY's IPN omits it and only speaks VND; when present it must match the order.
        currency=params.get("vnp_CurrCode") or "VND",
        response_code=_code(params, "vnp_ResponseCode"),
        transaction_status=_code(params, "vnp_TransactionStatus"),
        transaction_no=_required(params, "vnp_TransactionNo"),
        bank_code=params.get("vnp_BankCode") or None,
        bank_tran_no=params.get("vnp_BankTranNo") or None,
        card_type=params.get("vnp_CardType") or None,
        pay_date=_pay_date(params),
        order_info=params.get("vnp_OrderInfo") or None,
    )


def to_notification(ipn: VnpayIpn, gateway: str = GATEWAY) -> GatewayNotification:
    return GatewayNotification(
        gateway=gateway,
        merchant=ipn.tmn_code,
        txn_ref=ipn.txn_ref,
        amount_vnd=ipn.amount_vnd,
        currency=ipn.currency,
        succeeded=ipn.succeeded,
        failure_reason=failure_reason(ipn.response_code, ipn.transaction_status),
        transaction_no=ipn.transaction_no,
        event_ref=ipn.event_ref,
        paid_at=ipn.pay_date if ipn.succeeded else None,
    )


def handle_ipn(
    params: Mapping[str, str],
    *,
    secrets: Sequence[str],
    find_payment: Callable[[str], Payment | None],
    gateway: str = GATEWAY,
) -> tuple[IpnDecision, GatewayNotification | None]:
    """Verify, parse and decide in VNPAY's order; the notification is None unless it was parsed."""
    if not vnpay_verify(params, secrets):
        return decide_ipn(signature_ok=False, notification=None, find_payment=find_payment), None
    try:
        notification = to_notification(parse_ipn(params), gateway)
    except IpnParseError:
        notification = None
    decision = decide_ipn(signature_ok=True, notification=notification, find_payment=find_payment)
    return decision, notification
