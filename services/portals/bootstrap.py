"""Portals: what portals hear back (CONTRACT section 9).

- **Consumes** `dossier.events`, `payment.events`, `postal.events`, `sms.events` and its own
  `portals.callbacks` (attempt outcomes, redeliveries, ticks) in one batch consumer, group
  `motcua-portals` (`worker.PortalsWorker`), its dossier states restored from and written to
  `motcua-portals-dossiers-changelog` before every commit; follows `portal.keys` and
  `portal.subscriptions` whole in every process (`book.py`), and the whole changelog of the
  states (`view.py`), so every process answers every portal's request.
- **Produces** `portal.subscriptions` (one record per portal), `audit.events`,
  `portals.callbacks`, the changelog, and `portals.callbacks.dlq` (the deliveries given up).
- **Calls** each portal's subscription URL with its signed events (`deliverer.py`), retried on
  the schedule `PORTALS_RETRY_SECONDS`; the waits are in the states, not in sleeping tasks.
- **Serves** `PUT/GET/DELETE /v1/subscription`, `GET /v1/deliveries`, `POST
  /v1/deliveries/{id}/redeliver`, `GET /v1/dossiers/{dossier_id}` (`routes.py`); to operators
  with the role `admin` `GET /v1/admin/subscriptions` and `GET/PUT/DELETE
  /v1/admin/subscriptions/{source}` (`admin.py`); `/healthz`, `/readyz` (consumer restored,
  keys and subscriptions read) and `/metrics`. Every subscription change is one
  `audit.subscription_change` on `audit.events`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from services.common import topics
from services.common.audit import AuditRecorder
from services.common.auth import OperatorAuth, TokenVerifier, install_refusals
from services.common.portal_keys_view import PortalKeys
from services.common.service import Service, create_service, run_service
from services.common.settings import Settings
from services.portals import admin, routes
from services.portals.book import SubscriptionBook
from services.portals.connecting import public_only_transport
from services.portals.deliverer import Deliverer
from services.portals.domain import decode_state, encode_state
from services.portals.settings import PortalsSettings
from services.portals.view import StatesView
from services.portals.worker import INPUT_TOPICS, DossierStates, PortalsWorker, decode_input


def bootstrap(settings: Settings, own_settings: PortalsSettings | None = None) -> Service:
    """The portals service: its dependencies built once, everything it handles registered below."""
    portals = own_settings or PortalsSettings()
    service = create_service(
        "portals",
        settings,
        title="motcua portals",
        description="Signed callbacks to portals, their delivery log, and dossier status.",
    )
    keys = PortalKeys(
        settings.kafka_bootstrap, list(settings.portals), replication=settings.topic_replication
    )
    book = SubscriptionBook(settings.kafka_bootstrap, replication=settings.topic_replication)
    states = DossierStates(
        service.state_table(
            topics.PORTALS_STATE_CHANGELOG,
            encode=encode_state,
            decode=decode_state,
            cache_size=portals.state_cache_size,
        ),
        portals.retirement(),
    )
    # every process answers for every dossier: it follows the whole changelog of the states
    view = StatesView(
        settings.kafka_bootstrap,
        states.table.changelog.spec,
        replication=settings.topic_replication,
        changelog=states.table.changelog,
    )
    deliverer = Deliverer(
        timeout=portals.timeout_seconds,
        per_portal=portals.per_portal_concurrency,
        concurrency=portals.concurrency,
        # every connection to a vetted address (a name may resolve elsewhere than when put)
        transport=public_only_transport(dev=portals.dev, connections=portals.concurrency),
    )
    worker = PortalsWorker(states, book, deliverer, service.publisher, portals)

    # --- everything portals handles --------------------------------------------------------
    service.app.task(keys.follow)
    service.app.task(book.follow)
    service.app.task(view.follow)
    service.consume(
        INPUT_TOPICS,
        worker.on_batch,
        decode=decode_input,
        state=states.table,
        after_restore=worker.after_restore,
        max_records=portals.max_batch,
        poll_seconds=portals.batch_within_seconds,
    )
    service.every(portals.scan_interval_seconds, worker.scan)
    desk = routes.register(
        service.api,
        portals=keys,
        book=book,
        states=view,
        publisher=service.publisher,
        audit=AuditRecorder(service.publisher, "motcua/portals"),
        dev=portals.dev,
    )
    install_refusals(service.api)
    admin.register(service.api, OperatorAuth(TokenVerifier.from_settings(settings)), book, desk)
    service.add_ready_check(keys.read)
    service.add_ready_check(book.read)
    service.add_ready_check(view.read)

    @service.app.on_before_shutdown.connect
    async def stop_delivering(sender: Any, /, *args: Any, **kwargs: Any) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(worker.close(), 5.0)
        await deliverer.close()

    return service


def run(settings: Settings) -> None:
    run_service(bootstrap(settings), settings.portals_port)
