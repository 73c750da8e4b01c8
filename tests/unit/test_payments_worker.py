"""The payments worker, webhook decisions and sweeper on an in-memory ledger (no broker, no Redis).

The ledger's changelog records, the Redis snapshots and the published events are kept in memory;
the broker, Redis and the batch consumer around them are checked by the integration tests.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord, RecordMetadata, TopicPartition

from services.common.claims import Claim
from services.common.coordination import Keys
from services.common.dead_letters import PoisonMessage
from services.common.events import CloudEvent, parse_event
from services.common.kafka import BrokerUnavailable, DurablePublisher
from services.common.settings import Settings
from services.common.tz import VIETNAM_TZ
from services.common.webhooks import Callback, InboundCall, Outcome
from services.payments.callbacks import CallbackMessage, decode_callback, notification_message
from services.payments.domain import (
    GatewayAccount,
    GatewayNotification,
    OrderRequest,
    Payment,
    PaymentState,
    RspCode,
    txn_ref_for,
)
from services.payments.ledger import Ledger, LedgerRecord, OrderSnapshots, ledger_table
from services.payments.settings import PaymentsSettings
from services.payments.sweeper import Sweeper
from services.payments.webhook import (
    IN_FLIGHT_WAIT_SECONDS,
    BankReply,
    GatewayIpn,
    IpnIntake,
    bank_reply,
)
from services.payments.worker import PaymentsWorker, decode_input
from tests.support.factories import submitted

MERCHANT = "MOTCUADEV"


class FakeGateway:
    name = "vnpay"
    merchant = MERCHANT

    def __init__(self) -> None:
        self.refunds = 0

    def account(self) -> GatewayAccount:
        return GatewayAccount(self.name, self.merchant)

    async def payment_url(self, order: OrderRequest) -> str:
        return f"http://gateway/pay/{order.txn_ref}"

    async def query(self, payment: Payment) -> GatewayNotification | None:
        return None

    async def refund(
        self, payment: Payment, amount_vnd: int | None = None, request_id: str | None = None
    ) -> bool:
        self.refunds += 1
        return True

    async def statement(self, day: date) -> str:
        return ""

    async def aclose(self) -> None:
        return None


class MemorySnapshots(OrderSnapshots):
    def __init__(self) -> None:
        super().__init__(None, Keys("test"), 60)  # type: ignore[arg-type]
        self.saved: dict[str, bytes] = {}

    async def save(self, records: Sequence[LedgerRecord]) -> None:
        for record in records:
            self.saved[self.key(record.payment.txn_ref)] = record.to_bytes()

    async def get(self, txn_ref: str) -> LedgerRecord | None:
        raw = self.saved.get(self.key(txn_ref))
        return LedgerRecord.from_bytes(raw) if raw else None

    async def get_many(self, txn_refs: Sequence[str]) -> dict[str, LedgerRecord]:
        found = {ref: await self.get(ref) for ref in txn_refs}
        return {ref: record for ref, record in found.items() if record is not None}

    async def still_there(self, marker: str, ttl_seconds: int) -> bool:
        return f"marker:{marker}" in self.saved

    async def save_missing(self, copies: Sequence[tuple[str, bytes]], chunk: int = 1000) -> None:
        for txn_ref, raw in copies:
            self.saved.setdefault(self.key(txn_ref), raw)

    async def mark(self, marker: str, ttl_seconds: int) -> None:
        self.saved[f"marker:{marker}"] = b"1"


class Published:
    def __init__(self) -> None:
        self.events: list[CloudEvent[Any]] = []
        self.failures = 0  # calls to fail before the broker answers again

    async def __call__(self, events: Sequence[CloudEvent[Any]]) -> None:
        if self.failures:
            self.failures -= 1
            raise BrokerUnavailable("not acknowledged")
        self.events.extend(events)


class Sent(DurablePublisher):
    def __init__(self) -> None:
        super().__init__("127.0.0.1:1")
        self.messages: list[tuple[str, bytes | None, bytes | None]] = []

    async def publish(
        self,
        messages: Sequence[tuple[str, bytes | None, bytes | None]],
        *,
        headers: Any = None,
        partition: int | None = None,
    ) -> list[RecordMetadata]:
        self.messages.extend(messages)
        return []  # where they landed: nothing here reads it


class Rig:
    def __init__(self) -> None:
        self.conf = PaymentsSettings()
        self.changelog = Sent()  # the records `StateTable.save` writes
        self.snapshots = MemorySnapshots()
        self.published = Published()
        self.gateway = FakeGateway()
        self.ledger = Ledger(
            ledger_table(Settings(), self.changelog),
            self.snapshots,
            self.published,
            "http://payments",
        )
        self.worker = PaymentsWorker(self.ledger, {"vnpay": self.gateway}, self.conf)

    def types(self, dossier_id: str) -> list[tuple[str, str]]:
        return [(e.type, e.id) for e in self.published.events if e.subject == dossier_id]


def submission(dossier_id: str, at: datetime | None = None) -> CloudEvent[Any]:
    """A submission made `at` (default: now, so its order is still payable)."""
    moment = (at or datetime.now(VIETNAM_TZ)).replace(microsecond=0)
    return parse_event(submitted(dossier_id, time=moment.isoformat()))


def success(dossier_id: str, amount_vnd: int = 150_000, transaction_no: str = "1") -> Any:
    return GatewayNotification(
        gateway="vnpay",
        merchant=MERCHANT,
        txn_ref=txn_ref_for(dossier_id),
        amount_vnd=amount_vnd,
        currency="VND",
        succeeded=True,
        failure_reason=None,
        transaction_no=transaction_no,
        event_ref=f"{MERCHANT}:{txn_ref_for(dossier_id)}:{transaction_no}:00",
        paid_at=datetime.now(VIETNAM_TZ).replace(microsecond=0),
    )


def paid(dossier_id: str) -> CallbackMessage:
    return notification_message(success(dossier_id), dossier_id, datetime.now(VIETNAM_TZ), "ipn")


def record(topic: str, value: bytes) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(topic, 0, 0, 0, 0, b"k", value, None, 1, len(value), ())


# --- the worker ---------------------------------------------------------------------------------


async def test_a_callback_in_the_same_poll_as_its_order_finds_it() -> None:
    rig = Rig()
    dossier_id = "000.00.12.H34-190304-0001"
    # the callback listed first (another partition's records came first in the poll)
    await rig.worker.on_batch([paid(dossier_id), submission(dossier_id)])
    stored = rig.ledger.get(dossier_id)
    assert stored is not None and stored.payment.state == PaymentState.SUCCEEDED
    assert stored.published_version == stored.payment.version == 2
    assert rig.types(dossier_id) == [
        ("payment.requested", f"{dossier_id}/payment/1"),
        ("payment.succeeded", f"{dossier_id}/payment/2"),
    ]
    assert rig.ledger.table.unsaved == {dossier_id}  # for the consumer to write before its commit


async def test_many_dossiers_in_one_poll_each_get_one_order() -> None:
    rig = Rig()
    ids = [f"000.00.12.H34-190304-{i:04d}" for i in range(100)]
    await rig.worker.on_batch([submission(d) for d in ids] + [submission(d) for d in ids])
    assert {e.subject for e in rig.published.events} == set(ids)
    assert len(rig.published.events) == len(ids)
    assert len(rig.snapshots.saved) == len(ids)


async def test_a_callback_for_an_order_the_ledger_lacks_is_poison() -> None:
    rig = Rig()
    with pytest.raises(PoisonMessage, match="does not hold"):
        await rig.worker.on_batch([paid("000.00.12.H34-190304-0404")])


async def test_a_failed_publish_is_retried_with_the_same_event_ids() -> None:
    rig = Rig()
    dossier_id = "000.00.12.H34-190304-0002"
    rig.published.failures = 1
    with pytest.raises(BrokerUnavailable):
        await rig.worker.on_batch([submission(dossier_id), paid(dossier_id)])
    kept = rig.ledger.get(dossier_id)
    assert kept is not None and kept.published_version == 0  # the outbox holds version 1
    await rig.worker.on_batch([submission(dossier_id), paid(dossier_id)])
    assert rig.types(dossier_id) == [
        ("payment.requested", f"{dossier_id}/payment/1"),
        ("payment.succeeded", f"{dossier_id}/payment/2"),
    ]


async def test_a_query_answer_with_a_wrong_amount_is_announced_not_applied() -> None:
    rig = Rig()
    dossier_id = "000.00.12.H34-190304-0003"
    await rig.worker.on_batch([submission(dossier_id)])
    wrong = notification_message(
        success(dossier_id, amount_vnd=1), dossier_id, datetime.now(VIETNAM_TZ), "query"
    )
    await rig.worker.on_batch([wrong])
    stored = rig.ledger.get(dossier_id)
    assert stored is not None and stored.payment.state == PaymentState.REQUESTED
    rejected = [e for e in rig.published.events if e.type == "payment.callback_rejected"]
    assert len(rejected) == 1 and rejected[0].to_dict()["data"]["via"] == "query"


def test_inputs_are_decoded_by_topic() -> None:
    dossier_id = "000.00.12.H34-190304-0004"
    message = paid(dossier_id)
    assert decode_input(record("payments.callbacks", message.to_bytes())) == message
    with pytest.raises(PoisonMessage):
        decode_input(record("payments.callbacks", b'{"kind": "notification"}'))
    with pytest.raises(PoisonMessage):  # a notification message without its notification
        decode_callback(message.model_copy(update={"notification": None}).to_bytes())
    # other dossier events are skipped before validation, submissions validated
    assert decode_input(record("dossier.events", b'{"type": "dossier.received"}')) is None
    with pytest.raises(PoisonMessage):
        decode_input(record("dossier.events", b'{"type": "dossier.submitted"}'))


# --- the webhook's decision and reply -----------------------------------------------------------


async def test_the_ipn_decision_reads_the_order_snapshot() -> None:
    rig = Rig()
    dossier_id = "000.00.12.H34-190304-0005"
    await rig.worker.on_batch([submission(dossier_id)])
    snapshot = rig.snapshots.saved[rig.snapshots.key(txn_ref_for(dossier_id))]
    ipn = GatewayIpn(rig.snapshots, rig.ledger)

    accepted = await ipn.decide(callback(success(dossier_id)), snapshot)
    assert accepted.accept and accepted.key == dossier_id.encode()
    assert accepted.detail == RspCode.CONFIRMED
    assert accepted.value is not None
    assert decode_callback(accepted.value).notification == success(dossier_id)
    wrong = await ipn.decide(callback(success(dossier_id, amount_vnd=1)), snapshot)
    assert not wrong.accept and wrong.detail == RspCode.INVALID_AMOUNT
    assert [e.type for e in rig.published.events][-1] == "payment.callback_rejected"


def callback(note: GatewayNotification) -> Callback:
    return Callback(note.event_ref, b"", b"", read=None, parsed=note)


async def test_without_its_redis_copy_an_ipn_is_decided_on_the_ledger() -> None:
    rig = Rig()
    dossier_id = "000.00.12.H34-190304-0007"
    await rig.worker.on_batch([submission(dossier_id)])
    rig.snapshots.saved.clear()  # Redis restarted empty
    ipn = GatewayIpn(rig.snapshots, rig.ledger)
    # Found in this member's table: confirmed, and the copy put back for the next call.
    accepted = await ipn.decide(callback(success(dossier_id)), None)
    assert accepted.accept and accepted.detail == RspCode.CONFIRMED
    assert accepted.key == dossier_id.encode()
    assert rig.snapshots.key(txn_ref_for(dossier_id)) in rig.snapshots.saved
    # An order this member does not know, while it does not hold every partition: it could not
    # look everywhere, so the gateway is asked to retry (99), never told "not found" (01).
    other = "000.00.12.H34-190304-0404"
    unsure = await ipn.decide(callback(success(other)), None)
    assert not unsure.accept and unsure.detail == RspCode.UNKNOWN_ERROR
    # Once it holds every partition, restored: a miss is final.
    await rig.ledger.restored(
        frozenset(TopicPartition("dossier.events", n) for n in range(Settings().topic_partitions))
    )
    rig.ledger.follow(lambda: True)
    unknown = await ipn.decide(callback(success(other)), None)
    assert not unknown.accept and unknown.detail == RspCode.ORDER_NOT_FOUND
    # ... and the ledger still answers for the order it holds (the index survived the restore).
    again = await ipn.decide(callback(success(dossier_id)), None)
    assert again.accept and again.detail == RspCode.CONFIRMED
    # Not while the consumer is between assignments.
    rig.ledger.follow(lambda: False)
    assert (await ipn.decide(callback(success(other)), None)).detail == RspCode.UNKNOWN_ERROR


async def test_an_ipn_for_a_settled_order_answers_already_confirmed() -> None:
    rig = Rig()
    dossier_id = "000.00.12.H34-190304-0008"
    await rig.worker.on_batch([submission(dossier_id)])
    await rig.worker.on_batch([paid(dossier_id)])
    snapshot = rig.snapshots.saved[rig.snapshots.key(txn_ref_for(dossier_id))]
    ipn = GatewayIpn(rig.snapshots, rig.ledger)
    repeat = await ipn.decide(callback(success(dossier_id)), snapshot)
    assert repeat.detail == RspCode.ALREADY_CONFIRMED
    rig.snapshots.saved.clear()
    assert (await ipn.decide(callback(success(dossier_id)), None)).detail == (
        RspCode.ALREADY_CONFIRMED
    )


async def test_the_redis_copies_are_put_back_after_redis_lost_them() -> None:
    rig = Rig()
    ids = [f"000.00.12.H34-190304-{i:04d}" for i in range(20, 25)]
    await rig.worker.on_batch([submission(d) for d in ids])
    await rig.ledger.heal_snapshots()  # not ready: nothing to trust yet
    assert not any(k.startswith("marker:") for k in rig.snapshots.saved)
    rig.ledger.follow(lambda: True)
    await rig.ledger.restored(frozenset())
    rig.snapshots.saved.clear()  # Redis restarted empty
    await rig.ledger.heal_snapshots()
    keys = {rig.snapshots.key(txn_ref_for(d)) for d in ids}
    assert keys <= set(rig.snapshots.saved)
    # Lost again, but for one copy written since (by a newer version of its record): that copy
    # is never overwritten by the put-back.
    first = rig.snapshots.key(txn_ref_for(ids[0]))
    rig.snapshots.saved = {first: b"newer"}
    await rig.ledger.heal_snapshots()
    assert rig.snapshots.saved[first] == b"newer"
    assert keys <= set(rig.snapshots.saved)


@pytest.mark.parametrize(
    ("outcome", "detail", "code"),
    [
        (Outcome.ACCEPTED, RspCode.CONFIRMED, "00"),
        (Outcome.ACCEPTED, RspCode.ALREADY_CONFIRMED, "02"),
        (Outcome.DUPLICATE, RspCode.CONFIRMED, "02"),
        (Outcome.IN_FLIGHT, None, "99"),
        (Outcome.UNAVAILABLE, None, "99"),
        (Outcome.TOO_LARGE, None, "99"),
        (Outcome.MALFORMED, None, "99"),
        (Outcome.UNAUTHORIZED, None, "97"),
        (Outcome.UNKNOWN_PARTNER, None, "01"),
        (Outcome.REFUSED, RspCode.INVALID_AMOUNT, "04"),
        (Outcome.REFUSED, RspCode.ORDER_NOT_FOUND, "01"),
    ],
)
def test_every_outcome_is_answered_200_with_a_bank_code(
    outcome: Outcome, detail: RspCode | None, code: str
) -> None:
    reply = bank_reply(outcome, "reason", detail)
    assert isinstance(reply, BankReply) and reply.status_code == 200
    assert bytes(reply.body).startswith(f'{{"RspCode":"{code}","Message":'.encode())


class MemoryClaims:
    """`Claims` in a dict: "p" pending until confirmed "1"; released claims are dropped."""

    def __init__(self) -> None:
        self.held: dict[str, str] = {}

    async def claim(self, key: str, *, read: str | None = None) -> Claim:
        held = self.held.get(key)
        if held is None:
            self.held[key] = "p"
            return Claim(claimed=True, record=None)
        return Claim(claimed=False, record=None, pending=held == "p")

    def confirm_soon(self, key: str) -> None:
        self.held[key] = "1"

    async def release(self, key: str) -> None:
        self.held.pop(key, None)


class OneIpn:
    """A partner whose every call is the same notification (event id `ipn-1`)."""

    name = "vnpay"

    def verify(self, call: InboundCall) -> None:
        return None

    def parse(self, call: InboundCall) -> Callback:
        return Callback("ipn-1", b"D-1", b"notification")


class GatedPublisher:
    """Writes wait for `gate`; the first write fails when `fail_first`."""

    def __init__(self, *, fail_first: bool = False) -> None:
        self.gate = asyncio.Event()
        self.fail_first = fail_first
        self.attempts = 0
        self.written: list[tuple[str, bytes | None, bytes | None]] = []

    async def publish(self, messages: Sequence[tuple[str, bytes | None, bytes | None]]) -> None:
        self.attempts += 1
        await self.gate.wait()
        if self.fail_first and self.attempts == 1:
            raise BrokerUnavailable("not acknowledged")
        self.written.extend(messages)


def ipn_door(publisher: GatedPublisher) -> IpnIntake:
    return IpnIntake(
        "payments",
        {"vnpay": OneIpn()},
        path_param="gateway",
        topic="payments.callbacks",
        claims=MemoryClaims(),  # type: ignore[arg-type]
        claim_key=lambda partner, event_id: f"{partner}:{event_id}",
        publisher=publisher,  # type: ignore[arg-type]
        reply=bank_reply,
        in_flight_wait=IN_FLIGHT_WAIT_SECONDS,
    )


def code(response: Any) -> str:
    assert isinstance(response, BankReply) and response.status_code == 200
    return response.rsp_code.value


async def test_a_copy_arriving_while_the_first_is_written_waits_and_answers_02() -> None:
    publisher = GatedPublisher()
    door = ipn_door(publisher)
    call = InboundCall(b"", b"", {})
    first = asyncio.create_task(door.handle(OneIpn(), call))
    second = asyncio.create_task(door.handle(OneIpn(), call))
    while publisher.attempts < 1:  # the first copy is being written
        await asyncio.sleep(0)
    await asyncio.sleep(0.02)  # the copy found it in flight and waits
    assert not second.done()
    publisher.gate.set()
    assert [code(await first), code(await second)] == ["00", "02"]
    assert len(publisher.written) == 1
    assert code(await door.handle(OneIpn(), call)) == "02"  # and any later copy


async def test_when_the_first_copy_fails_the_waiting_copy_is_written_instead() -> None:
    publisher = GatedPublisher(fail_first=True)
    door = ipn_door(publisher)
    call = InboundCall(b"", b"", {})
    first = asyncio.create_task(door.handle(OneIpn(), call))
    second = asyncio.create_task(door.handle(OneIpn(), call))
    while publisher.attempts < 1:
        await asyncio.sleep(0)
    publisher.gate.set()
    assert sorted([code(await first), code(await second)]) == ["00", "99"]
    assert len(publisher.written) == 1  # exactly one copy durable, exactly one 00


async def test_a_copy_waits_for_the_first_at_most_the_in_flight_wait() -> None:
    publisher = GatedPublisher()
    door = ipn_door(publisher)
    door.in_flight_wait = 0.05
    call = InboundCall(b"", b"", {})
    first = asyncio.create_task(door.handle(OneIpn(), call))
    while publisher.attempts < 1:
        await asyncio.sleep(0)
    assert code(await door.handle(OneIpn(), call)) == "99"  # the bank retries later
    publisher.gate.set()
    assert code(await first) == "00"


# --- the sweeper --------------------------------------------------------------------------------


async def test_a_late_payment_is_refunded_once_through_a_message() -> None:
    rig = Rig()
    dossier_id = "000.00.12.H34-190304-0006"
    await rig.worker.on_batch([submission(dossier_id)])
    now = datetime.now(VIETNAM_TZ)
    await rig.worker.on_batch(
        [CallbackMessage(kind="expire", dossier_id=dossier_id, at=now, ref="expiry")]
    )
    await rig.worker.on_batch([paid(dossier_id)])
    stored = rig.ledger.get(dossier_id)
    assert stored is not None and stored.payment.state == PaymentState.REFUND_REQUIRED
    sent = Sent()
    sweeper = Sweeper(rig.ledger.table, {"vnpay": rig.gateway}, rig.conf, sent)
    await rig.ledger.table.save()  # what the consumer does after each poll
    assert [k for _, k, _ in rig.changelog.messages][-1] == dossier_id.encode()
    sweeper._last_sweep = now + timedelta(days=2)  # no query falls due
    await sweeper.sweep()
    await sweeper.sweep()  # the worker has not applied it yet: not refunded twice
    assert rig.gateway.refunds == 1
    (message,) = [decode_callback(v or b"") for _, _, v in sent.messages]
    assert message.kind == "refund_confirmed" and message.dossier_id == dossier_id
    await rig.worker.on_batch([message])
    stored = rig.ledger.get(dossier_id)
    assert stored is not None and stored.payment.state == PaymentState.REFUNDED
    assert rig.types(dossier_id)[-1] == ("payment.refunded", f"{dossier_id}/payment/4")
