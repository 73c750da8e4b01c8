"""The payments service, wired: what it consumes, produces and serves.

- **Consumes** `dossier.events` (`dossier.submitted`, and `dossier.withdrawn` /
  `dossier.rejected`: a paid fee is then owed back) and `payments.callbacks` (verified
  gateway notifications, query answers, expiries, confirmed refunds) in batches
  (`PaymentsWorker.on_batch`), one dossier's inputs in order. The ledger is a `StateTable` on the
  compacted changelog `topics.PAYMENTS_LEDGER_CHANGELOG`, restored on every assignment and
  written before every commit.
- **Produces** `payment.requested`, `payment.succeeded`, `payment.failed`, `payment.expired`,
  `payment.refund_required`, `payment.refund_requested`, `payment.refunded`,
  `payment.refund_failed` and `payment.callback_rejected` on
  `payment.events` (ids derived from the dossier and the payment's version), and
  `payment.reconciliation_mismatch` from the nightly reconciliation; `payments.callbacks` from
  the webhook and the sweeper.
- **Serves** the gateways' IPN `GET|POST /v1/webhooks/payments/{gateway}` (CONTRACT section 6),
  `/pay/{txn_ref}`, `/v1/payments/return`, and to operators (tokens verified against
  `MOTCUA_OIDC_ISSUER`) `/v1/payments/{dossier_id}` and the finance reports `/v1/payments`,
  `/v1/payments.csv`, `/v1/payments/totals` (role `finance`, `report_routes.py`), the refunds
  `POST /v1/payments/{dossier_id}/refunds` (role `finance`, `refunds.py`, recorded on
  `audit.events`) and
  `POST /v1/admin/reconciliations` (role `admin`, recorded on `audit.events`).
- **Numbers receipts**: `payments.receipt-requests` (keyed by agency, asked by the ledger's
  outbox for each successful payment) in a consumer group of its own, one agency's requests in
  order; `payment.receipt_issued` on `payment.events`, numbered per agency and year without
  gaps (`receipts.py`, counters on `topics.PAYMENTS_RECEIPTS_CHANGELOG`).
- **Follows** `payment.events` (every partition, no group) into its own report file under
  `MOTCUA_DATA_DIR` (`report_store.py`), kept across restarts, built from the topic when absent.
- **Timers**: the sweep (queries, expiries, refunds) every `PAYMENTS_SWEEP_INTERVAL_SECONDS`,
  the Redis copies of the orders put back after Redis lost them (same interval), the daily
  reconciliation (`PAYMENTS_RECONCILE_CRON`, Vietnam time) and the daily postal cash
  reconciliation (`PAYMENTS_COD_CRON`, `cod_run.py`) on one member.
"""

from __future__ import annotations

from datetime import date

from services.common import topics
from services.common.audit import AuditRecorder
from services.common.auth import OperatorAuth, TokenVerifier
from services.common.claims import Claims
from services.common.consumer import BatchConsumer
from services.common.coordination import Keys, connect, redis_reachable
from services.common.service import Service, create_service, data_dir, run_service
from services.common.settings import Settings
from services.payments import admin, refunds, report_routes, routes
from services.payments.cod_run import daily_cod
from services.payments.ledger import SOURCE, Ledger, OrderSnapshots, ledger_table
from services.payments.partner import GATEWAY_NAMES, JSONPAY, WEBHOOK_PATH, gateways
from services.payments.receipts import GROUP as RECEIPTS_GROUP
from services.payments.receipts import (
    ReceiptIssuer,
    ReceiptRequest,
    decode_request,
    receipts_table,
)
from services.payments.reconciliation import Outcome, daily_reconciliation, run_reconciliation
from services.payments.refunds import RefundAnswers
from services.payments.report_store import ReportFeed, ReportStore
from services.payments.settings import PaymentsSettings
from services.payments.sweeper import Sweeper
from services.payments.vnpay import GATEWAY as VNPAY
from services.payments.webhook import (
    IN_FLIGHT_WAIT_SECONDS,
    PATH_PARAM,
    IpnIntake,
    JsonpayIpn,
    VnpayIpn,
    bank_reply,
)
from services.payments.worker import PaymentsWorker, decode_input

INPUT_TOPICS = (topics.DOSSIER_EVENTS, topics.PAYMENT_CALLBACKS)


