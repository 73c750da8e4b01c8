"""`CompactedView.read_to_now`: a read waits for end offsets asked after it was called, and
callers at the same time share one request for them."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

from aiokafka.structs import TopicPartition

from services.common.following import CompactedView, Record
from services.common.topics import TopicSpec

TPS = [TopicPartition("view", 0), TopicPartition("view", 1)]


class Broker:
    """What `read_to_now` asks of its consumer: end offsets (as of when it is asked)."""

    def __init__(self) -> None:
        self.ends = {tp: 5 for tp in TPS}
        self.asked = 0

    async def end_offsets(self, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
        self.asked += 1
        ends = dict(self.ends)  # taken when the request reaches the broker
        await asyncio.sleep(0.01)
        return ends


class View(CompactedView):
    def reset(self, records: Iterable[Record]) -> None:
        pass

    def apply(self, key: bytes | None, value: bytes | None) -> None:
        pass


def following(broker: Broker, positions: dict[int, int]) -> View:
    view = View("127.0.0.1:1", TopicSpec("view", 2), catch_up_seconds=2.0)
    view._consumer, view._tps = broker, TPS  # type: ignore[assignment]
    view._positions = dict(positions)
    return view


async def test_callers_at_the_same_time_share_one_request_for_the_end_offsets() -> None:
    broker = Broker()
    view = following(broker, {0: 5, 1: 5})
    await asyncio.gather(*(view.read_to_now() for _ in range(20)))
    assert broker.asked == 1
    await view.read_to_now()  # a later caller asks again
    assert broker.asked == 2


async def test_a_read_waits_until_the_view_holds_what_was_written_before_it() -> None:
    broker = Broker()
    view = following(broker, {0: 5, 1: 5})
    broker.ends[TPS[1]] = 7  # written just before the call
    done: list[Any] = []

    async def read() -> None:
        await view.read_to_now()
        done.append(True)

    reading = asyncio.create_task(read())
    await asyncio.sleep(0.05)
    assert not done  # the view stands at 5 on partition 1
    view._positions[1] = 7
    view._moved_on()
    await asyncio.wait_for(reading, 1.0)
    assert done
