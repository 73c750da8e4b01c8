"""A minimal service built with the common factory, for testing the factory itself.

It records the id of every `dossier.submitted` it handles in a Redis list, and fails on any
event whose procedure code is `explode`, so tests can watch poison handling end to end.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio as aioredis

from services.common import topics
from services.common.events import CloudEvent
from services.common.service import PoisonMessage, create_service, run_service
from services.common.settings import get_settings


def main() -> None:
    settings = get_settings()
    service = create_service("recorder", settings)
    client = aioredis.Redis.from_url(settings.redis_url)

    async def record(event: CloudEvent[Any]) -> None:
        if event.data.procedure_code == "explode":
            raise RuntimeError("this procedure always fails")
        await client.rpush(f"{settings.redis_namespace}:recorded", event.id)

    async def record_raw(key: bytes | None, value: bytes) -> None:
        if not value.startswith(b"{"):
            raise PoisonMessage("not a JSON object")
        await client.rpush(f"{settings.redis_namespace}:raw", value)

    service.consume(topics.DOSSIER_EVENTS, record, types=frozenset({"dossier.submitted"}))
    service.consume_raw(topics.POSTAL_CALLBACKS, record_raw)
    run_service(service, settings.metrics_port)


if __name__ == "__main__":
    main()
