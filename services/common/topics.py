"""Topic names, and which topics carry a dead-letter twin."""

from __future__ import annotations

from dataclasses import dataclass

DOSSIER_EVENTS = "dossier.events"
PAYMENT_EVENTS = "payment.events"
POSTAL_EVENTS = "postal.events"
SMS_EVENTS = "sms.events"
# Citizens' answers to the satisfaction survey (`survey.answered`, published by intake's survey
# page, services/intake/survey.py), keyed by dossier id like `dossier.events`.
SURVEY_EVENTS = "survey.events"
# Operators' actions that changed something (CONTRACT section 8): read by people (`motcua
# audit`), consumed by no service, so it has no dead-letter twin.
AUDIT_EVENTS = "audit.events"

# The portal keys added, rotated and revoked by operators (services/common/portal_keys.py): one
# record per key id, compacted, read whole by every intake replica. Small: one partition keeps
# every change in one order.
PORTAL_KEYS = "portal.keys"
PORTAL_KEYS_PARTITIONS = 1

# The portals' callback subscriptions (services/portals/subscriptions.py): one record per portal
# source, its latest subscription or a tombstone, compacted, read whole by every portals process.
PORTAL_SUBSCRIPTIONS = "portal.subscriptions"
PORTAL_SUBSCRIPTIONS_PARTITIONS = 1

# The dossiers' data keys (services/common/data_keys.py, CONTRACT section 10): key = dossier id,
# value = the data key wrapped by a KEK of `MOTCUA_KEK` (never a key in clear); a tombstone is
# the erasure of that dossier's personal data. Compacted, and co-partitioned with
# `dossier.events` (same partition count, same keys), written by intake before the dossier's
# first sealed event; every service that opens a personal field follows it whole.
DOSSIER_KEYS = "dossier.keys"

BY_PREFIX = {
    "dossier": DOSSIER_EVENTS,
    "payment": PAYMENT_EVENTS,
    "postal": POSTAL_EVENTS,
    "sms": SMS_EVENTS,
    "survey": SURVEY_EVENTS,
    "audit": AUDIT_EVENTS,
}

# Internal topics: verified partner callbacks, written before the webhook answers 2xx and
# applied by the owning service's agent. Keyed by dossier id where the callback names one.
PAYMENT_CALLBACKS = "payments.callbacks"
POSTAL_CALLBACKS = "postal.callbacks"
SMS_CALLBACKS = "sms.callbacks"
# The portals worker's own inputs: the outcome of each delivery attempt, redelivery requests and
# retirement ticks (services/portals/messages.py); its dead letters are the deliveries given up.
PORTALS_CALLBACKS = "portals.callbacks"
# A receipt asked for each successful payment (services/payments/receipts.py), keyed by agency
# code: one partition orders an agency's receipts, so one consumer numbers them without gaps.
PAYMENT_RECEIPT_REQUESTS = "payments.receipt-requests"

# The internal callback topics: each record is applied within seconds of its write; a month is
# kept to look into a partner's dispute (deploy/README.md, "Retention").
CALLBACK_TOPICS = (
    PAYMENT_CALLBACKS,
    POSTAL_CALLBACKS,
    SMS_CALLBACKS,
    PORTALS_CALLBACKS,
    PAYMENT_RECEIPT_REQUESTS,
)
CALLBACK_RETENTION_MS = 30 * 24 * 60 * 60 * 1000
# Dead letters wait for an operator (counts, replay): a quarter is kept.
DEAD_LETTER_RETENTION_MS = 90 * 24 * 60 * 60 * 1000

# Every topic is consumed by some service, so every one has its dead-letter twin.
CONSUMER_TOPICS = (
    DOSSIER_EVENTS,
    PAYMENT_EVENTS,
    POSTAL_EVENTS,
    SMS_EVENTS,
    SURVEY_EVENTS,
    PAYMENT_CALLBACKS,
    POSTAL_CALLBACKS,
    SMS_CALLBACKS,
    PORTALS_CALLBACKS,
    PAYMENT_RECEIPT_REQUESTS,
)


