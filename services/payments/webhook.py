"""The gateways' IPNs through the one webhook door (`services.common.webhooks.WebhookIntake`).

`GET|POST /v1/webhooks/payments/{gateway}` (CONTRACT section 6). Per gateway a partner:

- **verify** on the raw bytes: `vnpay` the HMAC-SHA512 `vnp_SecureHash` of the query string (GET)
  or the form body (POST), `jsonpay` the HMAC-SHA256 of the body in `X-Jsonpay-Signature`;
- **parse** into the gateway's notification, claimed by its `event_ref`, the order's Redis
  snapshot read in the same round trip (`ledger.OrderSnapshots`);
- **decide** on that snapshot, or, when Redis has none (restarted empty, expired), on the
  durable ledger (`Ledger.lookup`: this member's table by txn ref), with
  `domain.decide_ipn_on_lookup`: an order neither could find for sure is 99 (the gateway
  retries), never 01; an unknown order or a wrong gateway is refused (01), a wrong amount,
  currency or merchant is refused (04) and announced (`payment.callback_rejected`); anything
  else is written to `payments.callbacks`, keyed by the order's dossier id, for the worker to
  apply. An order already settled answers 02.

The reply is the bank protocol's: always HTTP 200 with `{"RspCode", "Message"}` (`bank_reply`).
A copy of an IPN arriving while the first copy is being written waits for it (`IpnIntake`, at
most `IN_FLIGHT_WAIT_SECONDS`): once the first is durable the copy is answered 02, and if the
first failed the copy is written itself; of any number of identical IPNs, one is answered 00.
`motcua_payments_callbacks_total{gateway,rsp_code}` counts the replies, beside the door's own
`motcua_webhook_calls_total{service,partner,outcome}` (which counts a waiting copy's attempts).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

import orjson
from prometheus_client import Counter
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from services.common.signing import vnpay_verify
from services.common.tz import VIETNAM_TZ
from services.common.webhooks import (
    Callback,
    Decision,
    InboundCall,
    Outcome,
    Rejected,
    WebhookIntake,
    unavailable_response,
)
from services.payments import vnpay
from services.payments.callbacks import notification_message
from services.payments.domain import (
    RSP_MESSAGES,
    GatewayNotification,
    RspCode,
    decide_ipn_on_lookup,
)
from services.payments.ledger import Ledger, LedgerRecord, OrderSnapshots
from services.payments.partner import (
    JSONPAY,
    JSONPAY_SIGNATURE,
    jsonpay_notification,
    jsonpay_verify,
)

PATH_PARAM = "gateway"

CALLBACKS = Counter(
    "motcua_payments_callbacks_total", "Gateway callbacks by reply code", ["gateway", "rsp_code"]
)
# How long a copy of an IPN waits for the first copy to be written before it is answered 99.
IN_FLIGHT_WAIT_SECONDS = 2.0


# --- the partners -------------------------------------------------------------------------------


class GatewayIpn:
    """What every gateway's IPN shares: the claim on its `event_ref` and the decision on the
    order's snapshot. A gateway supplies `verify` and `notification`."""

    name: str

    def __init__(self, snapshots: OrderSnapshots, ledger: Ledger) -> None:
        self._snapshots = snapshots
        self._ledger = ledger

    def verify(self, call: InboundCall) -> None:
        raise NotImplementedError

    def notification(self, call: InboundCall) -> GatewayNotification:
        """The verified call's notification; `Rejected` when the gateway's fields are unusable."""
        raise NotImplementedError

    def parse(self, call: InboundCall) -> Callback:
        note = self.notification(call)
        # The record's key and value are the decision's: the dossier is known once the order's
        # snapshot is read.
        return Callback(
            event_id=note.event_ref,
            key=b"",
            value=b"",
            read=self._snapshots.key(note.txn_ref),
            parsed=note,
        )

    async def find(self, txn_ref: str, snapshot: bytes | None) -> tuple[LedgerRecord | None, bool]:
        """The order's record and whether a miss is certain: the Redis copy read with the claim,
        else the ledger (whose record is copied back to Redis for the next call)."""
        if snapshot:
            return LedgerRecord.from_bytes(snapshot), True
        found = self._ledger.lookup(txn_ref)
        if found.record is not None:
            with contextlib.suppress(RedisError, OSError):
                await self._snapshots.save_missing([(txn_ref, found.record.to_bytes())])
        return found.record, found.complete

    async def decide(self, callback: Callback, record: bytes | None) -> Decision:
        note: GatewayNotification = callback.parsed
        found, certain = await self.find(note.txn_ref, record)
        payment = found.payment if found is not None else None
        decision = decide_ipn_on_lookup(note, payment, certain=certain)
        if decision.cause is None or payment is None:
            if decision.mismatched and payment is not None:
                await self._ledger.reject_callback(payment, note, decision.mismatched, "ipn")
            return Decision(accept=False, detail=decision.rsp_code)
        message = notification_message(note, payment.dossier_id, datetime.now(VIETNAM_TZ), "ipn")
        return Decision(
            accept=True,
            key=payment.dossier_id.encode(),
            value=message.to_bytes(),
            detail=decision.rsp_code,
        )