def bootstrap(settings: Settings, own_settings: PaymentsSettings | None = None) -> Service:
    conf = own_settings or PaymentsSettings()
    service = create_service(
        "payments",
        settings,
        title="motcua payments",
        description="Online fees: orders, the gateways' IPNs, the ledger and reconciliation.",
    )
    redis = connect(settings)
    keys = Keys(settings.redis_namespace)
    adapters = gateways(settings, conf)
    snapshots = OrderSnapshots(redis, keys, conf.ipn_dedupe_ttl_seconds)
    ledger = Ledger(
        ledger_table(settings, service.publisher),
        snapshots,
        service.publish,
        settings.payments_public_url,
        partitions=settings.topic_partitions,
        retirement=conf.retirement,
        receipts=service.publisher.publish,
    )
    answers = RefundAnswers(redis, keys, conf.ipn_dedupe_ttl_seconds)
    worker = PaymentsWorker(ledger, adapters, conf, answers=answers)
    sweeper = Sweeper(ledger.table, adapters, conf, service.publisher, ledger.retiring)
    intake = IpnIntake(
        "payments",
        {
            VNPAY: VnpayIpn(list(settings.vnpay_secrets), snapshots, ledger),
            JSONPAY: JsonpayIpn(list(conf.jsonpay_secrets), snapshots, ledger),
        },
        path_param=PATH_PARAM,
        topic=topics.PAYMENT_CALLBACKS,
        claims=Claims(redis, conf.ipn_dedupe_ttl_seconds),
        claim_key=lambda gateway, event_ref: keys("payments", "callback", gateway, event_ref),
        publisher=service.publisher,
        reply=bank_reply,
        in_flight_wait=IN_FLIGHT_WAIT_SECONDS,
    )

    consumer = service.consume(
        INPUT_TOPICS,
        worker.on_batch,
        decode=decode_input,
        state=ledger.table,
        after_restore=ledger.restored,
    )
    ledger.follow(lambda: consumer.ready)
    # Receipts: a group of its own over the requests keyed by agency (`receipts.py`).
    issued = receipts_table(settings, service.publisher)
    numbering: BatchConsumer[ReceiptRequest] = BatchConsumer(
        "payments-receipts",
        settings.kafka_bootstrap,
        (topics.PAYMENT_RECEIPT_REQUESTS,),
        ReceiptIssuer(issued, service.publish).on_batch,
        decode=decode_request,
        state=issued,
        retry=service.retry,
        group_id=RECEIPTS_GROUP,
        publisher=service.publisher,
        session_timeout_seconds=settings.consumer_session_timeout_seconds,
    )
    service.app.task(numbering.run)
    service.every(conf.sweep_interval_seconds, sweeper.sweep)
    service.every(conf.sweep_interval_seconds, ledger.heal_snapshots)
    if conf.reconcile_enabled:
        service.daily(conf.reconcile_cron, daily_reconciliation(settings, conf))
    if conf.cod_enabled:
        service.daily(conf.cod_cron, daily_cod(settings, conf))
    service.webhook(WEBHOOK_PATH, intake.endpoint, methods=("GET", "POST"))
    operators = OperatorAuth(TokenVerifier.from_settings(settings))
    reports = ReportStore.in_directory(
        data_dir(settings, "payments") / "reports",
        source=f"{settings.kafka_bootstrap}/{settings.redis_namespace}",
    )
    feed = ReportFeed(
        reports, settings.kafka_bootstrap, settings.topic_partitions, settings.topic_replication
    )
    service.app.task(feed.follow)
    report_routes.register(service.api, reports, operators)  # before /v1/payments/{dossier_id}
    routes.register(service.api, ledger, operators)
    audit = AuditRecorder(service.publisher, SOURCE)
    refunds.register(service.api, ledger, answers, service.publisher, operators, audit)

    async def reconcile(gateway: str, day: date) -> Outcome:
        return await run_reconciliation(settings, conf, gateway, day, None)

    admin.register(
        service.api,
        operators,
        audit,
        reconcile,
        gateways=GATEWAY_NAMES,
        default_gateway=conf.default_gateway,
    )
    service.add_ready_check(redis_reachable(redis))
    return service


def run(settings: Settings) -> None:
    run_service(bootstrap(settings), settings.payments_port)
