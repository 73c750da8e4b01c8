"""Settings from the environment. Dev defaults are the CONTRACT section 7 credentials."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def hash_key(key: str) -> str:
    """How portal keys are stored: SHA-256 hex. Keys are long random strings, so no salt."""
    return hashlib.sha256(key.encode()).hexdigest()


class Portal(BaseModel):
    """A portal allowed to publish: the `source` it owns, its key's hash and its rate."""

    source: str
    key_sha256: str
    rate_per_second: float = 5000.0
    burst: int = 20000


DEV_PORTALS = [Portal(source="portal/dev", key_sha256=hash_key("dev-portal-key"))]


# The development key-encryption key of personal data (`MOTCUA_KEK`; CONTRACT section 10): a
# public value, for `motcua dev` and the tests only. Every other environment sets its own.
DEV_KEK = "dev:ZGV2LW1vdGN1YS1rZWstMzItYnl0ZXMtb25seS1kZXY="


def _secrets(*values: str) -> list[str]:
    return list(values)


class Settings(BaseSettings):
    """Everything a service reads from its environment, in one place."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    kafka_bootstrap: str = Field(default="127.0.0.1:9092", validation_alias="KAFKA_BOOTSTRAP")
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", validation_alias="REDIS_URL")
    # Prefix for every Redis key, so runs on one Redis never see each other's state.
    redis_namespace: str = Field(default="motcua", validation_alias="MOTCUA_REDIS_NAMESPACE")
    topic_partitions: int = Field(default=8, ge=1, validation_alias="MOTCUA_TOPIC_PARTITIONS")
    topic_replication: int = Field(default=1, ge=1, validation_alias="MOTCUA_TOPIC_REPLICATION")
    # A changelog partition gets a new snapshot once it grew by more than twice its live states
    # and by at least this many records (services/common/state.py)
    state_snapshot_min_records: int = Field(
        default=20_000, ge=1, validation_alias="MOTCUA_STATE_SNAPSHOT_MIN_RECORDS"
    )
    # A consumer group member that sent no heartbeat for this long is dropped and its
    # partitions go to the others (heartbeats every 0.3 of it). Kafka brokers accept 6 s to
    # 30 min by default (group.min/max.session.timeout.ms); Tansu, the embedded broker, also
    # holds every join for half of it, so a start and a rebalance wait about that long.
    consumer_session_timeout_seconds: float = Field(
        default=10.0, ge=1.0, le=300.0, validation_alias="MOTCUA_CONSUMER_SESSION_TIMEOUT_SECONDS"
    )
    data_dir: str = Field(default="", validation_alias="MOTCUA_DATA_DIR")
    log_level: str = Field(default="INFO", validation_alias="MOTCUA_LOG_LEVEL")
    log_json: bool = Field(default=False, validation_alias="MOTCUA_LOG_JSON")

    metrics_port: int = Field(default=8000, validation_alias="METRICS_PORT")
    intake_port: int = Field(default=8001, validation_alias="INTAKE_PORT")
    payments_port: int = Field(default=8002, validation_alias="PAYMENTS_PORT")
    postal_port: int = Field(default=8003, validation_alias="POSTAL_PORT")
    sms_port: int = Field(default=8004, validation_alias="SMS_PORT")
    portals_port: int = Field(default=8005, validation_alias="PORTALS_PORT")
    bind_host: str = Field(default="127.0.0.1", validation_alias="MOTCUA_BIND_HOST")

    # Partner sandboxes (dev, demo, tests) and where the services reach their partners.
    vnpay_sandbox_port: int = Field(default=8012, validation_alias="VNPAY_SANDBOX_PORT")
    vnpost_sandbox_port: int = Field(default=8013, validation_alias="VNPOST_SANDBOX_PORT")
    sms_primary_sandbox_port: int = Field(default=8014, validation_alias="SMS_PRIMARY_SANDBOX_PORT")
    sms_secondary_sandbox_port: int = Field(
        default=8015, validation_alias="SMS_SECONDARY_SANDBOX_PORT"
    )
    # The portal sandbox: receives the portals service's callbacks (services/sandboxes/portal.py).
    portal_sandbox_port: int = Field(default=8016, validation_alias="PORTAL_SANDBOX_PORT")
    # How long the bank, post office and SMS sandboxes keep an order or message once it is
    # finished (no more callbacks to send), counted from its last change (docs/state.md).
    sandbox_retain_seconds: float = Field(
        default=86400, gt=0, validation_alias="SANDBOX_RETAIN_SECONDS"
    )
    # Beyond this many finished ones, the carrier and SMS sandboxes forget the longest finished
    # earlier, but never one finished less than `sandbox_retain_min_seconds` ago (docs/state.md).
    sandbox_retain_finished: int = Field(
        default=50_000, ge=0, validation_alias="SANDBOX_RETAIN_FINISHED"
    )
    sandbox_retain_min_seconds: float = Field(
        default=900, ge=0, validation_alias="SANDBOX_RETAIN_MIN_SECONDS"
    )
    # The development OpenID Connect issuer (`motcua dev`, tests): services/dev/issuer.py.
    oidc_issuer_port: int = Field(default=8009, validation_alias="OIDC_ISSUER_PORT")
    vnpay_url: str = Field(default="http://127.0.0.1:8012", validation_alias="VNPAY_URL")
    vnpay_tmn_code: str = Field(default="MOTCUADEV", validation_alias="VNPAY_TMN_CODE")
    vnpost_url: str = Field(default="http://127.0.0.1:8013", validation_alias="VNPOST_URL")
    sms_primary_url: str = Field(
        default="http://127.0.0.1:8014", validation_alias="SMS_PRIMARY_URL"
    )
    sms_secondary_url: str = Field(
        default="http://127.0.0.1:8015", validation_alias="SMS_SECONDARY_URL"
    )
    # Where partners call back (the services' public webhook base URLs).
    payments_public_url: str = Field(
        default="http://127.0.0.1:8002", validation_alias="PAYMENTS_PUBLIC_URL"
    )
    postal_public_url: str = Field(
        default="http://127.0.0.1:8003", validation_alias="POSTAL_PUBLIC_URL"
    )
    sms_public_url: str = Field(default="http://127.0.0.1:8004", validation_alias="SMS_PUBLIC_URL")

    # Operators' access tokens (CONTRACT section 8): the identity provider that signs them, and
    # the audience (`aud`) they must name.
    oidc_issuer: str = Field(default="http://127.0.0.1:8009", validation_alias="MOTCUA_OIDC_ISSUER")
    oidc_audience: str = Field(default="motcua", validation_alias="MOTCUA_OIDC_AUDIENCE")
    # Prometheus' scrape token: when set, `/metrics` of every service answers 401 unless it is
    # sent as `Authorization: Bearer <token>` (services/common/scrape.py); empty (the dev
    # default) leaves `/metrics` open to whoever reaches the port.
    metrics_scrape_token: str = Field(default="", validation_alias="MOTCUA_METRICS_SCRAPE_TOKEN")

    portals: list[Portal] = Field(default=DEV_PORTALS, validation_alias="MOTCUA_PORTALS")
    dedupe_ttl_seconds: int = Field(
        default=30 * 24 * 3600, ge=60, validation_alias="INTAKE_DEDUPE_TTL_SECONDS"
    )
    max_body_bytes: int = Field(default=1024 * 1024, validation_alias="INTAKE_MAX_BODY_BYTES")
    publish_timeout_seconds: float = Field(
        default=10.0, gt=0, validation_alias="INTAKE_PUBLISH_TIMEOUT_SECONDS"
    )

    # Webhook secrets: comma-separated, several active at once while rotating.
    vnpay_secrets: Annotated[list[str], NoDecode] = Field(
        default=_secrets("dev-vnpay-secret"), validation_alias="VNPAY_SECRETS"
    )
    vnpost_secrets: Annotated[list[str], NoDecode] = Field(
        default=_secrets("dev-vnpost-secret"), validation_alias="VNPOST_SECRETS"
    )
    sms_secrets: Annotated[list[str], NoDecode] = Field(
        default=_secrets("dev-sms-secret"), validation_alias="SMS_SECRETS"
    )
    webhook_tolerance_seconds: int = Field(
        default=300, validation_alias="WEBHOOK_TOLERANCE_SECONDS"
    )

    # Key-encryption keys of the dossiers' data keys (services/common/sealing.py): `id:base64
    # 32-byte key`, comma-separated, newest first; the first wraps new keys, every one listed
    # unwraps. Remove an id only once no data key wrapped by it is left.
    kek: str = Field(default=DEV_KEK, validation_alias="MOTCUA_KEK")
    # The data keys of closed dossiers are destroyed this long after closing (CONTRACT section
    # 10), checked every interval by one intake replica (services/intake/retention.py).
    pii_retention_days: float = Field(
        default=90, ge=0, validation_alias="MOTCUA_PII_RETENTION_DAYS"
    )
    pii_retention_interval_seconds: float = Field(
        default=3600, gt=0, validation_alias="MOTCUA_PII_RETENTION_INTERVAL_SECONDS"
    )
    # What "now" the retention compares closing moments with: `wall`, the wall clock (service),
    # or `events`, the latest closing moment it has read on `dossier.events` (replays of
    # history only: benchmarks, load tests; never in service, where one event with a wrong
    # time would bring every closed dossier's destruction forward).
    pii_retention_clock: Literal["wall", "events"] = Field(
        default="wall", validation_alias="MOTCUA_PII_RETENTION_CLOCK"
    )

    # The satisfaction survey (services/common/survey_links.py): the secrets of its links
    # (comma-separated; the first signs, every one verifies: rotation), how many days a link
    # stays open after the result was returned, and the public base URL of its page (intake).
    survey_secrets: Annotated[list[str], NoDecode] = Field(
        default=_secrets("dev-survey-secret"), validation_alias="MOTCUA_SURVEY_SECRETS"
    )
    survey_link_days: int = Field(
        default=30, ge=1, le=365, validation_alias="MOTCUA_SURVEY_LINK_DAYS"
    )
    survey_base_url: str = Field(
        default="http://127.0.0.1:8001", validation_alias="MOTCUA_SURVEY_BASE_URL"
    )
    # The survey page's rates (requests to `/s/{token}`, either method): per client address,
    # and per dossier, each a burst of that many then refilled over the period.
    survey_per_client_per_minute: int = Field(
        default=30, ge=1, validation_alias="INTAKE_SURVEY_PER_CLIENT_PER_MINUTE"
    )
    survey_per_dossier_per_hour: int = Field(
        default=20, ge=1, validation_alias="INTAKE_SURVEY_PER_DOSSIER_PER_HOUR"
    )

    @field_validator(
        "vnpay_secrets", "vnpost_secrets", "sms_secrets", "survey_secrets", mode="before"
    )
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
