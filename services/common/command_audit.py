"""The audit of `motcua` commands that change something (CONTRACT section 8): `motcua dlq-replay`,
`motcua reconcile` and `motcua reconcile-cod` record the `audit.<action>` event their HTTP admin
endpoint records, through the same `AuditRecorder`, with a publisher of the command's own (acks=all,
closed afterwards).

The actor is `cli/<OS user>` with no role (`audit.command_operator`), the source `motcua/cli`, the
target and the outcome those of the HTTP endpoint (a topic, `<gateway>/<day>`; `succeeded` or
`failed`). Each run is its own action (a replay copies what is left, a reconciliation rewrites its
report): its request id is new, so two runs are two events. What is refused before anything runs
(a malformed date, an unknown gateway, a dry run) is no action and records nothing.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from services.common.audit import AuditRecorder, command_operator
from services.common.consumer import INFRASTRUCTURE_ERRORS
from services.common.events import AuditAction, AuditOutcome, CloudEvent
from services.common.kafka import DurablePublisher

CLI_SOURCE = "motcua/cli"

T = TypeVar("T")


class AuditNotRecorded(Exception):
    """The command's change is done (`result`) but the broker did not acknowledge its audit
    event."""

    def __init__(self, result: Any, reason: str) -> None:
        super().__init__(reason)
        self.result = result


async def record_command(
    bootstrap: str, action: AuditAction, target: str, outcome: AuditOutcome
) -> CloudEvent[Any]:
    """Publish the command's audit event on `audit.events`; return it once the broker acked it.
    Raises one of `INFRASTRUCTURE_ERRORS` when it did not."""
    publisher = DurablePublisher(bootstrap)
    try:
        recorder = AuditRecorder(publisher, CLI_SOURCE)
        return await recorder.record(
            command_operator(), action, target, outcome, request_id=uuid.uuid4().hex
        )
    finally:
        await publisher.close()


async def audited_command(
    bootstrap: str,
    action: AuditAction,
    target: Callable[[T | None], str],
    run: Callable[[], Awaitable[T]],
) -> T:
    """Run the command's change and record it: `failed` (tried; the broker may be what failed)
    when `run` raises, and the error raised again; `succeeded` when it returned, else
    `AuditNotRecorded`. `target` names the target from the run's result (None when it failed)."""
    try:
        result = await run()
    except Exception:
        with contextlib.suppress(*INFRASTRUCTURE_ERRORS):
            await record_command(bootstrap, action, target(None), "failed")
        raise
    try:
        await record_command(bootstrap, action, target(result), "succeeded")
    except INFRASTRUCTURE_ERRORS as exc:
        raise AuditNotRecorded(result, type(exc).__name__) from exc
    return result
