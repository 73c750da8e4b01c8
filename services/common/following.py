"""Following a topic for the whole life of a process: a consumer of no group over every
partition, started again after any failure, never ending the process.

Used by intake's portal keys (`intake.keyring`) and metrics' figures (`metrics.figures`): each
gives `follow_forever` one attempt (catch up, then tail) and calls `caught_up()` once it has read
to the end, which makes the next failure wait the shortest time again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from services.common.kafka import ensure_topics
from services.common.logging import get_logger
from services.common.topics import TopicSpec

log = get_logger("motcua.following")

RETRY_SECONDS = (0.5, 1.0, 2.0, 5.0)


async def follow_forever(
    attempt: Callable[[Callable[[], None]], Awaitable[None]], *, name: str
) -> None:
    """Run `attempt(caught_up)` until cancelled; after a failure (the broker away, or any
    surprise) wait 0.5, 1, 2, then 5 s between tries, logging `<name>_restarts`."""
    failures = 0

    def caught_up() -> None:
        nonlocal failures
        failures = 0

    while True:
        try:
            await attempt(caught_up)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            wait = RETRY_SECONDS[min(failures, len(RETRY_SECONDS) - 1)]
            failures += 1
            log.warning(
                f"{name}_restarts",
                error_type=type(exc).__name__,
                error=str(exc)[:300],
                retry_in=wait,
            )
            await asyncio.sleep(wait)


async def every_partition(
    consumer: AIOKafkaConsumer, bootstrap: str, spec: TopicSpec, replication: int
) -> list[TopicPartition]:
    """Every partition of `spec`'s topic, the topic created first if it is missing (a broker
    still starting when the service created its topics)."""
    await consumer.topics()
    numbers = consumer.partitions_for_topic(spec.name) or set()
    if not numbers:
        await ensure_topics(bootstrap, [spec], replication)
        await consumer.topics()
        numbers = consumer.partitions_for_topic(spec.name) or set()
    if not numbers:
        raise RuntimeError(f"{spec.name} has no partitions yet")
    return [TopicPartition(spec.name, p) for p in sorted(numbers)]
