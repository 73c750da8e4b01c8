"""The postal service's own tunables (shared ones, like `VNPOST_URL`, are in common settings)."""

from __future__ import annotations

from datetime import timedelta

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.postal.domain import PostalConfig
from services.postal.stale import StalePolicy


class PostalSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="POSTAL_", env_file=None, extra="ignore")

    carrier: str = "vnpost"  # who gets new orders
    # Stale shipments: no update for this long → query the carrier; this long → postal.failed.
    stale_query_after_hours: float = Field(default=24.0, gt=0)
    stale_give_up_after_days: float = Field(default=7.0, gt=0)
    # A dossier whose story is over (every leg delivered, returned, failed for good or given
    # up, or never to be booked) leaves the state this long after the latest moment it saw.
    # Until then late carrier callbacks and COD reports still apply; carriers report COD
    # remittances and late corrections within weeks, and 30 days match the webhook dedupe below
    # and intake's dedupe window, so a resend older than that is not a duplicate anywhere.
    retire_after_seconds: float = Field(default=30 * 24 * 3600, gt=0)
    # A `dossier.submitted` of a dossier postal holds nothing of, recorded longer than this ago,
    # is taken for history read again and books nothing (`domain.from_retired`); 0 or anything
    # shorter than the retire grace: the grace. Longer lets postal trail intake by more, at the
    # price of booking again, on a re-read of history, a dossier retired within it (for
    # benchmarks with short graces).
    history_after_seconds: float = Field(default=0, ge=0)
    # How often the scan runs (stale legs, re-sent bookings, retirements), and when an
    # unacknowledged booking is re-sent.
    scan_interval_seconds: float = Field(default=300.0, gt=0)
    rebook_after_seconds: float = Field(default=60.0, gt=0)
    # Webhook dedupe memory (Redis); the per-dossier state dedupes for good besides.
    callback_dedupe_ttl_seconds: int = Field(default=30 * 24 * 3600, ge=60)
    # Calls to the carrier.
    carrier_timeout_seconds: float = Field(default=5.0, gt=0)
    carrier_attempts: int = Field(default=3, ge=1)
    carrier_retry_base_seconds: float = Field(default=0.2, gt=0)
    # Consuming dossier.events and postal.callbacks: records per poll (one changelog record per
    # dossier changed per batch), and how long a poll waits for records when there are none.
    max_batch: int = Field(default=1000, ge=1)
    batch_within_seconds: float = Field(default=0.05, gt=0)
    # dossiers handled at once within a batch (their carrier calls overlap)
    dossier_concurrency: int = Field(default=32, ge=1)
    # decoded states kept beside their changelog bytes (the most recently used dossiers)
    state_cache_size: int = Field(default=4000, ge=0)
    vnpost_client_id: str = "motcua-dev"
    vnpost_client_secret: str = "dev-vnpost-client-secret"

    def config(self) -> PostalConfig:
        return PostalConfig(
            carrier=self.carrier,
            stale=StalePolicy(
                query_after_hours=self.stale_query_after_hours,
                give_up_after_days=self.stale_give_up_after_days,
            ),
            retire_after=timedelta(seconds=self.retire_after_seconds),
            history_after=timedelta(seconds=self.history_after_seconds),
        )

    @property
    def rebook_after(self) -> timedelta:
        return timedelta(seconds=self.rebook_after_seconds)
