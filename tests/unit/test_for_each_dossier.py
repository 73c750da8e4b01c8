"""`for_each_dossier`: a poll handled dossier by dossier, a bounded number at once, one
dossier's items in order, and the failure the consumer must act on raised last."""

from __future__ import annotations

import asyncio

import pytest

from services.common.consumer import for_each_dossier
from services.common.dead_letters import PoisonMessage
from services.common.kafka import BrokerUnavailable


async def test_each_dossier_in_order_at_most_n_at_once_every_dossier_done() -> None:
    items = [(f"D-{i % 5}", i) for i in range(40)]
    seen: dict[str, list[int]] = {}
    running = 0
    most = 0

    async def handle(dossier_id: str, inputs: list[tuple[str, int]]) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await asyncio.sleep(0.01)
        seen[dossier_id] = [n for _, n in inputs]
        running -= 1

    await for_each_dossier(items, lambda item: item[0], handle, concurrency=2)
    assert most == 2
    assert seen == {f"D-{d}": [n for n in range(40) if n % 5 == d] for d in range(5)}


@pytest.mark.parametrize(
    ("failures", "raised"),
    [
        ({"D-0": PoisonMessage("bad"), "D-1": ValueError("bug")}, ValueError),
        ({"D-0": ValueError("bug"), "D-1": BrokerUnavailable("away")}, BrokerUnavailable),
        ({"D-0": PoisonMessage("bad")}, PoisonMessage),
    ],
)
async def test_the_failure_raised_is_what_the_consumer_acts_on_after_every_dossier(
    failures: dict[str, Exception], raised: type[Exception]
) -> None:
    done: list[str] = []

    async def handle(dossier_id: str, inputs: list[str]) -> None:
        if dossier_id in failures:
            raise failures[dossier_id]
        done.append(dossier_id)

    with pytest.raises(raised):
        await for_each_dossier(
            ["D-0", "D-1", "D-2", "D-3"], lambda item: item, handle, concurrency=1
        )
    assert sorted(done) == sorted({"D-0", "D-1", "D-2", "D-3"} - set(failures))
