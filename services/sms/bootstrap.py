"""The SMS service, wired: tells applicants by SMS what happens to their dossiers.

- **Consumes** `dossier.events`, `payment.events`, `postal.events` and `sms.callbacks` (verified
  delivery reports, `tick` wake-ups, the sender's `settle` batches), all keyed by dossier id, in
  one `BatchConsumer` (group `motcua-sms`) with the per-dossier records in a `StateTable` kept in
  the compacted changelog `topics.SMS_STATE_CHANGELOG` (`worker.SmsWorker`); follows
  `dossier.keys` whole (`DataKeys`) to open the sealed phones (`contacts.Contacts`).
- **Produces** `sms.queued`, `sms.sent`, `sms.delivered`, `sms.failed`, `sms.suppressed` on
  `sms.events`; `settle` and `tick` callbacks and delivery reports on `sms.callbacks`; dead
  letters on `<topic>.dlq`; messages to the two SMS gateways (`partner.SmsGateway`).
- **Serves** `POST /v1/webhooks/sms/{provider}` (delivery reports, `webhook.DeliveryReports`),
  and `/healthz`, `/readyz` (the consumer restored, Redis reachable), `/metrics`.
"""

from __future__ import annotations

from services.common import topics
from services.common.claims import Claims
from services.common.coordination import Keys, connect, redis_reachable
from services.common.data_keys import CACHED_OPENING, ERASED_KEPT_OPENING, DataKeys
from services.common.logging import get_logger
from services.common.service import Service, create_service, data_dir, run_service
from services.common.settings import Settings
from services.common.state import StateTable
from services.common.webhooks import WebhookIntake, json_reply
from services.sms.contacts import Contacts
from services.sms.decisions import SurveyInvites
from services.sms.inbox import CONSUMED_TOPICS
from services.sms.partner import SmsGateway
from services.sms.record import SmsRecord, decode_record, encode_record
from services.sms.settings import PROVIDERS, SmsSettings
from services.sms.webhook import delivery_report_partners
from services.sms.worker import SmsWorker, decode

log = get_logger("motcua.sms")


def bootstrap(settings: Settings, own_settings: SmsSettings | None = None) -> Service:
    sms = own_settings or SmsSettings()
    service = create_service(
        "sms", settings, title="motcua sms", description="SMS notifications to applicants"
    )
    redis = connect(settings)
    keys = Keys(settings.redis_namespace)
    records: StateTable[SmsRecord] = service.state_table(
        topics.SMS_STATE_CHANGELOG,
        encode=encode_record,
        decode=lambda _, raw: decode_record(raw),
        cache_size=sms.record_cache_size,
    )
    urls = {"primary": settings.sms_primary_url, "secondary": settings.sms_secondary_url}
    gateways = {
        name: SmsGateway(name, urls[name], timeout=sms.request_timeout_seconds)
        for name in PROVIDERS
        if name in sms.weights
    }
    # the applicants' phones are sealed (CONTRACT section 10): the dossiers' keys to open them
    data_keys = DataKeys.of(
        settings,
        data_dir(settings, "sms"),
        erased_kept=ERASED_KEPT_OPENING,
        cached=CACHED_OPENING,
    )
    worker = SmsWorker(
        sms,
        records,
        partitions=settings.topic_partitions,
        bootstrap=settings.kafka_bootstrap,
        publisher=service.publisher,
        publish=service.publish,
        redis=redis,
        keys=keys,
        gateways=gateways,
        contacts=Contacts(data_keys, sms.opt_out),
        survey=SurveyInvites(
            tuple(settings.survey_secrets), settings.survey_link_days, settings.survey_base_url
        ),
    )
    reports = WebhookIntake(
        "sms",
        delivery_report_partners(
            PROVIDERS, settings.sms_secrets, settings.webhook_tolerance_seconds
        ),
        path_param="provider",
        topic=topics.SMS_CALLBACKS,
        claims=Claims(redis, sms.claim_ttl_seconds),
        claim_key=lambda provider, event_id: keys("sms", "report", provider, event_id),
        publisher=service.publisher,
        reply=json_reply,
    )

    # --- everything the service handles ----------------------------------------------------
    service.consume(
        CONSUMED_TOPICS,
        worker.on_batch,
        decode=decode,
        state=records,
        after_restore=worker.after_restore,
        held=worker.held,
        max_records=sms.max_batch,
        poll_seconds=sms.poll_seconds,
    )
    service.app.task(data_keys.follow)
    service.every(sms.timer_seconds, worker.send_deferred)
    service.every(sms.timer_seconds, worker.request_ticks)
    service.every(sms.rescan_seconds, worker.pick_up_pending)
    service.webhook("/v1/webhooks/sms/{provider}", reports.endpoint)
    service.add_ready_check(redis_reachable(redis))
    service.add_ready_check(data_keys.keys_read)
    return service


def run(settings: Settings) -> None:
    sms = SmsSettings()
    service = bootstrap(settings, sms)
    log.info("sms_starting", port=settings.sms_port, weights=sms.weights)
    run_service(service, settings.sms_port)
