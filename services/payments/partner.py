"""The gateways behind one seam: `vnpay` (CONTRACT section 6) and `jsonpay` (HMAC-SHA256 over JSON).

Each adapter builds the payment URL of an order, asks the gateway about a stuck order, refunds,
and fetches the daily statement; the gateways' notifications come in through `webhook.py`, which
verifies them with the signatures here. Which gateway takes an agency's fees is configuration
(`PAYMENTS_GATEWAY_BY_AGENCY`).

`vnpay` query and refund go to `POST /merchant_webapi/api/transaction` (`vnp_Command` `querydr` or
`refund`), with request and answer signed like the IPN (HMAC-SHA512 over the sorted `vnp_*`
parameters); the statement is `GET /merchant_webapi/statement?date=YYYY-MM-DD` (CSV, the columns of
`statement.STATEMENT_COLUMNS`).

`jsonpay`: every body is JSON signed with hex HMAC-SHA256 of the raw body in `X-Jsonpay-Signature`.
`POST /orders` {merchant, order_ref, amount, currency, description, expires_at, notify_url} answers
{pay_url}; the gateway notifies `POST notify_url` with {merchant, order_ref, amount, currency,
status (`paid`·`failed`·`pending`), transaction_id, reason?, paid_at?}; `GET /orders/{ref}` answers
the same shape (signed); `POST /orders/{ref}/refund` {merchant, order_ref, amount}; `GET /statement`
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import Sequence
from datetime import date, datetime
from typing import Any, Protocol

import httpx
import orjson

from services.common.partner import (
    PartnerClient,
    PartnerError,
    RetryPolicy,
    idempotency_key,
)
from services.common.settings import Settings
from services.common.signing import vnpay_sign, vnpay_verify
from services.common.tz import VIETNAM_TZ
from services.payments import vnpay
from services.payments.domain import (
    GatewayAccount,
    GatewayNotification,
    OrderRequest,
    Payment,
)
from services.payments.settings import PaymentsSettings

JSONPAY = "jsonpay"
JSONPAY_SIGNATURE = "X-Jsonpay-Signature"
# The gateways' IPN route (served by `webhook.py`), also handed to a gateway as its notify URL.
WEBHOOK_PATH = "/v1/webhooks/payments/{gateway}"


def notify_url(public_url: str, gateway: str) -> str:
    """Where a gateway sends its notifications for our orders."""
    return public_url.rstrip("/") + WEBHOOK_PATH.format(gateway=gateway)


class Gateway(Protocol):
    name: str
    merchant: str

    def account(self) -> GatewayAccount: ...

    async def payment_url(self, order: OrderRequest) -> str: ...

    async def query(self, payment: Payment) -> GatewayNotification | None: ...

    async def refund(
        self, payment: Payment, amount_vnd: int | None = None, request_id: str | None = None
    ) -> bool:
        """Hand back `amount_vnd` (None: the whole amount); True once the gateway confirms.
        `request_id` names one refund: asked again, the gateway answers it as done."""
        ...

    async def statement(self, day: date) -> str: ...

    async def aclose(self) -> None: ...


class VnpayGateway:
    """CONTRACT section 6: HMAC-SHA512 query hash, amounts x100, RspCode replies."""

    name = vnpay.GATEWAY

    def __init__(
        self,
        settings: Settings,
        payments: PaymentsSettings,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.merchant = settings.vnpay_tmn_code
        self._secrets = list(settings.vnpay_secrets)
        self._base = settings.vnpay_url.rstrip("/")
        self._return_url = payments.return_url
        self._client = PartnerClient(
            self._base,
            timeout=payments.gateway_timeout_seconds,
            retry=RetryPolicy(attempts=3, base_delay=0.1, max_delay=1.0),
            transport=transport,
        )

    def account(self) -> GatewayAccount:
        return GatewayAccount(self.name, self.merchant)

    async def payment_url(self, order: OrderRequest) -> str:
        params = vnpay.payment_params(order, return_url=self._return_url, ip_addr="127.0.0.1")
        return vnpay.payment_url(f"{self._base}/paymentv2/vpcpay.html", params, self._secrets[0])

    async def _transaction(
        self, params: dict[str, str], purpose: str, request: str | None = None
    ) -> dict[str, str]:
        params["vnp_SecureHash"] = vnpay_sign(params, self._secrets[0])
        what = purpose if request is None else f"{purpose}/{request}"
        response = await self._client.request(
            "POST",
            "/merchant_webapi/api/transaction",
            json=params,
            idempotency_key=idempotency_key("motcua/payments", params["vnp_TxnRef"], what),
        )
        answer = {str(k): str(v) for k, v in response.json().items()}
        if not vnpay_verify(answer, self._secrets):
            raise PartnerError("unsigned answer from the gateway", retryable=True)
        return answer

    def _base_params(self, payment: Payment, command: str) -> dict[str, str]:
        return {
            "vnp_RequestId": uuid.uuid4().hex,
            "vnp_Version": vnpay.VERSION,
            "vnp_Command": command,
            "vnp_TmnCode": payment.merchant,
            "vnp_TxnRef": payment.txn_ref,
            "vnp_TransactionDate": vnpay.format_time(payment.created_at),
            "vnp_CreateDate": vnpay.format_time(datetime.now(VIETNAM_TZ)),
            "vnp_IpAddr": "127.0.0.1",
            "vnp_OrderInfo": f"{command} {payment.txn_ref}",
        }

    async def query(self, payment: Payment) -> GatewayNotification | None:
        """The gateway's final word on the order, or None while it has none (or knows none)."""
        answer = await self._transaction(self._base_params(payment, "querydr"), "querydr")
        if answer.get("vnp_QueryCode", "00") != "00":
            return None  # 91: order unknown at the gateway (never opened)
        if answer.get("vnp_TransactionStatus") == "01":
            return None  # not completed yet
        try:  # signed: `_transaction` verified it
            return vnpay.to_notification(vnpay.parse_ipn(answer))
        except vnpay.IpnParseError:
            return None

    async def refund(
        self, payment: Payment, amount_vnd: int | None = None, request_id: str | None = None
    ) -> bool:
        params = self._base_params(payment, "refund")
        amount = payment.amount_vnd if amount_vnd is None else amount_vnd
        # 02 the whole amount, 03 part of it
        params["vnp_TransactionType"] = "02" if amount == payment.amount_vnd else "03"
        params["vnp_Amount"] = str(amount * 100)
        params["vnp_CreateBy"] = "motcua"
        if request_id is not None:
            params["vnp_RequestId"] = request_id
        answer = await self._transaction(params, "refund", request_id)
        # 00 refunded now (or this very request already was); 94 a whole refund of this order
        # is already done or under way (only ever said to a request that names no refund).
        codes = {"00"} if request_id is not None else {"00", "94"}
        return answer.get("vnp_ResponseCode") in codes

    async def statement(self, day: date) -> str:
        response = await self._client.request(
            "GET", "/merchant_webapi/statement", params={"date": day.isoformat()}
        )
        return response.text

    async def aclose(self) -> None:
        await self._client.aclose()


