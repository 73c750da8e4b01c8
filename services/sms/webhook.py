"""The SMS gateways' delivery reports, `POST /v1/webhooks/sms/{provider}` (CONTRACT section 6),
as partners of the one webhook door (`services.common.webhooks.WebhookIntake`).

Each provider (`primary`, `secondary`) signs its reports with `X-Motcua-Signature`; a report is
claimed once by its `event_id`, written to `sms.callbacks` as a `report` callback keyed by its
dossier, and applied by the worker holding that dossier. The reply is `json_reply`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from services.common.webhooks import Callback, InboundCall, Rejected, SignedBodyVerifier
from services.sms.delivery import UnknownProviderStatusError, map_provider_status
from services.sms.inbox import DeliveryReport, report_body


class DeliveryReports:
    """One provider's delivery reports: verified on the raw body, then validated."""

    body_schema: Mapping[str, Any] = DeliveryReport.model_json_schema()

    def __init__(self, name: str, verifier: SignedBodyVerifier) -> None:
        self.name = name
        self._verifier = verifier

    def verify(self, call: InboundCall) -> None:
        self._verifier(call)

    def parse(self, call: InboundCall) -> Callback:
        try:
            report = DeliveryReport.model_validate_json(call.body)
            map_provider_status(report.status)
        except (ValidationError, UnknownProviderStatusError) as exc:
            raise Rejected("malformed", detail=str(exc)[:500]) from None
        return Callback(
            event_id=report.event_id,
            key=report.dossier_id.encode(),
            value=report_body(self.name, report),
            parsed=report,
        )


def delivery_report_partners(
    providers: tuple[str, ...], secrets: list[str], tolerance_seconds: int
) -> dict[str, DeliveryReports]:
    """The webhook's partners by path parameter, all signing with any of `secrets`."""
    verifier = SignedBodyVerifier(secrets, tolerance_seconds)
    return {name: DeliveryReports(name, verifier) for name in providers}
