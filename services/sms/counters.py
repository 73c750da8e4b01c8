"""The SMS service's Prometheus counters and histograms (served on `/metrics`)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

SENT = Counter("motcua_sms_sent_total", "SMS accepted by a provider", ["template", "provider"])
SEGMENTS = Counter(
    "motcua_sms_segments_total", "Segments accepted by a provider", ["template", "provider"]
)
DELIVERED = Counter("motcua_sms_delivered_total", "SMS delivered", ["template", "provider"])
FAILED = Counter("motcua_sms_failed_total", "SMS failed", ["template", "provider", "kind"])
SUPPRESSED = Counter("motcua_sms_suppressed_total", "SMS not sent", ["template", "reason"])
FAILOVERS = Counter(
    "motcua_sms_failovers_total",
    "Messages moved on to the next provider, by the provider they left",
    ["from_provider"],
)
PROVIDER_CALLS = Counter(
    "motcua_sms_provider_calls_total", "Messages offered to SMS providers", ["provider", "outcome"]
)
STAGE_SECONDS = Histogram(
    "motcua_sms_stage_seconds",
    "Time per stage of sending: queue and rate_limit per message; claim, send, publish per batch",
    ["stage"],
)
PROVIDER_SECONDS = Histogram(
    "motcua_sms_provider_seconds", "Time of one call to a provider", ["provider"]
)
BATCH_SIZE = Histogram(
    "motcua_sms_batch_size",
    "Messages per admission or provider call",
    ["stage"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500),
)

# The fold's counts (`fold.Outcome.counts`) by name.
BY_NAME = {"suppressed": SUPPRESSED, "failed": FAILED, "delivered": DELIVERED}