# --- jsonpay ------------------------------------------------------------------------------------


def jsonpay_sign(body: bytes, secret: str) -> str:
    return hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def jsonpay_verify(body: bytes, signature: str | None, secrets: Sequence[str]) -> bool:
    given = (signature or "").strip().lower().encode()
    found = False
    for secret in secrets:  # every secret, so timing tells nothing
        found |= hmac.compare_digest(given, jsonpay_sign(body, secret).encode())
    return bool(given) and found


def jsonpay_notification(value: Any) -> GatewayNotification | None:
    """A final jsonpay status as a notification; None for `pending` or a malformed body."""
    if not isinstance(value, dict):
        return None
    try:
        status = str(value["status"])
        if status not in {"paid", "failed"}:
            return None
        amount = value["amount"]
        if not isinstance(amount, int) or isinstance(amount, bool) or amount <= 0:
            return None
        paid = datetime.fromisoformat(str(value["paid_at"])) if value.get("paid_at") else None
        if paid is not None and paid.tzinfo is None:
            return None
        transaction = str(value["transaction_id"])
        merchant, ref = str(value["merchant"]), str(value["order_ref"])
        return GatewayNotification(
            gateway=JSONPAY,
            merchant=merchant,
            txn_ref=ref,
            amount_vnd=amount,
            currency=str(value.get("currency") or "VND"),
            succeeded=status == "paid",
            failure_reason=None if status == "paid" else str(value.get("reason") or "failed"),
            transaction_no=transaction,
            event_ref=f"{merchant}:{ref}:{transaction}:{status}",
            paid_at=paid if status == "paid" else None,
        )
    except (KeyError, ValueError, TypeError):
        return None


