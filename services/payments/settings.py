"""The payments service's own tunables (shared ones, VNPAY_URL and friends, are in common)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.payments.domain import QuerySchedule, Retirement


class PaymentsSettings(BaseSettings):
    """Environment `PAYMENTS_*` (and `JSONPAY_*` for the second gateway)."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    # How long an order may be paid, and when it is queried / expired relative to that.
    order_ttl_seconds: float = Field(
        default=900, gt=0, validation_alias="PAYMENTS_ORDER_TTL_SECONDS"
    )
    query_offsets_seconds: Annotated[list[float], NoDecode] = Field(
        default=[-300.0, 60.0], validation_alias="PAYMENTS_QUERY_OFFSETS_SECONDS"
    )
    expire_offset_seconds: float = Field(
        default=60, ge=0, validation_alias="PAYMENTS_EXPIRE_OFFSET_SECONDS"
    )
    # Queries after an order expired: a payment completed at the gateway after the deadline
    # whose IPN was lost shows only here (then it is refunded), or in the daily statement.
    late_query_offsets_seconds: Annotated[list[float], NoDecode] = Field(
        default=[900.0, 86400.0], validation_alias="PAYMENTS_LATE_QUERY_OFFSETS_SECONDS"
    )
    # Retirement (`domain.retire_at`): a settled payment leaves the ledger (and its changelog)
    # this long after its last change and its late-success window. The nightly reconciliation
    # reads the ledger for yesterday's payments and an operator may run a day again later
    # (a statement delivered late, a dispute): 35 days keeps every payment of the past month.
    # Its Redis copy stays another PAYMENTS_IPN_DEDUPE_TTL_SECONDS, for late IPNs and
    # submissions read again.
    retire_after_seconds: float = Field(
        default=Retirement().after.total_seconds(),
        ge=0,
        validation_alias="PAYMENTS_RETIRE_AFTER_SECONDS",
    )
    sweep_interval_seconds: float = Field(
        default=15, gt=0, validation_alias="PAYMENTS_SWEEP_INTERVAL_SECONDS"
    )
    # Orders opened at once from one batch of submissions (each waits for its acks).
    order_concurrency: int = Field(default=32, ge=1, validation_alias="PAYMENTS_ORDER_CONCURRENCY")
    # Which gateway takes an agency's fees: {"000.00.12.H34": "jsonpay"}; others use the default.
    gateway_by_agency: dict[str, str] = Field(
        default_factory=dict, validation_alias="PAYMENTS_GATEWAY_BY_AGENCY"
    )
    default_gateway: str = Field(default="vnpay", validation_alias="PAYMENTS_DEFAULT_GATEWAY")
    # Agencies whose fees go back by themselves when a paid dossier is withdrawn or rejected
    # (comma-separated codes); elsewhere `payment.refund_required` waits for finance to refund.
    auto_refund_agencies: Annotated[list[str], NoDecode] = Field(
        default_factory=list, validation_alias="PAYMENTS_AUTO_REFUND_AGENCIES"
    )
    return_url: str = Field(
        default="http://127.0.0.1:8002/v1/payments/return", validation_alias="PAYMENTS_RETURN_URL"
    )
    ipn_dedupe_ttl_seconds: int = Field(
        default=40 * 24 * 3600, ge=60, validation_alias="PAYMENTS_IPN_DEDUPE_TTL_SECONDS"
    )
    gateway_timeout_seconds: float = Field(
        default=5.0, gt=0, validation_alias="PAYMENTS_GATEWAY_TIMEOUT_SECONDS"
    )
    # Daily reconciliation inside the worker (leader only), for the previous Vietnamese day.
    reconcile_cron: str = Field(default="30 1 * * *", validation_alias="PAYMENTS_RECONCILE_CRON")
    reconcile_enabled: bool = Field(default=True, validation_alias="PAYMENTS_RECONCILE_ENABLED")
    reconcile_dir: str = Field(default="reconciliation", validation_alias="PAYMENTS_RECONCILE_DIR")
    # Postal cash: the post office drops `cod-remittance-<day>.csv` here; the daily job
    # reconciles yesterday's against `postal.cod_collected` (`cod_run.py`).
    cod_cron: str = Field(default="0 2 * * *", validation_alias="PAYMENTS_COD_CRON")
    cod_enabled: bool = Field(default=True, validation_alias="PAYMENTS_COD_ENABLED")
    cod_inbox: str = Field(default="cod-remittances", validation_alias="PAYMENTS_COD_INBOX")

    # The second gateway: JSON bodies signed with hex HMAC-SHA256 (header X-Jsonpay-Signature).
    jsonpay_url: str = Field(
        default="http://127.0.0.1:8012/jsonpay", validation_alias="JSONPAY_URL"
    )
    jsonpay_merchant: str = Field(default="MOTCUAJSON", validation_alias="JSONPAY_MERCHANT")
    jsonpay_secrets: Annotated[list[str], NoDecode] = Field(
        default=["dev-jsonpay-secret"], validation_alias="JSONPAY_SECRETS"
    )

    @field_validator("jsonpay_secrets", "auto_refund_agencies", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("query_offsets_seconds", "late_query_offsets_seconds", mode="before")
    @classmethod
    def _numbers(cls, value: object) -> object:
        if isinstance(value, str):
            return [float(part) for part in value.split(",") if part.strip()]
        return value

    @property
    def order_ttl(self) -> timedelta:
        return timedelta(seconds=self.order_ttl_seconds)

    @property
    def schedule(self) -> QuerySchedule:
        return QuerySchedule(
            query_offsets=tuple(timedelta(seconds=s) for s in self.query_offsets_seconds),
            expire_offset=timedelta(seconds=self.expire_offset_seconds),
        )

    @property
    def retirement(self) -> Retirement:
        return Retirement(
            after=timedelta(seconds=self.retire_after_seconds),
            late_window=timedelta(seconds=max(self.late_query_offsets_seconds, default=0.0)),
        )

    def late_query_due(self, expires_at: datetime, after: datetime, now: datetime) -> bool:
        """True when a post-expiry query of an expired order fell due in (after, now]."""
        return any(
            after < expires_at + timedelta(seconds=s) <= now
            for s in self.late_query_offsets_seconds
        )

    def gateway_for(self, agency_code: str) -> str:
        return self.gateway_by_agency.get(agency_code, self.default_gateway)
