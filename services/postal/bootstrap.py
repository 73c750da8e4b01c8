"""Postal: post-office pickup of dossiers, delivery of results, COD, carrier status webhooks.

- **Consumes** `dossier.events` (submitted, resolved, withdrawn, rejected) and `postal.callbacks`
  (carrier callbacks and scan ticks) in one batch consumer, group `motcua-postal`
  (`worker.PostalWorker`), its dossier states restored from and written to
  `motcua-postal-postal_state-changelog` before every commit; a dossier whose story is over
  leaves them `POSTAL_RETIRE_AFTER_SECONDS` later (a tombstone; `domain.py` says what a late
  input for it does).
- **Produces** `postal.events` (`postal.*`, keyed by dossier id), `postal.callbacks` (verified
  webhook callbacks, and a tick per dossier the scan finds due) and the changelog.
- **Calls** the carriers (VNPost: book, cancel, query orders; `partner.py`), the personal fields
  of a booking opened for that call alone (`personal.PersonalData`, with the dossiers' keys of
  `dossier.keys`, followed whole).
- **Serves** `POST /v1/webhooks/postal/{carrier}` (`webhook.py`, through the one webhook door),
  `/healthz`, `/readyz` (consumer restored, Redis reachable) and `/metrics`.
"""

from __future__ import annotations

from services.common import topics
from services.common.claims import Claims
from services.common.coordination import Keys, connect, redis_reachable
from services.common.data_keys import CACHED_OPENING, ERASED_KEPT_OPENING, DataKeys
from services.common.partner import RetryPolicy
from services.common.service import Service, create_service, data_dir, run_service
from services.common.settings import Settings
from services.postal.partner import Carrier, VNPostClient
from services.postal.personal import PersonalData
from services.postal.settings import PostalSettings
from services.postal.shipments import decode_state, encode_state
from services.postal.webhook import carrier_webhooks
from services.postal.worker import DossierStates, PostalShell, PostalWorker, decode_input


def make_carriers(settings: Settings, postal: PostalSettings) -> dict[str, Carrier]:
    retry = RetryPolicy(
        attempts=postal.carrier_attempts, base_delay=postal.carrier_retry_base_seconds
    )
    vnpost = VNPostClient(
        settings.vnpost_url,
        postal.vnpost_client_id,
        postal.vnpost_client_secret,
        timeout=postal.carrier_timeout_seconds,
        retry=retry,
    )
    return {vnpost.name: vnpost}


def bootstrap(settings: Settings, own_settings: PostalSettings | None = None) -> Service:
    """The postal service: its dependencies built once, everything it handles registered below."""
    postal = own_settings or PostalSettings()
    service = create_service(
        "postal",
        settings,
        title="motcua postal",
        description="Pickup of dossiers and return of results by post; carrier status webhooks.",
    )
    redis = connect(settings)
    keys = Keys(settings.redis_namespace)
    states = DossierStates(
        service.state_table(
            topics.POSTAL_STATE_CHANGELOG,
            encode=encode_state,
            decode=decode_state,
            cache_size=postal.state_cache_size,
        ),
        postal.config(),
        postal.rebook_after,
    )
    carriers = make_carriers(settings, postal)
    # the applicants' addresses, names and phones are sealed (CONTRACT section 10)
    data_keys = DataKeys.of(
        settings,
        data_dir(settings, "postal"),
        erased_kept=ERASED_KEPT_OPENING,
        cached=CACHED_OPENING,
    )
    shell = PostalShell(
        service.publisher,
        carriers,
        postal.config(),
        postal.rebook_after,
        PersonalData(data_keys),
    )
    worker = PostalWorker(states, shell, service.publisher, postal)
    webhooks = carrier_webhooks(
        settings, Claims(redis, postal.callback_dedupe_ttl_seconds), keys, service.publisher
    )

    # --- everything postal handles ---------------------------------------------------------
    service.consume(
        (topics.DOSSIER_EVENTS, topics.POSTAL_CALLBACKS),
        worker.on_batch,
        decode=decode_input,
        state=states.table,
        after_restore=worker.after_restore,
        max_records=postal.max_batch,
        poll_seconds=postal.batch_within_seconds,
    )
    service.app.task(data_keys.follow)
    service.every(postal.scan_interval_seconds, worker.scan)
    service.webhook("/v1/webhooks/postal/{carrier}", webhooks.endpoint)
    service.add_ready_check(redis_reachable(redis))
    service.add_ready_check(data_keys.keys_read)
    return service


def run(settings: Settings) -> None:
    run_service(bootstrap(settings), settings.postal_port)
