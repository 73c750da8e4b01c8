"""The portals service's own tunables (the shared ones are `services.common.settings`)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.portals.domain import Retirement

# CONTRACT section 9: retried after 60 s, 5 min, 1 h, 1 day and 2 days, then given up.
DEFAULT_RETRY_SECONDS = [60.0, 300.0, 3600.0, 86400.0, 172800.0]


class PortalsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    # `dev` allows callback URLs to loopback (http too); anything else asks https to a public
    # address (CONTRACT section 9). `motcua dev` sets dev.
    env: str = Field(default="production", validation_alias="MOTCUA_ENV")
    # The waits between attempts (comma-separated seconds); attempts = 1 + their number.
    retry_seconds: Annotated[list[float], NoDecode] = Field(
        default=DEFAULT_RETRY_SECONDS, validation_alias="PORTALS_RETRY_SECONDS"
    )
    # A delivery answered 2xx within this many seconds is delivered.
    timeout_seconds: float = Field(default=10.0, gt=0, validation_alias="PORTALS_TIMEOUT_SECONDS")
    # Attempts in flight to one portal at once, and to all portals (one slow portal holds only
    # its own share).
    per_portal_concurrency: int = Field(
        default=16, ge=1, validation_alias="PORTALS_PER_PORTAL_CONCURRENCY"
    )
    concurrency: int = Field(default=512, ge=1, validation_alias="PORTALS_CONCURRENCY")
    # How often the scan looks for due attempts and retirements.
    scan_interval_seconds: float = Field(
        default=0.05, gt=0, validation_alias="PORTALS_SCAN_INTERVAL_SECONDS"
    )
    # A closed or never-owned dossier leaves the state this long after its last change; an
    # open one after this long without any change.
    retire_after_seconds: int = Field(
        default=14 * 86400, ge=0, validation_alias="PORTALS_RETIRE_AFTER_SECONDS"
    )
    retire_idle_after_seconds: int = Field(
        default=90 * 86400, ge=0, validation_alias="PORTALS_RETIRE_IDLE_AFTER_SECONDS"
    )
    max_batch: int = Field(default=2000, ge=1, validation_alias="PORTALS_MAX_BATCH")
    batch_within_seconds: float = Field(
        default=0.05, gt=0, validation_alias="PORTALS_BATCH_WITHIN_SECONDS"
    )
    dossier_concurrency: int = Field(
        default=64, ge=1, validation_alias="PORTALS_DOSSIER_CONCURRENCY"
    )
    state_cache_size: int = Field(default=4000, ge=0, validation_alias="PORTALS_STATE_CACHE_SIZE")

    @field_validator("retry_seconds", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [float(part) for part in value.split(",") if part.strip()]
        return value

    @field_validator("retry_seconds")
    @classmethod
    def _non_negative(cls, value: list[float]) -> list[float]:
        if any(v < 0 for v in value):
            raise ValueError("PORTALS_RETRY_SECONDS: waits must be zero or more seconds")
        return value

    @property
    def dev(self) -> bool:
        return self.env == "dev"

    def retirement(self) -> Retirement:
        return Retirement(
            timedelta(seconds=self.retire_after_seconds),
            timedelta(seconds=self.retire_idle_after_seconds),
        )
