"""What became of the messages the records still hold pending, as `sms.events` already told it.

A message's record learns that it was sent through the sender's `settle` callback, which is
written after `sms.sent` (or `sms.failed`) is published and folded into the record a poll later.
A worker killed in between leaves the message pending in its record; the Redis claim saying it
went (`s:<provider>`) may be gone too. So on every restore the worker reads its own output topic
for the assigned partitions from a while back (`SMS_RESTORE_LOOKBACK_SECONDS`; `sms.events` is
keyed by dossier id like the inputs, so partition p holds the events of the dossiers restored
from partition p) and settles each pending message whose outcome is there, without sending it
or announcing it again.

`send_outcomes` (pure) picks the outcomes out of the records read; `read_send_outcomes` reads
them.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Container, Iterable
from dataclasses import dataclass

import orjson

from services.common import topics
from services.common.changelog import read_to_end
from services.sms.delivery import DeliveryStatus


@dataclass(frozen=True)
class SendOutcome:
    """A message's `sms.sent` or `sms.failed` (of the send stage), as published."""

    key: str  # the message's idempotency key
    provider: str | None
    status: DeliveryStatus  # SENT or PERMANENT_FAILURE
    reason: str  # why it failed ("" when sent)


def send_outcome(raw: bytes) -> SendOutcome | None:
    """The send outcome an `sms.events` record announces; None for any other event (queued,
    suppressed, a delivery report, a message that could not be rendered) or an unreadable one."""
    try:
        event = orjson.loads(raw)
        kind = event["type"]
        data = event["data"]
        key = str(data["key"])
    except (orjson.JSONDecodeError, KeyError, TypeError):
        return None
    provider = data.get("provider")
    if kind == "sms.sent":
        return SendOutcome(key, provider, DeliveryStatus.SENT, "")
    if kind == "sms.failed" and data.get("stage") == "send":
        reason = str(data.get("reason") or "send_failed")
        return SendOutcome(key, provider, DeliveryStatus.PERMANENT_FAILURE, reason)
    return None


def send_outcomes(
    records: Iterable[tuple[bytes | None, bytes | None]],
    keys: Container[str],
    dossiers: Container[bytes],
) -> dict[str, SendOutcome]:
    """The outcomes announced for the messages `keys`, from `sms.events` records (key, value);
    only the records keyed by one of `dossiers` (those messages' dossier ids) are decoded."""
    found: dict[str, SendOutcome] = {}
    for record_key, value in records:
        if not value or record_key not in dossiers:
            continue
        outcome = send_outcome(value)
        if outcome is not None and outcome.key in keys:
            found.setdefault(outcome.key, outcome)  # the first one told is the one that counts
    return found


@dataclass(frozen=True)
class Reading:
    """What a restore's read of `sms.events` found, and what it cost."""

    outcomes: dict[str, SendOutcome]
    records: int  # `sms.events` records read
    seconds: float


async def read_send_outcomes(
    bootstrap: str,
    partitions: Collection[int],
    since_ms: int,
    keys: Collection[str],
    dossiers: Collection[str],
) -> Reading:
    """The outcomes announced on `sms.events` (`partitions`, written at or after `since_ms`)
    for the messages `keys` of the dossiers `dossiers`."""
    started = time.perf_counter()
    found: dict[str, SendOutcome] = {}
    read = 0
    if keys and partitions:
        wanted = {dossier.encode() for dossier in dossiers}
        async for batch in read_to_end(bootstrap, topics.SMS_EVENTS, partitions, since_ms=since_ms):
            for records in batch.values():
                read += len(records)
                for key, outcome in send_outcomes(
                    ((r.key, r.value) for r in records), keys, wanted
                ).items():
                    found.setdefault(key, outcome)
    return Reading(found, read, time.perf_counter() - started)
