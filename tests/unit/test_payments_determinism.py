"""Whatever is recomputed after a redelivery is byte-identical (issue 14, item 9).

An order's window comes from the submission's event `time`, never from the clock of the attempt
that computes it; the payment URL (VNPAY's `vnp_CreateDate`, `vnp_ExpireDate` and hash) and the
`payment.requested` event follow from the order. The worker is run here at different clock
readings, with its ledger lost (a SIGKILL between the publish and the changelog write), with
its Redis copies lost too, and with a submission whose window closed before it arrived.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common.events import CloudEvent, parse_event
from services.common.settings import Settings
from services.common.tz import VIETNAM_TZ
from services.payments.domain import (
    GatewayAccount,
    expired_on_arrival,
    open_payment,
    order_for,
    order_window,
)
from services.payments.ledger import (
    Ledger,
    LedgerRecord,
    callback_rejected_event,
    ledger_table,
    outgoing_event,
)
from services.payments.partner import VnpayGateway
from services.payments.settings import PaymentsSettings
from services.payments.worker import OPENED_ON_ARRIVAL, PaymentsWorker
from tests.support.factories import submitted
from tests.unit.test_payments_worker import MemorySnapshots, Published, Sent, success

SUBMITTED_AT = datetime(2026, 11, 26, 9, 30, 12, 345678, tzinfo=VIETNAM_TZ)
TTL = timedelta(minutes=15)
DATA: dict[str, Any] = {
    "dossier_id": "000.00.12.H34-261126-0001",
    "agency_code": "000.00.12.H34",
    "fee": {"amount_vnd": 150_000, "method": "online"},
}


def refuse_calls(request: httpx.Request) -> httpx.Response:
    raise AssertionError(f"no gateway call expected: {request.url}")


def vnpay() -> VnpayGateway:
    """The real VNPAY adapter (its URL is computed, never fetched)."""
    return VnpayGateway(Settings(), PaymentsSettings(), transport=httpx.MockTransport(refuse_calls))


# --- the pure core ------------------------------------------------------------------------------

aware_times = st.datetimes(
    min_value=datetime(2000, 1, 2),
    max_value=datetime(2099, 12, 30),
    timezones=st.sampled_from([UTC, VIETNAM_TZ, timezone(timedelta(hours=-5))]),
)


@settings(max_examples=50)
@given(aware_times, st.integers(min_value=1, max_value=7 * 24 * 3600))
def test_the_order_window_comes_from_the_event_time_alone(at: datetime, ttl_seconds: int) -> None:
    ttl = timedelta(seconds=ttl_seconds)
    created, expires = order_window(at, ttl)
    assert created == at.replace(microsecond=0) and expires - created == ttl
    order = order_for(DATA, account=GatewayAccount("vnpay", "M"), submitted_at=at, ttl=ttl)
    assert order is not None and (order.created_at, order.expires_at) == (created, expires)
    # Taken only for orders not opened before, never for a redelivery's recomputation.
    assert expired_on_arrival(order, expires) and not expired_on_arrival(order, created)


@settings(max_examples=25, deadline=None)
@given(aware_times)
def test_the_same_submission_gives_the_same_url_and_event_bytes(at: datetime) -> None:
    async def compute() -> tuple[str, bytes]:
        gateway = vnpay()
        try:
            order = order_for(DATA, account=gateway.account(), submitted_at=at, ttl=TTL)
            assert order is not None
            url = await gateway.payment_url(order)
        finally:
            await gateway.aclose()
        record = LedgerRecord(
            payment=open_payment(order, "ev-1").payment,
            agency_code="000.00.12.H34",
            payment_url=url,
        )
        return url, outgoing_event(record, 1, "https://pay.example").to_json()

    first, again = asyncio.run(compute()), asyncio.run(compute())
    assert first == again
    params = dict(parse_qsl(urlsplit(first[0]).query))
    assert params["vnp_CreateDate"] == at.astimezone(VIETNAM_TZ).strftime("%Y%m%d%H%M%S")
    expires = (at.replace(microsecond=0) + TTL).astimezone(VIETNAM_TZ)
    assert params["vnp_ExpireDate"] == expires.strftime("%Y%m%d%H%M%S")


def test_a_rejected_callback_is_announced_with_the_same_bytes_each_time() -> None:
    order = order_for(DATA, account=GatewayAccount("vnpay", "M"), submitted_at=SUBMITTED_AT)
    assert order is not None
    payment = open_payment(order, "ev-1").payment
    note = success(DATA["dossier_id"], amount_vnd=1)
    first = callback_rejected_event(payment, note, ["amount_vnd"], "ipn").to_json()
    assert callback_rejected_event(payment, note, ["amount_vnd"], "ipn").to_json() == first


# --- the worker at different clocks -------------------------------------------------------------


class Member:
    """One worker process: its ledger table (lost with it), its view of Redis, its clock."""

    def __init__(self, snapshots: MemorySnapshots, clock: Callable[[], datetime]) -> None:
        self.gateway = vnpay()
        self.published = Published()
        self.ledger = Ledger(
            ledger_table(Settings(), Sent()), snapshots, self.published, "https://pay.example"
        )
        conf = PaymentsSettings()
        assert conf.order_ttl == TTL  # the default window, 15 minutes
        self.worker = PaymentsWorker(self.ledger, {"vnpay": self.gateway}, conf, clock=clock)

    async def handle(self, event: CloudEvent[Any]) -> list[bytes]:
        try:
            await self.worker.on_batch([event])
        finally:
            await self.gateway.aclose()
        return [e.to_json() for e in self.published.events if e.type == "payment.requested"]


def submission(at: datetime = SUBMITTED_AT) -> CloudEvent[Any]:
    return parse_event(submitted(DATA["dossier_id"], event_id="ev-1", time=at.isoformat()))


def at(offset: timedelta) -> Callable[[], datetime]:
    return lambda: SUBMITTED_AT + offset


@settings(max_examples=20, deadline=None)
@given(st.integers(min_value=0, max_value=int(TTL.total_seconds()) - 1))
def test_a_redelivery_at_any_clock_recomputes_the_same_bytes(seconds_later: int) -> None:
    """Everything lost (ledger and Redis): the recomputation alone must agree."""
    first = asyncio.run(Member(MemorySnapshots(), at(timedelta())).handle(submission()))
    # any clock up to the last moment the order is payable (its window counts whole seconds)
    last = SUBMITTED_AT.replace(microsecond=0) + timedelta(
        seconds=seconds_later, microseconds=999_999
    )
    later = at(last - SUBMITTED_AT)
    again = asyncio.run(Member(MemorySnapshots(), later).handle(submission()))
    assert len(first) == 1 and again == first


async def test_after_a_kill_between_publish_and_changelog_the_stored_order_is_reused() -> None:
    redis = MemorySnapshots()  # survives the worker
    killed = Member(redis, at(timedelta(minutes=1)))
    published = await killed.handle(submission())
    assert len(published) == 1
    # The table's changelog write never happened: a new member starts with an empty table, and
    # gets the submission again after the order's expiry. It reuses the stored order instead
    # of deciding afresh (which would open none) and publishes the very same event again.
    restarted = Member(redis, at(TTL + timedelta(minutes=5)))
    assert await restarted.handle(submission()) == published
    kept = restarted.ledger.get(DATA["dossier_id"])
    assert kept is not None and kept.to_bytes().startswith(b'{"payment":')
    assert kept.published_version == kept.payment.version == 1


async def test_a_submission_whose_window_closed_before_it_arrived_opens_on_arrival() -> None:
    before = OPENED_ON_ARRIVAL._value.get()
    arrival = TTL + timedelta(minutes=3)
    redis = MemorySnapshots()
    member = Member(redis, at(arrival))
    published = await member.handle(submission())
    assert len(published) == 1
    record = member.ledger.get(DATA["dossier_id"])
    assert record is not None
    opened = (SUBMITTED_AT + arrival).replace(microsecond=0)
    assert record.payment.created_at == opened and record.payment.expires_at == opened + TTL
    assert OPENED_ON_ARRIVAL._value.get() == before + 1
    # killed before the changelog write: a redelivery at any later clock reuses that order
    restarted = Member(redis, at(arrival + timedelta(minutes=7)))
    assert await restarted.handle(submission()) == published
