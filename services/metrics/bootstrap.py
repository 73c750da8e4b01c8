"""The metrics service, wired: what it consumes, produces and serves.

- **Consumes** `dossier.events`, `payment.events`, `postal.events`, `sms.events` and
  `survey.events` (all keyed by dossier id) in batches (`MetricsWorker.on_batch`). The
  per-dossier states of the partitions a process holds live in a `StateTable` on the service's
  compacted changelog (`topics.METRICS_STATE_CHANGELOG`), restored on every assignment;
  dossiers whose story is over leave it, summed into folds on the same changelog
  (`services.metrics.rollups`).
- **Answers from the whole changelog**: every process reads the changelog, all partitions, into
  its figures (`figures.FiguresFollower`), so any number of processes answer every query with
  the same figures, whichever partitions they hold; `/readyz` answers 503 until the process
  holds its partitions and has read the changelog to the end once.
- **Produces** `dossier.overdue` on `dossier.events`, one per open dossier whose due date passed
  (`MetricsWorker.emit_overdue`, every `METRICS_OVERDUE_INTERVAL_SECONDS`), and one
  `audit.dead_letter_replay` on `audit.events` per dead-letter replay.
- **Serves** `/v1/metrics/summary`, `/v1/metrics/breakdown`, `/v1/metrics/info` to operators
  with the role `viewer` or above (bearer tokens of `MOTCUA_OIDC_ISSUER`, CONTRACT section 8; a
  token scoped to agencies counts only theirs), the dashboard (`/`, `/auth/callback`, `/static`)
  and its sign-in (`/auth/config`, `/auth/token`), and the store's figures on `/metrics`.
  To operators with the role `admin`: the dead letters of a topic by error type
  (`GET /v1/admin/dead-letters/{topic}`) and their replay
  (`POST /v1/admin/dead-letters/{topic}/replay`), in `services.metrics.admin`.
"""

from __future__ import annotations

from prometheus_client import REGISTRY

from services.common import topics
from services.common.audit import AuditRecorder
from services.common.auth import OperatorAuth, TokenVerifier, install_refusals
from services.common.logging import get_logger
from services.common.service import Service, create_service, run_service
from services.common.settings import Settings
from services.common.snapshots import SnapshotStore
from services.metrics import admin, routes, sign_in
from services.metrics.codec import decode_state, encode_state
from services.metrics.figures import FiguresFollower
from services.metrics.routes import StoreCollector
from services.metrics.settings import MetricsSettings
from services.metrics.worker import MetricsWorker

log = get_logger("motcua.metrics")

INPUT_TOPICS = (
    topics.DOSSIER_EVENTS,
    topics.PAYMENT_EVENTS,
    topics.POSTAL_EVENTS,
    topics.SMS_EVENTS,
    topics.SURVEY_EVENTS,
)


def bootstrap(settings: Settings, own_settings: MetricsSettings | None = None) -> Service:
    metrics = own_settings or MetricsSettings()
    service = create_service(
        "metrics",
        settings,
        title="motcua metrics",
        description="Figures of the province's dossiers (CONTRACT section 5) and the dashboard.",
    )
    states = service.state_table(
        topics.METRICS_STATE_CHANGELOG,
        encode=encode_state,
        decode=decode_state,
        cache_size=metrics.state_cache_size,
    )
    worker = MetricsWorker(
        states,
        metrics,
        publish=service.publish,
        partitions=settings.topic_partitions,
    )
    follower = FiguresFollower(
        settings.kafka_bootstrap,
        states.changelog.spec,
        states.decoded,  # the worker's own states are decoded once, for both
        replication=settings.topic_replication,
        snapshots=SnapshotStore(
            settings.kafka_bootstrap,
            topics.figures_snapshots_spec(),
            service.publisher,
            replication=settings.topic_replication,
        ),
        leads=lambda: service.consumer is not None and service.consumer.leads,
        snapshot_min_records=settings.state_snapshot_min_records,
    )
    verifier = TokenVerifier(
        settings.oidc_issuer,
        settings.oidc_audience,
        remember_seconds=metrics.remember_token_seconds,
    )
    auth = OperatorAuth(verifier)
    audit = AuditRecorder(service.publisher, "motcua/metrics")

    service.consume(
        INPUT_TOPICS,
        worker.on_batch,
        state=worker.states,
        after_restore=worker.after_restore,
        on_idle=worker.retire_when_due,
        max_records=metrics.max_batch,
        poll_seconds=metrics.batch_within_seconds,
    )
    service.app.task(follower.follow)
    service.add_ready_check(follower.figures_read)
    service.every(metrics.overdue_interval_seconds, worker.emit_overdue)
    service.every(metrics.figures_snapshot_check_seconds, follower.snapshot_if_due)
    install_refusals(service.api)
    routes.register(service.api, follower, metrics, auth)
    admin.register(service.api, auth, settings.kafka_bootstrap, audit)
    sign_in.register(service.api, settings.oidc_issuer, metrics.dashboard_client_id)
    REGISTRY.register(StoreCollector(follower, metrics.prometheus_cache_seconds))
    return service


def run(settings: Settings) -> None:
    metrics = MetricsSettings()
    service = bootstrap(settings, metrics)
    log.info("metrics_starting", port=settings.metrics_port, clock=metrics.overdue_clock)
    run_service(service, settings.metrics_port)