class JsonpayGateway:
    name = JSONPAY

    def __init__(
        self,
        settings: Settings,
        payments: PaymentsSettings,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.merchant = payments.jsonpay_merchant
        self._secrets = list(payments.jsonpay_secrets)
        self._notify_url = notify_url(settings.payments_public_url, JSONPAY)
        # The signature covers the exact bytes sent, so the body is serialized here.
        self._client = PartnerClient(
            payments.jsonpay_url.rstrip("/"),
            timeout=payments.gateway_timeout_seconds,
            retry=RetryPolicy(attempts=3, base_delay=0.1, max_delay=1.0),
            transport=transport,
        )

    def account(self) -> GatewayAccount:
        return GatewayAccount(self.name, self.merchant)

    async def _call(self, method: str, path: str, payload: Any | None, purpose: str) -> Any:
        body = orjson.dumps(payload) if payload is not None else b""
        headers = {"content-type": "application/json"}
        if payload is not None:
            headers[JSONPAY_SIGNATURE] = jsonpay_sign(body, self._secrets[0])
        response = await self._client.request(
            method,
            path,
            content=body if payload is not None else None,
            headers=headers,
            idempotency_key=idempotency_key("motcua/payments", path, purpose),
        )
        if not jsonpay_verify(
            response.content, response.headers.get(JSONPAY_SIGNATURE), self._secrets
        ):
            raise PartnerError("unsigned answer from the gateway", retryable=True)
        return orjson.loads(response.content)

    async def payment_url(self, order: OrderRequest) -> str:
        answer = await self._call(
            "POST",
            "/orders",
            {
                "merchant": order.merchant,
                "order_ref": order.txn_ref,
                "amount": order.amount_vnd,
                "currency": order.currency,
                "description": order.order_info,
                "expires_at": order.expires_at.isoformat(),
                "notify_url": self._notify_url,
            },
            "create",
        )
        return str(answer["pay_url"])

    async def query(self, payment: Payment) -> GatewayNotification | None:
        answer = await self._call("GET", f"/orders/{payment.txn_ref}", None, "query")
        return jsonpay_notification(answer)

    async def refund(
        self, payment: Payment, amount_vnd: int | None = None, request_id: str | None = None
    ) -> bool:
        body: dict[str, Any] = {
            "merchant": payment.merchant,
            "order_ref": payment.txn_ref,
            "amount": payment.amount_vnd if amount_vnd is None else amount_vnd,
        }
        if request_id is not None:
            body["refund_id"] = request_id
        answer = await self._call(
            "POST",
            f"/orders/{payment.txn_ref}/refund",
            body,
            "refund" if request_id is None else f"refund/{request_id}",
        )
        return isinstance(answer, dict) and answer.get("status") == "refunded"

    async def statement(self, day: date) -> str:
        response = await self._client.request("GET", "/statement", params={"date": day.isoformat()})
        return response.text

    async def aclose(self) -> None:
        await self._client.aclose()


GATEWAY_NAMES: tuple[str, ...] = (vnpay.GATEWAY, JSONPAY)


def gateways(settings: Settings, payments: PaymentsSettings) -> dict[str, Gateway]:
    return {
        vnpay.GATEWAY: VnpayGateway(settings, payments),
        JSONPAY: JsonpayGateway(settings, payments),
    }
