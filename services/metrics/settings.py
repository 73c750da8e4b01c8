"""The metrics service's own tunables (environment variables prefixed `METRICS_`).

Shared settings (the port `METRICS_PORT`, Kafka, partitions) stay in `services.common.settings`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class MetricsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="METRICS_", env_file=None, extra="ignore")

    # Which clock says that a due date passed: the wall clock live, or the event-time
    # watermark (the latest event time seen) when replaying old data.
    overdue_clock: Literal["wall", "watermark"] = "wall"
    overdue_interval_seconds: float = Field(default=2.0, gt=0)
    # Consuming: events per batch (records per poll of the consumer; one changelog record per
    # dossier changed per batch), and how long a poll waits for records when there are none.
    max_batch: int = Field(default=2000, ge=1)
    batch_within_seconds: float = Field(default=0.2, gt=0)
    # Decoded states of the dossiers seen lately, kept beside their changelog bytes (an LRU).
    state_cache_size: int = Field(default=4000, ge=0)
    # /metrics recomputes its figures from the store at most this often.
    prometheus_cache_seconds: float = Field(default=1.0, ge=0)
    # The dashboard page polls the API this often.
    dashboard_refresh_seconds: float = Field(default=10.0, gt=0)
    # The dashboard's client id at the identity provider (a public client: authorization code
    # with PKCE, redirect URI `<dashboard URL>/auth/callback`).
    dashboard_client_id: str = "motcua-dashboard"
    # An operator's token, once verified, is remembered this long (never past its `exp`): the
    # dashboard sends the same token on its ~16 calls of every refresh.
    remember_token_seconds: float = Field(default=60.0, ge=0)
    # A dossier whose story is over (returned, withdrawn or rejected) leaves the per-dossier
    # state this long after its last input arrived (wall clock), folded into the rollups
    # (`domain.retire_after`): long enough for the late reports of a closed dossier (SMS delivery,
    # a late payment, COD) and for any resend of its events a portal might make.
    retire_after_seconds: float = Field(default=14 * 86400.0, ge=0)
    # A dossier resolved but whose result was never handed over, or one known only by outcome
    # events, leaves this long after its last event (the result may still be collected).
    retire_idle_after_seconds: float = Field(default=90 * 86400.0, ge=0)
    # Retirement runs at the end of a batch at most this often (each run writes one fold per
    # partition with something to retire, of at most `worker.FOLD_MOST` dossiers).
    retire_interval_seconds: float = Field(default=60.0, ge=0)
    # How often the process leading the group looks whether the figures' snapshot is due
    # (services/metrics/figures.py): at most one snapshot per interval
    figures_snapshot_check_seconds: float = Field(default=60.0, gt=0)
    # The province's own catalogue files (services/metrics/catalogue/__init__.py): agency codes
    # to names, tiers and parents (CSV); sector names in Vietnamese and English (CSV); the online
    # targets per tier and year (TOML). Empty: the files shipped with the service.
    agency_catalogue_file: str = ""
    sector_names_file: str = ""
    online_targets_file: str = ""
    # The share of satisfied answers (4 or 5 of 5) of the satisfaction survey the dashboard
    # compares `satisfaction.rate` with (the Center's target: at least 80 %).
    satisfaction_target: float = Field(default=0.8, ge=0, le=1)

    def catalogue_paths(self) -> tuple[Path | None, Path | None, Path | None]:
        return tuple(  # type: ignore[return-value]
            Path(name) if name else None
            for name in (
                self.agency_catalogue_file,
                self.sector_names_file,
                self.online_targets_file,
            )
        )
