"""What `payments.callbacks` carries: every input that moves a payment besides its order.

Internal JSON, keyed by dossier id (so a dossier's callbacks share the partition number of its
`dossier.submitted`), written by the webhook (a verified gateway notification), and by the sweeper
(a query's answer, an expiry, a confirmed refund, a request to finish an outbox, a record due to
retire). Pure.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal, Self

from pydantic import AwareDatetime, BaseModel, ValidationError, model_validator

from services.common.dead_letters import PoisonMessage
from services.payments.domain import GatewayNotification

Kind = Literal[
    "notification",
    "expire",
    "refund_confirmed",
    "flush",
    "retire",
    "refund_asked",  # finance asked for a refund (`ref` its id, `amount_vnd` None: all left)
    "refund_refused",  # the gateway refused the refund `ref`
]
Via = Literal["ipn", "query", "timer", "operator"]


class CallbackMessage(BaseModel):
    """One input for one dossier's payment; `notification` is present exactly on notifications."""

    kind: Kind
    dossier_id: str
    at: AwareDatetime
    ref: str
    via: Via = "ipn"
    notification: GatewayNotification | None = None
    amount_vnd: int | None = None  # of a refund
    reason: str | None = None  # why a refund was asked for (a code) or refused

    @model_validator(mode="after")
    def _notification_on_notifications(self) -> Self:
        if (self.kind == "notification") != (self.notification is not None):
            raise ValueError("a notification message carries a notification, and only it")
        return self

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


def decode_callback(raw: bytes) -> CallbackMessage:
    """The message of a `payments.callbacks` record; `PoisonMessage` for anything else."""
    try:
        return CallbackMessage.model_validate_json(raw)
    except ValidationError as exc:
        raise PoisonMessage(f"not a callback message: {exc.error_count()} errors") from None


def notification_message(
    note: GatewayNotification, dossier_id: str, at: datetime, via: Via
) -> CallbackMessage:
    """A gateway's word on a dossier's order, told by its IPN or a query."""
    return CallbackMessage(
        kind="notification",
        dossier_id=dossier_id,
        at=at,
        ref=note.event_ref,
        via=via,
        notification=note,
    )
