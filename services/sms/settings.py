"""The SMS service's own tunables (environment variables prefixed `SMS_`).

Shared settings (ports, provider URLs, secrets, public URL) stay in `services.common.settings`.
"""

from __future__ import annotations

from datetime import time, timedelta
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.sms.decisions import SmsPolicy
from services.sms.phones import MobileNumber, normalise_phone
from services.sms.quiet import QuietHours
from services.sms.record import DEFAULT_RETIREMENT, Retirement


class SmsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SMS_", env_file=None, extra="ignore")

    sender: str = Field(default="MOTCUA", max_length=11)  # brandname: at most 11 characters
    # Token buckets in Redis, shared by every worker; they delay, never drop.
    global_rate: float = Field(default=2000.0, gt=0)  # messages per second, all numbers
    global_burst: float = Field(default=2000.0, ge=1)
    per_number_rate: float = Field(default=1.0, gt=0)  # messages per second to one number
    per_number_burst: float = Field(default=10.0, ge=1)
    # Quiet hours, local time (Asia/Ho_Chi_Minh); start == end turns them off.
    quiet_start: time = time(22, 0)
    quiet_end: time = time(7, 0)
    overdue_grace_seconds: float = Field(default=24 * 3600.0, ge=0)
    contact_wait_seconds: float = Field(default=24 * 3600.0, ge=0)
    # Providers: relative weights, and how weight moves away from a failing or slow one.
    weights: dict[str, int] = Field(default_factory=lambda: {"primary": 70, "secondary": 30})
    weight_step: int = Field(default=10, ge=1)
    weight_floor: int = Field(default=10, ge=0)
    weight_cooldown_seconds: float = Field(default=60.0, ge=0)
    slow_seconds: float = Field(default=2.0, gt=0)  # a send slower than this counts as slow
    # Sending: per-request timeout, tries per provider, and backoff between tries.
    request_timeout_seconds: float = Field(default=2.0, gt=0)
    attempts_per_provider: int = Field(default=3, ge=1)
    # After a timeout the provider may have accepted the message: keep asking it (same
    # idempotency key) this many times before failing over, which could send a second copy.
    ambiguous_attempts: int = Field(default=8, ge=1)
    backoff_base_seconds: float = Field(default=0.1, ge=0)
    backoff_max_seconds: float = Field(default=3.0, ge=0)
    # Messages per provider call (`/v1/messages/batch`, at most 500) and calls in flight per
    # provider: a call takes whatever piled up while the previous ones were out.
    batch_size: int = Field(default=200, ge=1, le=500)
    calls_in_flight: int = Field(default=2, ge=1)
    # How long a stage waits for more messages before it claims or calls with fewer than a
    # batch: a little latency buys far fewer round trips under load.
    batch_linger_seconds: float = Field(default=0.02, ge=0)
    # The consumer waits when this many messages are in the stages, and reads only
    # `sms.callbacks` while this many are in the stages or done and not yet in their records (the
    # worker's `held`): a few times what the calls in flight carry (batch_size x
    # calls_in_flight per provider). Each one held costs about 2.5 KB; more only moves the
    # backlog from the topic into memory.
    max_pending: int = Field(default=5000, ge=1)
    # How long a send claim is remembered in Redis.
    claim_ttl_seconds: int = Field(default=30 * 24 * 3600, ge=60)
    # Consuming: records per poll of the batch consumer (one changelog record per dossier
    # changed per poll), and how long a poll waits for records when there are none. The wait
    # is also the Kafka fetch wait, which Tansu always sits out: it bounds the added latency.
    max_batch: int = Field(default=2000, ge=1)
    poll_seconds: float = Field(default=0.05, gt=0, le=1.5)
    # Decoded records of the dossiers seen lately, kept beside their changelog bytes (an LRU).
    record_cache_size: int = Field(default=4000, ge=0)
    timer_seconds: float = Field(default=1.0, gt=0)
    # On restore, `sms.events` is read this far back for the outcomes of the messages still
    # pending in the records (`announced.py`): a worker killed after announcing a message but
    # before its record learnt it. It must cover the consumer's session timeout
    # (`MOTCUA_CONSUMER_SESSION_TIMEOUT_SECONDS`, 10 s) a few times over (the rebalance that
    # hands the partitions on), the longest a poll takes to be handled (the settle news waits
    # behind it), and the restore itself.
    restore_lookback_seconds: float = Field(default=120.0, ge=0)
    rescan_seconds: float = Field(default=30.0, gt=0)
    # Retirement (`record.retire_at`): a record whose story is over leaves memory and the
    # changelog once both graces passed. By event time since the latest event that changed
    # it, 21 days: the news that still follows a settled dossier (the result's journey back by
    # post, whose legs postal gives up on after 7 days without news each; a late payment
    # success; an overdue detected just before the resolution). By the worker's clock since its
    # last change, an hour: a redelivery of what was just read, and replays, whose event times
    # are long past; 3 days while a message still awaits its final delivery report (carriers
    # give up on a message after 48 to 72 hours). The send claims (30 days) must outlive the
    # event-time grace: they are what stops a second send once the record has left.
    retire_after_seconds: float = Field(default=DEFAULT_RETIREMENT.after.total_seconds(), ge=0)
    retire_idle_seconds: float = Field(default=DEFAULT_RETIREMENT.idle.total_seconds(), ge=0)
    retire_report_wait_seconds: float = Field(
        default=DEFAULT_RETIREMENT.report_wait.total_seconds(), ge=0
    )
    # Numbers that asked not to get SMS (any format; kept as E.164).
    opt_out: Annotated[frozenset[str], NoDecode] = frozenset()

    @field_validator("opt_out", mode="before")
    @classmethod
    def _numbers(cls, value: object) -> object:
        raw = value.split(",") if isinstance(value, str) else value
        if not isinstance(raw, list | tuple | set | frozenset):
            return value
        out = set()
        for item in raw:
            result = normalise_phone(str(item))
            if isinstance(result, MobileNumber):
                out.add(result.e164)
        return frozenset(out)

    @field_validator("weights")
    @classmethod
    def _known_providers(cls, value: dict[str, int]) -> dict[str, int]:
        if not value or set(value) - {"primary", "secondary"}:
            raise ValueError("weights name the providers primary and secondary")
        return value

    @model_validator(mode="after")
    def _claims_outlive_records(self) -> SmsSettings:
        if self.claim_ttl_seconds <= self.retire_after_seconds:
            raise ValueError("SMS_CLAIM_TTL_SECONDS must exceed SMS_RETIRE_AFTER_SECONDS")
        return self

    @property
    def retirement(self) -> Retirement:
        return Retirement(
            after=timedelta(seconds=self.retire_after_seconds),
            idle=timedelta(seconds=self.retire_idle_seconds),
            report_wait=timedelta(seconds=self.retire_report_wait_seconds),
        )

    @property
    def policy(self) -> SmsPolicy:
        return SmsPolicy(
            overdue_grace=timedelta(seconds=self.overdue_grace_seconds),
            contact_wait=timedelta(seconds=self.contact_wait_seconds),
        )

    @property
    def quiet_hours(self) -> QuietHours:
        return QuietHours(start=self.quiet_start, end=self.quiet_end)


PROVIDERS = ("primary", "secondary")
