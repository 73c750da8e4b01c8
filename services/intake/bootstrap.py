"""The intake service, wired: what it consumes, produces and serves.

- **Consumes** nothing through a consumer group, and has no timers: it runs as a plain uvicorn
  app. Every replica follows the compacted topic `portal.keys` (`portal_keys_view.PortalKeys`, a
  task of the app's lifespan): the portal keys are those of `MOTCUA_PORTALS` and of that topic,
  and a change there holds on every replica within a second, without a restart.
- **Produces** portals' dossier events on `dossier.events` (canonical JSON, keyed by dossier id,
  acks=all, the personal fields sealed: `personal.Sealer`), each (source, id) once
  (`ledger.EventLedger`, in Redis); each dossier's data key on `dossier.keys` before its first
  sealed event (every replica follows that topic: `data_keys.DataKeys`); portal keys' hashes on
  `portal.keys`; one `audit.portal_key_*` on `audit.events` per change of a key.
- **Serves** `POST /v1/events` (CONTRACT section 4, `routes.py`), rate-limited per portal source
  (a bucket per source, made when the source is first seen); to operators with the role `admin`
  (bearer tokens of `MOTCUA_OIDC_ISSUER`, CONTRACT section 8) `GET`/`POST
  /v1/admin/portal-keys` and `DELETE /v1/admin/portal-keys/{key_id}` (`admin.py`); `GET` and
  `DELETE /v1/dossiers/{dossier_id}/personal-data` (`personal_data.py`, CONTRACT section 10);
  to citizens, without sign-in, the satisfaction survey's page `GET`/`POST /s/{token}`
  (`survey.py`), whose answers it publishes as `survey.answered` on `survey.events`.
  `/readyz` answers 503 while Redis or the broker is unreachable and until `portal.keys` and
  `dossier.keys` have been read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from services.common.audit import AuditRecorder
from services.common.auth import OperatorAuth, TokenVerifier, install_refusals
from services.common.coordination import Keys, TokenBucket, connect, redis_reachable
from services.common.data_keys import DataKeys
from services.common.portal_keys_view import PortalKeys
from services.common.service import Service, create_service, data_dir, run_service
from services.common.settings import Settings
from services.intake import admin, personal_data, routes, survey
from services.intake.buckets import PortalBuckets
from services.intake.ledger import EventLedger, written_since
from services.intake.personal import Sealer
from services.intake.retention import Retention


def bootstrap(settings: Settings) -> Service:
    client = connect(settings)
    keyring = PortalKeys(
        settings.kafka_bootstrap, settings.portals, replication=settings.topic_replication
    )
    data_keys = DataKeys.of(settings, data_dir(settings, "intake"))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        following = [
            asyncio.create_task(keyring.follow(), name="portal-keys"),
            asyncio.create_task(data_keys.follow(), name="data-keys"),
            asyncio.create_task(retention.run_forever(), name="pii-retention"),
        ]
        yield
        for task in following:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
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
    retention = Retention(
        settings.kafka_bootstrap,
        data_keys,
        service.publisher,
        client,
        keys,
        days=settings.pii_retention_days,
        interval_seconds=settings.pii_retention_interval_seconds,
        history_clock=settings.pii_retention_clock == "events",
        directory=data_dir(settings, "intake"),
    )
    ledger = EventLedger(
        client,
        keys,
        settings.dedupe_ttl_seconds,
        wait_seconds=settings.publish_timeout_seconds,
        history=lambda since_ms: written_since(settings.kafka_bootstrap, since_ms),
    )
    buckets = PortalBuckets(
        keyring, lambda rate, burst: TokenBucket(client, keys("intake", "rate"), rate, burst)
    )

    async def broker_reachable() -> bool:
        return await service.publisher.connected()

    sealer = Sealer(
        data_keys,
        service.publisher,
        client,
        keys,
        wait_seconds=settings.publish_timeout_seconds,
    )
    routes.register(
        service.api,
        portals=keyring,
        max_body_bytes=settings.max_body_bytes,
        ledger=ledger,
        buckets=buckets,
        publisher=service.publisher,
        sealer=sealer,
    )
    survey.register(
        service.api,
        secrets=settings.survey_secrets,
        redis=client,
        keys=keys,
        per_client=TokenBucket(
            client,
            keys("intake", "survey-client"),
            settings.survey_per_client_per_minute / 60,
            settings.survey_per_client_per_minute,
        ),
        per_dossier=TokenBucket(
            client,
            keys("intake", "survey-dossier"),
            settings.survey_per_dossier_per_hour / 3600,
            settings.survey_per_dossier_per_hour,
        ),
        publisher=service.publisher,
        data_keys=data_keys,
    )
    install_refusals(service.api)
    operators = OperatorAuth(TokenVerifier.from_settings(settings))
    audit = AuditRecorder(service.publisher, "motcua/intake")
    admin.register(
        service.api,
        operators,
        keyring,
        service.publisher,
        audit,
    )
    personal_data.register(
        service.api,
        operators,
        data_keys,
        service.publisher,
        audit,
        forget_key_claim=sealer.forget,
        bootstrap=settings.kafka_bootstrap,
        partitions=settings.topic_partitions,
    )
    service.add_ready_check(redis_reachable(client))
    service.add_ready_check(broker_reachable)
    service.add_ready_check(keyring.read)
    service.add_ready_check(data_keys.keys_read)
    service.add_ready_check(ledger.complete)  # restored from dossier.events if Redis lost it
    return service


def run(settings: Settings) -> None:
    run_service(bootstrap(settings), settings.intake_port)