# Compacted topics holding a service's latest state per key (its `StateTable`, see
# `services/common/state.py`). Keyed like the inputs and with as many partitions, so a consumer
# restores exactly the partitions of the inputs it was assigned.
# The metrics worker's per-dossier states (`services/metrics/codec.py`).
METRICS_STATE_CHANGELOG = "motcua-metrics-metrics-dossiers-changelog"
# The postal worker's per-dossier states (both legs of a dossier).
POSTAL_STATE_CHANGELOG = "motcua-postal-postal_state-changelog"
# The SMS worker's per-dossier records (`services/sms/record.py`).
SMS_STATE_CHANGELOG = "motcua-sms-sms-dossiers-changelog"
# The portals worker's per-dossier states: owner portal, status, deliveries (services/portals).
PORTALS_STATE_CHANGELOG = "motcua-portals-dossiers-changelog"
# The payments ledger (`services/payments/ledger.py`), also read by the daily reconciliation.
PAYMENTS_LEDGER_CHANGELOG = "motcua-payments-ledger-changelog"
# Each agency's receipt counters (services/payments/receipts.py), keyed by agency code like
# `payments.receipt-requests`.
PAYMENTS_RECEIPTS_CHANGELOG = "motcua-payments-receipts-changelog"
# The metrics figures of every partition (services/metrics/figures.py), written by the process
# leading the metrics group, read by every metrics process when it starts. One partition.
METRICS_FIGURES_SNAPSHOTS = "motcua-metrics-figures.snapshots"
CHANGELOG_TOPICS = (
    METRICS_STATE_CHANGELOG,
    POSTAL_STATE_CHANGELOG,
    SMS_STATE_CHANGELOG,
    PAYMENTS_LEDGER_CHANGELOG,
    PORTALS_STATE_CHANGELOG,
    PAYMENTS_RECEIPTS_CHANGELOG,
)


# The audit trail is kept 400 days: a whole year of operators' actions is there for the yearly
# review, with a month's margin to carry it out (deploy/README.md, "Audit trail").
AUDIT_RETENTION_MS = 400 * 24 * 60 * 60 * 1000


# The snapshots of each changelog's partitions (services/common/snapshots.py): a restore reads
# only the latest one, so a week is kept, for a look back.
SNAPSHOT_RETENTION_MS = 7 * 24 * 60 * 60 * 1000


def dlq(topic: str) -> str:
    return f"{topic}.dlq"


def snapshots_of(changelog: str) -> str:
    return f"{changelog}.snapshots"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    compacted: bool = False
    retention_ms: int | None = None


def declared_topics(partitions: int) -> list[TopicSpec]:
    """Every topic motcua needs (each consumed one with its DLQ, the changelogs it writes itself
    and their snapshots, the audit trail and the portal keys); the deploy manifests must agree
    with this list."""
    specs: list[TopicSpec] = []
    for topic in CONSUMER_TOPICS:
        kept = CALLBACK_RETENTION_MS if topic in CALLBACK_TOPICS else None
        specs.append(TopicSpec(topic, partitions, retention_ms=kept))
        specs.append(TopicSpec(dlq(topic), partitions, retention_ms=DEAD_LETTER_RETENTION_MS))
    specs.extend(TopicSpec(topic, partitions, compacted=True) for topic in CHANGELOG_TOPICS)
    specs.extend(
        TopicSpec(snapshots_of(topic), partitions, retention_ms=SNAPSHOT_RETENTION_MS)
        for topic in CHANGELOG_TOPICS
    )
    specs.append(figures_snapshots_spec())
    specs.append(TopicSpec(AUDIT_EVENTS, partitions, retention_ms=AUDIT_RETENTION_MS))
    specs.append(portal_keys_spec())
    specs.append(dossier_keys_spec(partitions))
    specs.append(portal_subscriptions_spec())
    return specs


def dossier_keys_spec(partitions: int) -> TopicSpec:
    return TopicSpec(DOSSIER_KEYS, partitions, compacted=True)


def figures_snapshots_spec() -> TopicSpec:
    return TopicSpec(METRICS_FIGURES_SNAPSHOTS, 1, retention_ms=SNAPSHOT_RETENTION_MS)


def portal_keys_spec() -> TopicSpec:
    return TopicSpec(PORTAL_KEYS, PORTAL_KEYS_PARTITIONS, compacted=True)


def portal_subscriptions_spec() -> TopicSpec:
    return TopicSpec(PORTAL_SUBSCRIPTIONS, PORTAL_SUBSCRIPTIONS_PARTITIONS, compacted=True)
