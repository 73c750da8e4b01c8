"""The audit trail (CONTRACT section 8): one `audit.<action>` event per operator action that
changes something, on topic `audit.events`.

`audit_event` is pure: the event for an operator, an action, a target and an outcome, with an id
derived from them and the request's id, so a retried request records the same event again (same
id), which readers count once (`motcua audit` does). The event holds the token's `sub` and roles,
the target (a dossier id, a topic, a portal) and the outcome, never personal data.
`AuditRecorder` publishes it through the service's `DurablePublisher` (acks=all) and returns
once the broker acknowledged it. A `motcua` command that changes something records the same event
through the same recorder (`services.common.command_audit`), as `command_operator()`.
"""

from __future__ import annotations

import contextlib
import getpass
import hashlib
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

import orjson
import structlog

from services.common.events import (
    AuditAction,
    AuditOutcome,
    CloudEvent,
    audit_type,
    make_event,
)
from services.common.operators import Operator

# structlog itself: `services.common.logging` brings tracing (and httpx) into this pure module
log = structlog.get_logger("motcua.audit")


def audit_event_id(
    operator: Operator,
    action: AuditAction,
    target: str,
    outcome: AuditOutcome,
    request_id: str,
) -> str:
    """The event id: a digest of who did what to which target, how it ended, in which request."""
    parts = [operator.sub, action.value, target, outcome, request_id]
    return "audit-" + hashlib.sha256(orjson.dumps(parts)).hexdigest()[:32]


def audit_event(
    operator: Operator,
    action: AuditAction,
    target: str,
    outcome: AuditOutcome,
    *,
    request_id: str,
    at: datetime,
    source: str,
) -> CloudEvent[Any]:
    """The validated `audit.<action>` event; `subject` (and the Kafka key) is the target."""
    roles = sorted(operator.roles, key=lambda role: role.rank)
    return make_event(
        audit_type(action),
        source=source,
        id=audit_event_id(operator, action, target, outcome, request_id),
        subject=target,
        time=at,
        data={
            "actor": operator.sub,
            "roles": [role.value for role in roles],
            "action": action.value,
            "target": target,
            "outcome": outcome,
            "at": at.isoformat(),
        },
    )


class Publisher(Protocol):
    """What the recorder publishes through: `DurablePublisher` (services/common/kafka.py)."""

    async def publish(
        self,
        messages: Sequence[tuple[str, bytes | None, bytes | None]],
        *,
        headers: Mapping[str, bytes] | None = None,
    ) -> object: ...


def command_operator(user: str | None = None) -> Operator:
    """Who runs a `motcua` command that changes something: `cli/<OS user>` with no role. No token
    was verified (the shell's access to the cluster let them run it), so the event claims none:
    `roles` is the list of a token's roles, and an empty one reads "not signed in". A process
    whose user has no name (a container's bare uid) is `cli/uid-<uid>`."""
    if user is None:
        try:
            user = getpass.getuser()
        except (OSError, KeyError):
            user = f"uid-{os.getuid()}"
    return Operator(sub=f"cli/{user}", roles=frozenset())


def utc_now() -> datetime:
    return datetime.now(UTC)


class AuditRecorder:
    """Records operator actions of one service (`source`, e.g. `motcua/payments`)."""

    def __init__(
        self,
        publisher: Publisher,
        source: str,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self._publisher = publisher
        self._source = source
        self._clock = clock

    async def record(
        self,
        operator: Operator,
        action: AuditAction,
        target: str,
        outcome: AuditOutcome,
        *,
        request_id: str,
    ) -> CloudEvent[Any]:
        """Publish the action's audit event; return it once the broker acked it. Raises
        `BrokerUnavailable` when it did not."""
        event = audit_event(
            operator,
            action,
            target,
            outcome,
            request_id=request_id,
            at=self._clock(),
            source=self._source,
        )
        await self._publisher.publish([(event.topic, event.key, event.to_json())])
        return event

    async def audited(
        self,
        operator: Operator,
        action: AuditAction,
        target: str,
        write: Callable[[], Awaitable[object]],
        *,
        request_id: str,
        errors: tuple[type[BaseException], ...],
    ) -> None:
        """Run `write` (the change itself) and record its audit event. When `write` raises one
        of `errors` (the broker away), a `failed` event is tried and the error raised again.
        A change written stands even if its audit event cannot be (a retry would do it twice):
        that is logged instead."""
        try:
            await write()
        except errors:
            with contextlib.suppress(*errors):
                await self.record(operator, action, target, "failed", request_id=request_id)
            raise
        try:
            await self.record(operator, action, target, "succeeded", request_id=request_id)
        except errors as exc:
            log.warning(
                "audit_not_recorded",
                action=action.value,
                target=target,
                error_type=type(exc).__name__,
            )
