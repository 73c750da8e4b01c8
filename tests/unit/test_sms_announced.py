"""A message is sent to one gateway and announced once, whatever was lost: its first gateway is
a function of its key and the weights (so a re-send after Redis lost its claim reaches the gateway
that replays it), the outcomes already on `sms.events` are read back for the pending messages,
and an outcome this worker published is not published again when only the news for the record
was lost."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from services.common.events import CloudEvent
from services.sms.admission import Job
from services.sms.announced import SendOutcome, send_outcome, send_outcomes
from services.sms.attempts import Attempt
from services.sms.decisions import SmsIntent
from services.sms.delivery import DeliveryStatus
from services.sms.events import intent_event, queued_event, send_failed_event, sent_event, sms_event
from services.sms.providers import ProviderWeights, failover_order, key_point, pick_provider
from services.sms.record import Pending
from services.sms.settling import Settled, Settling

NOW = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
D1, D2 = "000.00.12.H34-261126-0001", "000.00.12.H34-261126-0002"
WEIGHTS = ProviderWeights.of({"primary": 70, "secondary": 30})


def pending(key: str, dossier: str = D1) -> Pending:
    return Pending(key, dossier, "dossier_received", "+84905123456", "x", 1, False, NOW, "t", "{}")


# --- the first gateway --------------------------------------------------------------------


@given(st.text(min_size=1, max_size=80), st.integers(0, 100), st.integers(0, 100))
def test_the_first_gateway_is_a_function_of_the_key_and_the_weights(
    key: str, primary: int, secondary: int
) -> None:
    if primary + secondary == 0:
        return
    weights = ProviderWeights.of({"primary": primary, "secondary": secondary})
    point = key_point(key)
    assert 0.0 <= point < 1.0
    assert key_point(key) == point
    order = failover_order(weights, point)
    assert order == failover_order(ProviderWeights.of(weights.as_dict()), key_point(key))
    assert sorted(order) == ["primary", "secondary"]  # failover still reaches every gateway
    assert dict(weights.weights)[order[0]] > 0


def test_over_many_keys_each_gateway_gets_its_share() -> None:
    keys = [f"portal/test:e{i}:dossier_received" for i in range(20_000)]
    for shares in ({"primary": 70, "secondary": 30}, {"primary": 10, "secondary": 90}):
        weights = ProviderWeights.of(shares)
        firsts = [pick_provider(weights, key_point(key)) for key in keys]
        primary = firsts.count("primary") / len(keys)
        assert abs(primary - shares["primary"] / 100) < 0.02, primary


# --- the outcomes on sms.events -----------------------------------------------------------


def raw(event: CloudEvent[Any]) -> tuple[bytes, bytes]:
    return event.key, event.to_json()


def test_only_a_send_outcome_counts_as_announced() -> None:
    message = pending("k1")
    assert send_outcome(sent_event(message, "secondary", "m-1", NOW).to_json()) == SendOutcome(
        "k1", "secondary", DeliveryStatus.SENT, ""
    )
    failed = send_failed_event(message, "send_failed: 500", "primary", NOW)
    assert send_outcome(failed.to_json()) == SendOutcome(
        "k1", "primary", DeliveryStatus.PERMANENT_FAILURE, "send_failed: 500"
    )
    intent = SmsIntent(D1, "dossier_received", (), "portal/test", "e1", NOW)
    not_outcomes = [
        queued_event(message, NOW),
        intent_event("sms.suppressed", intent, "opted_out", NOW),
        intent_event("sms.failed", intent, "render_error: x", NOW),  # never pending
        # a delivery report: the message was sent
        sms_event(
            "sms.failed",
            key="k1",
            dossier_id=D1,
            at=NOW,
            suffix="permanent_failure",
            provider="primary",
            reason="permanent_failure",
            provider_status="UNDELIV",
        ),
        sms_event("sms.delivered", key="k1", dossier_id=D1, at=NOW, provider="primary"),
    ]
    for event in not_outcomes:
        assert send_outcome(event.to_json()) is None, event.type
    assert send_outcome(b"not json") is None
    assert send_outcome(b'{"type": "sms.sent"}') is None


def test_the_outcomes_of_the_pending_messages_are_picked_out() -> None:
    records = [
        raw(queued_event(pending("k1"), NOW)),
        raw(sent_event(pending("k1"), "primary", "m-1", NOW)),
        raw(sent_event(pending("k1"), "primary", "", NOW)),  # announced twice once: one counts
        raw(sent_event(pending("k2"), "secondary", "m-2", NOW)),  # not pending here
        raw(send_failed_event(pending("k3", D2), "send_failed: 400", "primary", NOW)),
        (D2.encode(), b"garbage"),
        (None, b""),
    ]
    found = send_outcomes(records, {"k1", "k3", "k4"}, {D1.encode(), D2.encode()})
    assert found == {
        "k1": SendOutcome("k1", "primary", DeliveryStatus.SENT, ""),
        "k3": SendOutcome("k3", "primary", DeliveryStatus.PERMANENT_FAILURE, "send_failed: 400"),
    }
    # the records of other dossiers are not looked at
    assert send_outcomes(records, {"k1", "k3"}, {D2.encode()}) == {"k3": found["k3"]}


# --- announced once -----------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.published: list[str] = []
        self.settled: list[tuple[str, DeliveryStatus]] = []

    async def publish(self, events: Sequence[CloudEvent[Any]]) -> None:
        self.published += [event.id for event in events]

    async def settle(self, news: Sequence[Settled]) -> None:
        self.settled += [(item.message.key, item.status) for item in news]

    async def dead_letter(self, message: Pending, reason: str, attempts: int) -> None:
        raise AssertionError("nothing is dead-lettered here")


def job(key: str) -> Job:
    return Job(pending(key), Attempt(("primary", "secondary")), f"claim:{key}", 0.0)


def test_a_claim_found_settled_is_announced_once_and_always_settled() -> None:
    seen = Recorder()
    # no Redis is reached: these steps only publish and settle
    settling = Settling(aioredis.Redis(), 3600, seen.publish, seen.dead_letter, seen.settle)

    async def twice() -> None:
        await settling.sent_before([(job("k1"), "primary")])
        await settling.sent_before([(job("k1"), "primary"), (job("k2"), "secondary")])
        await settling.failed_before([(job("k3"), "send_failed")])
        await settling.failed_before([(job("k3"), "send_failed")])

    asyncio.run(twice())
    assert seen.published == ["k1:sent", "k2:sent", "k3:failed"]
    sent, failed = DeliveryStatus.SENT, DeliveryStatus.PERMANENT_FAILURE
    assert seen.settled == [
        ("k1", sent),
        ("k1", sent),
        ("k2", sent),
        ("k3", failed),
        ("k3", failed),
    ]
