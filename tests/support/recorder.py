"""A minimal service on the common factory and its `BatchConsumer`, for testing both.

Run as `python -m tests.support.recorder [NAME]` (default name `recorder`; the consumer group is
`motcua-NAME`). It reads two topics in one consumer:

- `dossier.events`, CloudEvents of type `dossier.submitted` only: it records their ids in the
  Redis list `<namespace>:recorded`, one push per batch (so a record means the batch was handled
  before its offsets were committed), and fails on any event whose procedure code is `explode`,
  so tests can watch retries, the one-at-a-time fallback and dead letters end to end;
- `postal.callbacks`, raw bytes (an internal, non-CloudEvents topic): a value that is not a JSON
  object is a `PoisonMessage` (dead-lettered at once); the others go to `<namespace>:raw`.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from aiokafka.structs import ConsumerRecord

from services.common import topics
from services.common.consumer import event_decoder
from services.common.dead_letters import PoisonMessage
from services.common.events import CloudEvent
from services.common.service import create_service, run_service
from services.common.settings import get_settings

SUBMITTED = frozenset({"dossier.submitted"})


@dataclass(frozen=True)
class RawCallback:
    """A record of the raw topic, as it came."""

    value: bytes


Item = CloudEvent[Any] | RawCallback

decode_submitted = event_decoder(SUBMITTED)


def decode(record: ConsumerRecord) -> Item | None:
    """CloudEvents on `dossier.events`, JSON objects kept as bytes on `postal.callbacks`."""
    if record.topic == topics.POSTAL_CALLBACKS:
        value = record.value or b""
        if not value.startswith(b"{"):
            raise PoisonMessage("not a JSON object")
        return RawCallback(value)
    return decode_submitted(record)


def main() -> None:
    name = sys.argv[1] if len(sys.argv) > 1 else "recorder"
    settings = get_settings()
    service = create_service(name, settings)
    client = aioredis.Redis.from_url(settings.redis_url)

    async def record(items: Sequence[Item]) -> None:
        events = [item for item in items if isinstance(item, CloudEvent)]
        raw = [item.value for item in items if isinstance(item, RawCallback)]
        if any(event.data.procedure_code == "explode" for event in events):
            raise RuntimeError("this procedure always fails")
        if events:
            await client.rpush(f"{settings.redis_namespace}:recorded", *[e.id for e in events])
        if raw:
            await client.rpush(f"{settings.redis_namespace}:raw", *raw)

    service.consume(
        [topics.DOSSIER_EVENTS, topics.POSTAL_CALLBACKS],
        record,
        decode=decode,
        max_records=100,
        poll_seconds=0.1,
    )
    run_service(service, settings.metrics_port)


if __name__ == "__main__":
    main()
