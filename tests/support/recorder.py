"""A minimal service built with the common factory, for testing the factory itself.

It records the id of every `dossier.submitted` it handles in a Redis list, and fails on any
event whose procedure code is `explode`, so tests can watch poison handling end to end.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from services.common import topics
from services.common.events import CloudEvent
from services.common.service import create_service, run_service
from services.common.settings import get_settings


def main() -> None:
    settings = get_settings()
    service = create_service("recorder", settings)
    client = aioredis.Redis.from_url(settings.redis_url)

    async def record(event: CloudEvent[Any]) -> None:
        if event.data.procedure_code == "explode":
            raise RuntimeError("this procedure always fails")
        await client.rpush(f"{settings.redis_namespace}:recorded", event.id)

    service.consume(topics.DOSSIER_EVENTS, record, types=frozenset({"dossier.submitted"}))
    run_service(service, settings.metrics_port)


if __name__ == "__main__":
    main()
