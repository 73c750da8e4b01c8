"""A minimal service on the common `BatchConsumer`, for testing the consumer itself.

It records the id of every `dossier.submitted` it handles in a Redis list (one push per batch,
so a record means the batch was handled before its offsets were committed), and fails on any
event whose procedure code is `explode`, so tests can watch poison handling end to end.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from services.common.batches import BatchConsumer

from services.common import topics
from services.common.events import CloudEvent
from services.common.service import create_service, run_service
from services.common.settings import get_settings


def main() -> None:
    settings = get_settings()
    service = create_service("batch-recorder", settings)
    client = aioredis.Redis.from_url(settings.redis_url)

    async def record(events: Sequence[CloudEvent[Any]]) -> None:
        if any(event.data.procedure_code == "explode" for event in events):
            raise RuntimeError("this procedure always fails")
        await client.rpush(f"{settings.redis_namespace}:recorded", *[e.id for e in events])

    BatchConsumer(
        service,
        [topics.DOSSIER_EVENTS],
        record,
        types=frozenset({"dossier.submitted"}),
        max_records=100,
        poll_seconds=0.1,
    ).attach()
    run_service(service, settings.metrics_port)


if __name__ == "__main__":
    main()