def vnpay_params(call: InboundCall) -> dict[str, str]:
    """VNPAY parameters from the raw query string (GET) or the form body (POST), as sent."""
    text = call.query if call.query else call.body
    return dict(parse_qsl(text.decode("utf-8", "replace"), keep_blank_values=True))


# The IPN's fields (CONTRACT section 6), for the OpenAPI document: in the query string (GET) or
# the form body (POST), signed by `vnp_SecureHash`.
VNPAY_IPN_FIELDS = (
    "vnp_TmnCode",
    "vnp_TxnRef",
    "vnp_Amount",
    "vnp_CurrCode",
    "vnp_ResponseCode",
    "vnp_TransactionStatus",
    "vnp_TransactionNo",
    "vnp_BankCode",
    "vnp_BankTranNo",
    "vnp_CardType",
    "vnp_PayDate",
    "vnp_OrderInfo",
    "vnp_SecureHashType",
    "vnp_SecureHash",
)
VNPAY_REQUIRED = (
    "vnp_TmnCode",
    "vnp_TxnRef",
    "vnp_Amount",
    "vnp_ResponseCode",
    "vnp_TransactionStatus",
    "vnp_TransactionNo",
    "vnp_SecureHash",
)


class VnpayIpn(GatewayIpn):
    name = vnpay.GATEWAY
    media_type = "application/x-www-form-urlencoded"
    body_schema: Mapping[str, Any] = {
        "type": "object",
        "description": "VNPAY's IPN as a form (POST); a GET carries the same in its query string",
        "properties": {field: {"type": "string"} for field in VNPAY_IPN_FIELDS},
        "required": list(VNPAY_REQUIRED),
    }
    query_parameters = VNPAY_IPN_FIELDS

    def __init__(self, secrets: list[str], snapshots: OrderSnapshots, ledger: Ledger) -> None:
        super().__init__(snapshots, ledger)
        self._secrets = secrets

    def verify(self, call: InboundCall) -> None:
        if not vnpay_verify(vnpay_params(call), self._secrets):
            raise Rejected("invalid signature")

    def notification(self, call: InboundCall) -> GatewayNotification:
        try:
            return vnpay.to_notification(vnpay.parse_ipn(vnpay_params(call)))
        except vnpay.IpnParseError as exc:
            raise Rejected(str(exc)[:200]) from None


class JsonpayIpn(GatewayIpn):
    name = JSONPAY
    body_schema: Mapping[str, Any] = {
        "type": "object",
        "description": f"jsonpay's final status, signed in `{JSONPAY_SIGNATURE}`",
        "properties": {
            "status": {"enum": ["paid", "failed"]},
            "amount": {"type": "integer", "minimum": 1},
            "paid_at": {"type": "string", "format": "date-time"},
            "transaction_id": {"type": "string"},
            "merchant": {"type": "string"},
            "order_ref": {"type": "string"},
        },
        "required": ["status", "amount", "transaction_id", "merchant", "order_ref"],
    }

    def __init__(self, secrets: list[str], snapshots: OrderSnapshots, ledger: Ledger) -> None:
        super().__init__(snapshots, ledger)
        self._secrets = secrets

    def verify(self, call: InboundCall) -> None:
        signature = call.headers.get(JSONPAY_SIGNATURE.lower())
        if not jsonpay_verify(call.body, signature, self._secrets):
            raise Rejected("invalid signature")

    def notification(self, call: InboundCall) -> GatewayNotification:
        try:
            note = jsonpay_notification(orjson.loads(call.body))
        except orjson.JSONDecodeError:
            note = None
        if note is None:
            raise Rejected("not a final jsonpay notification")
        return note


