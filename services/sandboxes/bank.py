"""A fake gateway for dev, demo and tests: `vnpay` (CONTRACT section 6) and `jsonpay`, one process.

Payment pages pay themselves: opening an order's payment URL schedules the payment, whose result
follows a configurable outcome mix (`00` success, `24` cancelled, `51` insufficient funds, `11`
timed out; always `11` for a page opened after the order expired), then a signed IPN goes to
`PAYMENTS_PUBLIC_URL` (retried while the service is down or answers `99`). Faults, set per run
(`POST /sandbox/config` or `VNPAY_SANDBOX_CONFIG`), one per order at most, drawn
deterministically from the txn ref: `duplicate` IPNs, `out_of_order` (a stale failure after the
success), `late_success` (paid after the order expired), `wrong_amount` (a validly signed IPN
with another amount before the real one), `forged` (a success with a bad signature before the
real result), `missing` (no IPN: only the query tells). The statement can carry differences too
(`statement_faults`: omit, amount, status; `extra_rows`).

For tests: `GET /sandbox/orders` (what each order kept was charged and refunded, its outcome,
fault and the replies it got), `GET /sandbox/totals` (running totals since the start) and
`GET /sandbox/statement-faults?date=` (the differences injected).

Refunds, whole or partial: VNPAY's `refund` command (`vnp_TransactionType` 02 all that is left, 03
`vnp_Amount`), JSON `POST /jsonpay/orders/{ref}/refund` with `amount` and `refund_id`. A request
id (`vnp_RequestId`, `refund_id`) asked again gets the same answer and refunds nothing more;
`refuse_refunds` (a share of orders, drawn from the txn ref) makes the bank refuse theirs.

Memory follows the orders in flight: an order is forgotten once it is settled (paid, failed or
refunded, and no IPN or notification left to send; one whose page was never opened, once it
expired) and `SANDBOX_RETAIN_SECONDS` passed since its last change, and never before that time
has passed since the end of its payment's day in Vietnam (so the statement of a day is whole
the day after, when the reconciliation reads it). The totals are running integers and stay. A
request about a forgotten order is answered as for an unknown one: `91` to a VNPAY query or
refund, `unknown` to a JSON query, `refused` to a JSON refund, 404 to its JSON payment page.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson
from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, Field

from services.common.due import DueIndex
from services.common.kept_json import dumps_kept
from services.common.logging import get_logger
from services.common.partner import http_client
from services.common.service import add_operational_routes, always_ready, serve_http
from services.common.settings import Settings
from services.common.signing import vnpay_sign, vnpay_verify
from services.common.tz import VIETNAM_TZ
from services.payments import vnpay
from services.payments.partner import JSONPAY, JSONPAY_SIGNATURE, jsonpay_sign, jsonpay_verify
from services.payments.settings import PaymentsSettings
from services.payments.statement import StatementRow, local_day, statement_csv

log = get_logger("motcua.vnpay_sandbox")

FAULTS = ("duplicate", "out_of_order", "late_success", "wrong_amount", "forged", "missing")


class SandboxConfig(BaseModel):
    outcomes: dict[str, float] = Field(
        default_factory=lambda: {"00": 0.7, "24": 0.1, "51": 0.1, "11": 0.1}
    )
    faults: dict[str, float] = Field(default_factory=dict)
    statement_faults: dict[str, float] = Field(default_factory=dict)  # omit, amount, status
    extra_rows: int = 0
    # The share of orders whose refunds the bank refuses (drawn from the txn ref, like faults).
    refuse_refunds: float = 0.0
    pay_delay_seconds: float = 0.2
    late_after_expiry_seconds: float = 3.0
    ipn_attempts: int = 120
    ipn_retry_seconds: float = 0.5
    seed: str = "motcua"


def uniform(seed: str, salt: str, ref: str) -> float:
    digest = hashlib.sha256(f"{seed}\x00{salt}\x00{ref}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def pick(weights: dict[str, float], u: float) -> str | None:
    """The key whose cumulative band holds `u` (weights are probabilities; the rest is None)."""
    total = 0.0
    for key, weight in weights.items():
        total += weight
        if u < total:
            return key
    return None


@dataclass
class Order:
    gateway: str
    txn_ref: str
    merchant: str
    amount_vnd: int
    currency: str
    order_info: str
    expires_at: datetime
    outcome: str
    fault: str | None
    notify_url: str = ""
    status: str = "pending"  # pending, paid, failed, refunded
    transaction_no: str = ""
    paid_at: datetime | None = None
    charges: int = 0
    refunds: int = 0
    refunded_vnd: int = 0  # handed back so far; the order is `refunded` once it is all
    refund_requests: dict[str, str] = field(default_factory=dict)  # request id -> answer code
    replies: list[str] = field(default_factory=list)
    busy: bool = False  # its payment is under way or its notifications are being sent

    @property
    def dossier_id(self) -> str:
        return self.order_info.rsplit(" ", 1)[-1]

    def view(self) -> dict[str, Any]:
        value = asdict(self)
        del value["busy"]
        value["dossier_id"] = self.dossier_id
        value["expires_at"] = self.expires_at.isoformat()
        value["paid_at"] = self.paid_at.isoformat() if self.paid_at else None
        return value


# running totals since the start, kept when the orders they count are forgotten
TOTALS = ("orders", "charges", "refunds", "forgotten")


def utc_now() -> datetime:
    return datetime.now(UTC)


def end_of_local_day(at: datetime) -> datetime:
    """The end of `at`'s day in Vietnam (the day its statement row is on)."""
    return datetime.combine(local_day(at) + timedelta(days=1), time.min, VIETNAM_TZ)


