"""The portals worker's shell (services/portals/worker.py) with fakes: a state table on no
broker, a recording publisher, and the deliverer on `httpx.MockTransport`."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import httpx
import orjson

from services.common import topics
from services.common.changelog import Changelog
from services.common.kafka import DurablePublisher
from services.common.state import StateTable
from services.portals import messages
from services.portals.book import SubscriptionBook
from services.portals.deliverer import DELIVERY_HEADER, Deliverer
from services.portals.domain import Attempt, DossierState, decode_state, encode_state
from services.portals.settings import PortalsSettings
from services.portals.subscriptions import Subscription
from services.portals.worker import DossierStates, PortalsWorker, event_input

T0 = datetime(2026, 11, 26, 8, 0, tzinfo=UTC)
D = "000.00.12.H34-190304-0001"


class Publisher:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, Mapping[str, bytes] | None]] = []

    async def publish(
        self,
        messages: Sequence[tuple[str, bytes | None, bytes | None]],
        *,
        headers: Mapping[str, bytes] | None = None,
        partition: int | None = None,
    ) -> None:
        self.sent.extend((t, k, v, headers) for t, k, v in messages)

    def on(self, topic: str) -> list[tuple[bytes | None, bytes | None, Mapping[str, bytes] | None]]:
        return [(k, v, h) for t, k, v, h in self.sent if t == topic]


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def envelope(kind: str, event_id: str, source: str = "motcua/payments") -> bytes:
    return orjson.dumps(
        {
            "specversion": "1.0",
            "id": event_id,
            "source": source,
            "type": kind,
            "subject": D,
            "time": T0.isoformat(),
            "data": {"dossier_id": D, "agency_code": "A"},
        }
    )


class Rig:
    def __init__(self, answers: list[int]) -> None:
        self.answers = answers
        self.posted: list[str] = []
        table: StateTable[DossierState] = StateTable(
            cast(Changelog, object()), encode=encode_state, decode=decode_state
        )
        settings = PortalsSettings(PORTALS_RETRY_SECONDS="60,300")
        self.states = DossierStates(table, settings.retirement())
        self.book = SubscriptionBook("127.0.0.1:1")
        self.book.reset([])
        self.book.caught_up = True
        self.book._read.set()
        self.book.put(
            Subscription("portal/a", "https://a.example/cb", ("payment.*",), "s" * 32, T0)
        )
        self.publisher = Publisher()
        self.clock = Clock()
        self.worker = PortalsWorker(
            self.states,
            self.book,
            Deliverer(
                timeout=5, per_portal=4, concurrency=8, transport=httpx.MockTransport(self.answer)
            ),
            cast(DurablePublisher, self.publisher),
            settings,
            clock=self.clock,
        )

    def answer(self, request: httpx.Request) -> httpx.Response:
        self.posted.append(request.headers[DELIVERY_HEADER])
        return httpx.Response(self.answers.pop(0) if self.answers else 200)

    async def scan(self) -> None:
        """One scan a moment later, its attempts finished and their outcomes written."""
        self.clock.now += timedelta(milliseconds=1)
        await self.worker.scan()
        await asyncio.gather(*list(self.worker._tasks))
        await self.worker.scan()
        if self.worker._writing is not None:
            await self.worker._writing

    async def apply_outcomes(self) -> None:
        outcomes = [
            messages.decode(v or b"", now=self.clock.now)
            for _, v, _ in self.publisher.on(topics.PORTALS_CALLBACKS)
        ]
        self.publisher.sent.clear()
        await self.worker.on_batch(outcomes)

    def delivery(self) -> dict[str, Any]:
        state = self.states.get(D)
        assert state is not None
        return state.deliveries[0].listed(D)


def test_an_attempt_in_flight_is_not_started_again_when_its_dossier_changes() -> None:
    async def run() -> None:
        rig = Rig([200])
        submitted = event_input(envelope("dossier.submitted", "s-1", source="portal/a"))
        paid = event_input(envelope("payment.succeeded", "p-1"))
        assert submitted is not None and paid is not None
        await rig.worker.on_batch([submitted, paid])
        rig.clock.now += timedelta(milliseconds=1)
        await rig.worker.scan()  # the attempt starts
        await asyncio.gather(*list(rig.worker._tasks))
        # another input for the dossier before the outcome is applied: due again, not re-sent
        other = event_input(envelope("dossier.received", "r-1", source="portal/a"))
        assert other is not None
        await rig.worker.on_batch([other])
        await rig.scan()
        assert rig.posted == ["p-1"]
        await rig.apply_outcomes()
        assert rig.delivery()["status"] == "delivered"
        await rig.scan()
        assert rig.posted == ["p-1"]

    asyncio.run(run())


def test_a_failing_portal_is_retried_on_schedule_then_dead_lettered() -> None:
    async def run() -> None:
        rig = Rig([500, 503, 502])
        submitted = event_input(envelope("dossier.submitted", "s-1", source="portal/a"))
        paid = event_input(envelope("payment.succeeded", "p-1"))
        assert submitted is not None and paid is not None
        await rig.worker.on_batch([submitted, paid])
        for wait in (60, 300):
            await rig.scan()
            await rig.apply_outcomes()
            line = rig.delivery()
            assert line["status"] == "pending"
            assert line["next_attempt_at"] == (rig.clock.now + timedelta(seconds=wait)).isoformat()
            await rig.scan()  # not due yet: nothing is sent
            assert len(rig.posted) == (1 if wait == 60 else 2)
            rig.clock.now += timedelta(seconds=wait)
        await rig.scan()
        await rig.apply_outcomes()
        assert rig.posted == ["p-1"] * 3
        assert rig.delivery()["status"] == "failed"
        [(key, value, headers)] = rig.publisher.on(topics.dlq(topics.PORTALS_CALLBACKS))
        assert key == D.encode()
        assert value is not None and orjson.loads(value)["id"] == "p-1"
        assert headers is not None
        assert headers["error_type"] == b"DeliveryGivenUp"
        assert headers["attempts"] == b"3"
        assert headers["delivery_id"] == b"p-1" and headers["portal"] == b"portal/a"

    asyncio.run(run())


def test_an_outcome_applied_twice_counts_once() -> None:
    async def run() -> None:
        rig = Rig([200])
        submitted = event_input(envelope("dossier.submitted", "s-1", source="portal/a"))
        paid = event_input(envelope("payment.succeeded", "p-1"))
        assert submitted is not None and paid is not None
        await rig.worker.on_batch([submitted, paid])
        await rig.scan()
        outcome = Attempt(D, "p-1", 1, True, 200, None, T0)
        await rig.worker.on_batch([outcome, outcome])
        assert rig.delivery()["attempts"] == 1 and rig.delivery()["status"] == "delivered"

    asyncio.run(run())


def test_a_full_portal_line_waits_without_a_scan_revisiting_it() -> None:
    async def run() -> None:
        rig = Rig([])
        rig.worker.max_in_flight_per_portal = 1
        inputs = []
        for n in range(3):
            d = f"{D}-{n}"
            for kind, event_id, source in [
                ("dossier.submitted", f"s-{n}", "portal/a"),
                ("payment.succeeded", f"p-{n}", "motcua/payments"),
            ]:
                body = orjson.loads(envelope(kind, event_id, source))
                body["subject"] = body["data"]["dossier_id"] = d
                item = event_input(orjson.dumps(body))
                assert item is not None
                inputs.append(item)
        await rig.worker.on_batch(inputs)
        rig.clock.now += timedelta(milliseconds=1)
        await rig.worker.scan()
        assert len(rig.worker._tasks) == 1
        assert len(rig.worker._waiting["portal/a"]) == 2
        assert len(rig.states.due) == 0  # out of the index: scans do not go over them again
        for started in (2, 3):
            await asyncio.gather(*list(rig.worker._tasks))
            await rig.worker.scan()
            assert len(rig.posted) == started - 1 and len(rig.worker._tasks) == 1
        await asyncio.gather(*list(rig.worker._tasks))
        assert sorted(rig.posted) == ["p-0", "p-1", "p-2"]

    asyncio.run(run())