# --- the reply ----------------------------------------------------------------------------------

# The bank's code for what the door did; accepted and refused calls carry the decision's own.
RSP_CODE_OF: Mapping[Outcome, RspCode] = {
    Outcome.ACCEPTED: RspCode.CONFIRMED,
    Outcome.DUPLICATE: RspCode.ALREADY_CONFIRMED,
    Outcome.IN_FLIGHT: RspCode.UNKNOWN_ERROR,
    Outcome.TOO_LARGE: RspCode.UNKNOWN_ERROR,
    Outcome.UNAUTHORIZED: RspCode.INVALID_SIGNATURE,
    Outcome.MALFORMED: RspCode.UNKNOWN_ERROR,
    Outcome.UNKNOWN_PARTNER: RspCode.ORDER_NOT_FOUND,
    Outcome.REFUSED: RspCode.UNKNOWN_ERROR,
    Outcome.UNAVAILABLE: RspCode.UNKNOWN_ERROR,
}

_BODIES: Mapping[RspCode, bytes] = {
    code: orjson.dumps({"RspCode": code.value, "Message": RSP_MESSAGES[code]}) for code in RspCode
}


class BankReply(Response):
    """HTTP 200 with `{"RspCode", "Message"}`, whatever happened (the gateway retries on 99)."""

    media_type = "application/json"

    def __init__(self, code: RspCode, outcome: Outcome | None = None) -> None:
        super().__init__(_BODIES[code], status_code=200)
        self.rsp_code = code
        self.outcome = outcome


def bank_reply(outcome: Outcome, reason: str, detail: Any = None) -> Response:
    if outcome in (Outcome.ACCEPTED, Outcome.REFUSED) and isinstance(detail, RspCode):
        return BankReply(detail, outcome)
    return BankReply(RSP_CODE_OF[outcome], outcome)


IPN_RESPONSES: dict[str, Any] = {
    "200": {
        "description": (
            "Always HTTP 200, the bank protocol's: the outcome is `RspCode` in the body. "
            + "; ".join(f"{code.value} {RSP_MESSAGES[code]}" for code in RspCode)
            + ". 97 is a missing or wrong signature; 99 (the gateway retries) a malformed call, "
            "a body over the cap, an order not certainly found, Redis or the broker away."
        ),
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "RspCode": {"enum": [code.value for code in RspCode]},
                        "Message": {"type": "string"},
                    },
                    "required": ["RspCode", "Message"],
                }
            }
        },
    },
    "503": unavailable_response(
        "never from the IPN itself (an outage is HTTP 200 with RspCode 99); only the service's "
        "shared handler could answer it, for a dependency error no door caught"
    ),
}


class IpnIntake(WebhookIntake):
    """The webhook door with the bank protocol's replies, counted by gateway and code. Built with
    `in_flight_wait=IN_FLIGHT_WAIT_SECONDS`: a copy of an IPN that finds the first copy still
    being written waits for its verdict (durable: 02; failed: this copy is written, 00) and
    answers 99 only after that wait, so two identical IPNs answer 00 then 02, however close
    together they come."""

    async def endpoint(self, request: Request) -> Response:
        """The door's endpoint, its replies counted by gateway and code."""
        response = await super().endpoint(request)
        gateway = str(request.path_params.get(PATH_PARAM, ""))
        code = response.rsp_code if isinstance(response, BankReply) else RspCode.UNKNOWN_ERROR
        CALLBACKS.labels(gateway if gateway in self.partners else "unknown", code.value).inc()
        return response

    def responses(self) -> dict[str, Any]:
        return IPN_RESPONSES