class Sandbox:
    """The fake gateways' orders. `clock` and `settings.sandbox_retain_seconds` decide when a
    settled order is forgotten (`sweep`, run on every request about an order and every read of
    the sandbox's own routes)."""

    def __init__(
        self,
        settings: Settings,
        payments: PaymentsSettings,
        config: SandboxConfig,
        clock: Callable[[], datetime] = utc_now,
    ):
        self.settings = settings
        self.config = config
        self.vnpay_secrets = list(settings.vnpay_secrets)
        self.jsonpay_secrets = list(payments.jsonpay_secrets)
        self.public = settings.vnpay_url.rstrip("/")
        self.ipn_url = f"{settings.payments_public_url.rstrip('/')}/v1/webhooks/payments/vnpay"
        self.retain = timedelta(seconds=settings.sandbox_retain_seconds)
        self.clock = clock
        self.orders: dict[str, Order] = {}
        self.retiring = DueIndex()  # settled orders by the moment they are forgotten
        self.totals: dict[str, int] = dict.fromkeys(TOTALS, 0)
        self.tasks: set[asyncio.Task[None]] = set()
        self.numbers = itertools.count(14_000_000)
        self.client = http_client(timeout=10.0)

    # --- what is kept, and for how long --------------------------------------------------------

    def changed(self, order: Order) -> None:
        """Something happened to the order: once settled, it is forgotten `retain` after this
        moment (after the end of its payment's day, and after its expiry if never opened)."""
        if order.busy:
            due = None
        else:
            due = self.clock() + self.retain
            if order.paid_at is not None:
                due = max(due, end_of_local_day(order.paid_at) + self.retain)
            if order.status == "pending":  # its page was never opened
                expires = order.expires_at
                if expires.tzinfo is None:
                    expires = expires.replace(tzinfo=VIETNAM_TZ)
                due = max(due, expires + self.retain)
        self.retiring.set(order.txn_ref, due)

    def sweep(self) -> None:
        """Forget the orders due (only those: no scan of what is kept)."""
        for ref in self.retiring.pop_due(self.clock()):
            order = self.orders.get(ref)
            if order is not None and not order.busy:
                del self.orders[ref]
                self.totals["forgotten"] += 1

    # --- orders ---------------------------------------------------------------------------------

    def register(self, **kw: Any) -> tuple[Order, bool]:
        self.sweep()
        ref = str(kw["txn_ref"])
        if ref in self.orders:
            return self.orders[ref], False
        fault = pick(self.config.faults, uniform(self.config.seed, "fault", ref))
        outcome = pick(self.config.outcomes, uniform(self.config.seed, "outcome", ref)) or "00"
        if fault in ("late_success", "out_of_order"):
            outcome = "00"
        order = Order(outcome=outcome, fault=fault, **kw)
        self.orders[ref] = order
        self.totals["orders"] += 1
        self.changed(order)
        return order, True

    def start(self, order: Order) -> None:
        if order.fault != "late_success" and datetime.now(VIETNAM_TZ) >= order.expires_at:
            # like the real gateway: a page opened after the order expired cannot be paid
            order.outcome = "11"
        order.busy = True
        self.changed(order)
        task = asyncio.create_task(self.paying(order))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def paying(self, order: Order) -> None:
        try:
            await self.pay(order)
        finally:
            order.busy = False
            self.changed(order)

    def refund(self, order: Order, amount_vnd: int | None = None) -> None:
        """Hand back `amount_vnd` (None: all that is left); the order is `refunded` once all is."""
        order.refunded_vnd += (
            order.amount_vnd - order.refunded_vnd if amount_vnd is None else amount_vnd
        )
        if order.refunded_vnd >= order.amount_vnd:
            order.status = "refunded"
        order.refunds += 1
        self.totals["refunds"] += 1
        self.changed(order)

    def refund_answer(self, order: Order | None, request_id: str, amount_vnd: int) -> str:
        """A VNPAY refund's code: 00 done (also to the same request again), 91 no paid order,
        95 the bank refuses (`refuse_refunds`), 94 all of it went back already, 93 more than is
        left."""
        if order is not None and request_id in order.refund_requests:
            return order.refund_requests[request_id]
        if order is None or order.status not in ("paid", "refunded"):
            return "91"
        if uniform(self.config.seed, "refund", order.txn_ref) < self.config.refuse_refunds:
            code = "95"
        elif order.status == "refunded":
            code = "94"
        elif amount_vnd > order.amount_vnd - order.refunded_vnd:
            code = "93"
        else:
            self.refund(order, amount_vnd)
            code = "00"
        order.refund_requests[request_id] = code
        return code

    async def pay(self, order: Order) -> None:
        if order.fault == "late_success":
            wait = (order.expires_at - datetime.now(VIETNAM_TZ)).total_seconds()
            await asyncio.sleep(max(0.0, wait) + self.config.late_after_expiry_seconds)
        else:
            await asyncio.sleep(self.config.pay_delay_seconds)
        order.transaction_no = str(next(self.numbers))
        if order.outcome == "00":
            order.status = "paid"
            order.charges += 1
            self.totals["charges"] += 1
            order.paid_at = datetime.now(VIETNAM_TZ).replace(microsecond=0)
        else:
            order.status = "failed"
        if order.gateway == JSONPAY:
            await self.notify_jsonpay(order)
            return
        real = self.ipn_params(order)
        fault = order.fault
        if fault == "missing":
            return
        if fault == "wrong_amount":
            await self.send_ipn(order, self.ipn_params(order, amount_vnd=order.amount_vnd + 1000))
        if fault == "forged":
            forged = self.ipn_params(order, response="00")
            forged["vnp_SecureHash"] = vnpay_sign(forged, "not-the-secret")
            await self.send_ipn(order, forged)
        if fault == "duplicate":
            await asyncio.gather(*(self.send_ipn(order, real) for _ in range(3)))
            await asyncio.sleep(0.5)
        await self.send_ipn(order, real)
        if fault == "out_of_order":
            stale = self.ipn_params(order, response="24", transaction_no="0")
            await self.send_ipn(order, stale)

    def ipn_params(
        self,
        order: Order,
        *,
        amount_vnd: int | None = None,
        response: str | None = None,
        transaction_no: str | None = None,
    ) -> dict[str, str]:
        code = response or order.outcome
        params = {
            "vnp_TmnCode": order.merchant,
            "vnp_Amount": str((amount_vnd or order.amount_vnd) * 100),
            "vnp_BankCode": "NCB",
            "vnp_CardType": "ATM",
            "vnp_OrderInfo": order.order_info,
            "vnp_TransactionNo": transaction_no or order.transaction_no or "0",
            "vnp_ResponseCode": code,
            "vnp_TransactionStatus": "00" if code == "00" else "02",
            "vnp_TxnRef": order.txn_ref,
            "vnp_SecureHashType": "HmacSHA512",
        }
        if code == "00":
            paid = order.paid_at or datetime.now(VIETNAM_TZ)
            params["vnp_PayDate"] = vnpay.format_time(paid)
            params["vnp_BankTranNo"] = f"VNP{params['vnp_TransactionNo']}"
        params["vnp_SecureHash"] = vnpay_sign(params, self.vnpay_secrets[0])
        return params

    async def send_ipn(self, order: Order, params: dict[str, str]) -> None:
        """GET the IPN like VNPAY does; retried while unanswered or answered 99."""
        url = f"{self.ipn_url}?{urlencode(params)}"
        if not await self.notify(order, lambda: self.client.get(url)):
            order.replies.append("unanswered")

    async def notify(self, order: Order, call: Callable[[], Awaitable[httpx.Response]]) -> bool:
        """Make the notification call until the merchant answers it with a final `RspCode`
        (not 99), at most `ipn_attempts` times; its answer goes to `order.replies`."""
        for _ in range(self.config.ipn_attempts):
            try:
                response = await call()
                code = str(response.json().get("RspCode")) if response.status_code == 200 else ""
            except (httpx.HTTPError, ValueError):
                code = ""
            if code and code != "99":
                order.replies.append(code)
                return True
            await asyncio.sleep(self.config.ipn_retry_seconds)
        return False

    # --- jsonpay --------------------------------------------------------------------------------

    def signed_json(self, value: Any, status_code: int = 200) -> Response:
        body = orjson.dumps(value)
        return Response(
            body,
            status_code=status_code,
            media_type="application/json",
            headers={JSONPAY_SIGNATURE: jsonpay_sign(body, self.jsonpay_secrets[0])},
        )

    def jsonpay_status(self, order: Order) -> dict[str, Any]:
        status = {"paid": "paid", "failed": "failed", "refunded": "paid"}.get(order.status)
        value: dict[str, Any] = {
            "merchant": order.merchant,
            "order_ref": order.txn_ref,
            "amount": order.amount_vnd,
            "currency": order.currency,
            "status": status or "pending",
            "transaction_id": order.transaction_no or "0",
        }
        if order.paid_at:
            value["paid_at"] = order.paid_at.isoformat()
        if order.status == "failed":
            value["reason"] = vnpay.RESPONSE_REASONS.get(order.outcome, "failed")
        return value

    async def notify_jsonpay(self, order: Order) -> None:
        if order.fault == "missing":
            return
        body = dumps_kept(self.jsonpay_status(order))  # held while the notification is retried
        headers = {
            "content-type": "application/json",
            JSONPAY_SIGNATURE: jsonpay_sign(body, self.jsonpay_secrets[0]),
        }
        await self.notify(
            order, lambda: self.client.post(order.notify_url, content=body, headers=headers)
        )

    # --- statement ------------------------------------------------------------------------------

    def statement(self, gateway: str, day: date) -> tuple[str, list[dict[str, str]]]:
        rows: list[StatementRow] = []
        injected: list[dict[str, str]] = []
        faults = self.config.statement_faults
        for order in sorted(self.orders.values(), key=lambda o: o.txn_ref):
            if order.gateway != gateway or order.paid_at is None:
                continue
            if local_day(order.paid_at) != day:
                continue
            amount = order.amount_vnd
            status = "refunded" if order.status == "refunded" else "succeeded"
            kind = pick(faults, uniform(self.config.seed, f"statement:{day}", order.txn_ref))
            if kind == "omit":
                injected.append({"kind": "missing_in_statement", "txn_ref": order.txn_ref})
                continue
            if kind == "amount":
                amount += 1000
                injected.append({"kind": "amount_mismatch", "txn_ref": order.txn_ref})
            if kind == "status":
                status = "succeeded" if status == "refunded" else "refunded"
                injected.append({"kind": "status_mismatch", "txn_ref": order.txn_ref})
            rows.append(
                StatementRow(
                    txn_ref=order.txn_ref,
                    transaction_no=order.transaction_no,
                    amount_vnd=amount,
                    status="refunded" if status == "refunded" else "succeeded",
                    paid_at=order.paid_at,
                    bank_code="NCB",
                )
            )
        for i in range(self.config.extra_rows):
            ref = f"SANDBOXEXTRA{day.strftime('%Y%m%d')}{i:04d}"
            at = datetime.combine(day, datetime.min.time(), VIETNAM_TZ) + timedelta(hours=12)
            rows.append(StatementRow(ref, f"9{i:07d}", 50_000, "succeeded", at, "NCB"))
            injected.append({"kind": "missing_in_ledger", "txn_ref": ref})
        return statement_csv(rows), injected


