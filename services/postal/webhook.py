"""The carriers' status webhook (CONTRACT section 6), `POST /v1/webhooks/postal/{carrier}`.

Each carrier is a partner of the one webhook door (`services.common.webhooks.WebhookIntake`): its
callback is verified on the raw bytes (`X-Motcua-Signature`), parsed into the core's
`CarrierCallback`, claimed once by its dedupe id (carrier, order, status code, carrier time),
written to `postal.callbacks` keyed by dossier id (acks=all) and only then answered with
`json_reply`. The consumer (`worker.py`) applies it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from services.common import topics
from services.common.claims import Claims
from services.common.coordination import Keys
from services.common.kafka import DurablePublisher
from services.common.settings import Settings
from services.common.webhooks import (
    Callback,
    InboundCall,
    Rejected,
    SignedBodyVerifier,
    WebhookIntake,
    json_reply,
)
from services.postal.callback_bodies import (
    MalformedCallback,
    VNPostCallbackBody,
    callback_dedupe_id,
    parse_callback,
)
from services.postal.messages import encode_callback


class CarrierWebhook:
    """A carrier as a webhook partner: its verifier, and its status callback body parsed."""

    def __init__(
        self,
        name: str,
        verify: Callable[[InboundCall], None],
        body_schema: Mapping[str, Any] | None = None,
    ) -> None:
        self.name = name
        self._verify = verify
        self.body_schema = body_schema  # its callback body's JSON Schema, for the OpenAPI document

    def verify(self, call: InboundCall) -> None:
        self._verify(call)

    def parse(self, call: InboundCall) -> Callback:
        try:
            callback = parse_callback(self.name, call.body)
        except MalformedCallback as exc:
            raise Rejected(str(exc)) from None
        return Callback(
            event_id=callback_dedupe_id(callback),
            key=callback.dossier_id.encode(),
            value=encode_callback(callback),
            parsed=callback,
        )


def carrier_webhooks(
    settings: Settings, claims: Claims, keys: Keys, publisher: DurablePublisher
) -> WebhookIntake:
    """The door for every carrier (`vnpost`), by the path parameter `carrier`; a callback is
    claimed by its dedupe id, which names the carrier already."""
    vnpost = CarrierWebhook(
        "vnpost",
        SignedBodyVerifier(settings.vnpost_secrets, settings.webhook_tolerance_seconds),
        VNPostCallbackBody.model_json_schema(),
    )
    return WebhookIntake(
        "postal",
        {vnpost.name: vnpost},
        path_param="carrier",
        topic=topics.POSTAL_CALLBACKS,
        claims=claims,
        claim_key=lambda carrier, event_id: keys("postal", "cb", event_id),
        publisher=publisher,
        reply=json_reply,
    )
