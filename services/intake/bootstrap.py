"""The intake service, wired: what it consumes, produces and serves.

- **Consumes** nothing, and has no timers: it runs as a plain uvicorn app.
- **Produces** portals' dossier events on `dossier.events` (canonical JSON, keyed by dossier id,
  acks=all), each (source, id) once (`ledger.EventLedger`, in Redis).
- **Serves** `POST /v1/events` (CONTRACT section 4, `routes.py`); `/readyz` answers 503 while
  Redis or the broker is unreachable.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.common.coordination import Keys, TokenBucket, connect, redis_reachable
from services.common.service import Service, create_service, run_service
from services.common.settings import Settings
from services.intake import routes
from services.intake.ledger import EventLedger


def bootstrap(settings: Settings) -> Service:
    client = connect(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        await service.publisher.close()
        await client.aclose()

    service = create_service(
        "intake",
        settings,
        title="motcua intake",
        description="Portals publish dossier events here (CloudEvents 1.0, structured JSON).",
        lifespan=lifespan,
        publish_timeout_seconds=settings.publish_timeout_seconds,
    )
    keys = Keys(settings.redis_namespace)
    ledger = EventLedger(
        client, keys, settings.dedupe_ttl_seconds, wait_seconds=settings.publish_timeout_seconds
    )
    buckets = {
        portal.source: TokenBucket(
            client, keys("intake", "rate"), portal.rate_per_second, portal.burst
        )
        for portal in settings.portals
    }

    async def broker_reachable() -> bool:
        return await service.publisher.connected()

    routes.register(
        service.api,
        portals=settings.portals,
        max_body_bytes=settings.max_body_bytes,
        ledger=ledger,
        buckets=buckets,
        publisher=service.publisher,
    )
    service.add_ready_check(redis_reachable(client))
    service.add_ready_check(broker_reachable)
    return service


def run(settings: Settings) -> None:
    run_service(bootstrap(settings), settings.intake_port)