def create_app(
    settings: Settings,
    config: SandboxConfig | None = None,
    clock: Callable[[], datetime] = utc_now,
) -> FastAPI:
    payments = PaymentsSettings()
    sandbox = Sandbox(settings, payments, config or SandboxConfig(), clock)
    api = FastAPI(title="motcua VNPAY-style sandbox", version="1.0")
    api.state.sandbox = sandbox

    add_operational_routes(api, always_ready)

    @api.post("/sandbox/config")
    async def set_config(config: SandboxConfig) -> dict[str, Any]:
        sandbox.config = config
        return config.model_dump()

    @api.get("/sandbox/orders")
    async def orders() -> dict[str, Any]:
        sandbox.sweep()
        return {ref: o.view() for ref, o in sandbox.orders.items()}

    @api.get("/sandbox/totals")
    async def totals() -> dict[str, int]:
        sandbox.sweep()
        return {**sandbox.totals, "kept": len(sandbox.orders)}

    @api.get("/sandbox/statement-faults")
    async def statement_faults(date: date, gateway: str = "vnpay") -> list[dict[str, str]]:
        return sandbox.statement(gateway, date)[1]

    @api.get("/paymentv2/vpcpay.html")
    async def pay_page(request: Request) -> HTMLResponse:
        params = dict(request.query_params)
        if not vnpay_verify(params, sandbox.vnpay_secrets):
            return HTMLResponse("<h1>Sai chữ ký (invalid signature)</h1>", status_code=400)
        try:
            amount = int(params["vnp_Amount"]) // 100
            expires = datetime.strptime(params["vnp_ExpireDate"], vnpay.TIME_FORMAT).replace(
                tzinfo=VIETNAM_TZ
            )
            order, new = sandbox.register(
                gateway="vnpay",
                txn_ref=params["vnp_TxnRef"],
                merchant=params["vnp_TmnCode"],
                amount_vnd=amount,
                currency=params.get("vnp_CurrCode", "VND"),
                order_info=params.get("vnp_OrderInfo", ""),
                expires_at=expires,
            )
        except (KeyError, ValueError):
            return HTMLResponse("<h1>Thiếu tham số (missing parameters)</h1>", status_code=400)
        if new:
            sandbox.start(order)
        return HTMLResponse(
            f"<h1>Đang thanh toán {order.amount_vnd} VND</h1>"
            f"<p>Order {order.txn_ref}: this page pays itself.</p>"
        )

    @api.post("/merchant_webapi/api/transaction")
    async def transaction(request: Request) -> JSONResponse:
        try:
            params = {str(k): str(v) for k, v in orjson.loads(await request.body()).items()}
        except (orjson.JSONDecodeError, AttributeError):
            return JSONResponse({"vnp_ResponseCode": "03"}, status_code=400)
        if not vnpay_verify(params, sandbox.vnpay_secrets):
            return JSONResponse({"vnp_ResponseCode": "97"}, status_code=200)
        sandbox.sweep()
        order = sandbox.orders.get(params.get("vnp_TxnRef", ""))
        command = params.get("vnp_Command")
        answer: dict[str, str]
        if command == "querydr":
            if order is None:
                answer = {"vnp_QueryCode": "91", "vnp_TxnRef": params.get("vnp_TxnRef", "")}
            elif order.status == "pending":
                answer = {
                    "vnp_QueryCode": "00",
                    "vnp_TxnRef": order.txn_ref,
                    "vnp_TransactionStatus": "01",
                }
            else:
                answer = {
                    k: v
                    for k, v in sandbox.ipn_params(order).items()
                    if k not in ("vnp_SecureHash", "vnp_SecureHashType")
                }
                answer["vnp_QueryCode"] = "00"
            answer["vnp_Command"] = "querydr"
        elif command == "refund":
            try:
                amount = int(params.get("vnp_Amount", "")) // 100
            except ValueError:
                amount = 0
            if order is not None and params.get("vnp_TransactionType") == "02":
                amount = order.amount_vnd - order.refunded_vnd or order.amount_vnd
            code = sandbox.refund_answer(order, params.get("vnp_RequestId", ""), amount)
            answer = {"vnp_Command": "refund", "vnp_ResponseCode": code}
            answer["vnp_TxnRef"] = params.get("vnp_TxnRef", "")
        else:
            answer = {"vnp_ResponseCode": "02", "vnp_Command": str(command)}
        answer["vnp_SecureHash"] = vnpay_sign(answer, sandbox.vnpay_secrets[0])
        return JSONResponse(answer)

    @api.get("/merchant_webapi/statement")
    async def vnpay_statement(date: date) -> Response:
        return Response(sandbox.statement("vnpay", date)[0], media_type="text/csv")

    # --- jsonpay ---------------------------------------------------------------------------------

    async def verified_json(request: Request) -> Any:
        body = await request.body()
        if not jsonpay_verify(
            body, request.headers.get(JSONPAY_SIGNATURE), sandbox.jsonpay_secrets
        ):
            return None
        return orjson.loads(body)

    @api.post("/jsonpay/orders")
    async def jsonpay_create(request: Request) -> Response:
        value = await verified_json(request)
        if not isinstance(value, dict):
            return sandbox.signed_json({"error": "invalid signature"}, 401)
        order, _ = sandbox.register(
            gateway=JSONPAY,
            txn_ref=str(value["order_ref"]),
            merchant=str(value["merchant"]),
            amount_vnd=int(value["amount"]),
            currency=str(value.get("currency", "VND")),
            order_info=str(value.get("description", "")),
            expires_at=datetime.fromisoformat(str(value["expires_at"])),
            notify_url=str(value["notify_url"]),
        )
        return sandbox.signed_json(
            {"order_ref": order.txn_ref, "pay_url": f"{sandbox.public}/jsonpay/pay/{order.txn_ref}"}
        )

    @api.get("/jsonpay/pay/{ref}")
    async def jsonpay_page(ref: str) -> HTMLResponse:
        sandbox.sweep()
        order = sandbox.orders.get(ref)
        if order is None:
            return HTMLResponse("<h1>Unknown order</h1>", status_code=404)
        if order.status == "pending" and not order.transaction_no:
            order.transaction_no = "starting"
            sandbox.start(order)
        return HTMLResponse(f"<h1>Paying {order.amount_vnd} VND</h1>")

    @api.get("/jsonpay/orders/{ref}")
    async def jsonpay_query(ref: str) -> Response:
        sandbox.sweep()
        order = sandbox.orders.get(ref)
        if order is None:
            return sandbox.signed_json({"order_ref": ref, "status": "unknown"})
        return sandbox.signed_json(sandbox.jsonpay_status(order))

    @api.post("/jsonpay/orders/{ref}/refund")
    async def jsonpay_refund(ref: str, request: Request) -> Response:
        value = await verified_json(request)
        sandbox.sweep()
        order = sandbox.orders.get(ref)
        if not isinstance(value, dict) or order is None:
            return sandbox.signed_json({"status": "refused"})
        if "refund_id" in value:  # one refund of part or all of it, answered alike when repeated
            amount = value.get("amount")
            wanted = amount if isinstance(amount, int) else 0
            code = sandbox.refund_answer(order, str(value["refund_id"]), wanted)
            return sandbox.signed_json({"status": "refunded" if code == "00" else "refused"})
        if order.status == "paid":
            sandbox.refund(order)
        return sandbox.signed_json(
            {"status": "refunded" if order.status == "refunded" else "refused"}
        )

    @api.get("/jsonpay/statement")
    async def jsonpay_statement(date: date) -> Response:
        return Response(sandbox.statement(JSONPAY, date)[0], media_type="text/csv")

    @api.on_event("shutdown")
    async def close() -> None:
        for task in list(sandbox.tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await sandbox.client.aclose()

    return api


def run(settings: Settings) -> None:
    import os

    raw = os.environ.get("VNPAY_SANDBOX_CONFIG")
    config = SandboxConfig.model_validate_json(raw) if raw else SandboxConfig()
    serve_http(create_app(settings, config), settings, settings.vnpay_sandbox_port)
