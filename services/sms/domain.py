"""The pure core of the SMS service, in one import: what to send, to whom, when, and how.

No I/O anywhere below. The parts: `templates` (data file and rendering), `decisions` (per-dossier
state, `apply`, `tick`, opt-outs), `quiet` (quiet hours), `delivery` (report statuses and their
moves), `providers` (weights, failover). Rate limiting is `services.common.coordination.TokenBucket`
(Redis, shared by every worker); text rules are in `text`, numbers in `phones`.
"""

from __future__ import annotations

from services.sms.decisions import (
    DEFAULT_POLICY,
    NO_CONTACT,
    OPTED_OUT,
    POSTAL_RETURN_MODES,
    Contact,
    Decision,
    DossierState,
    Event,
    InvalidEventError,
    PendingOverdue,
    SendSms,
    SmsIntent,
    SmsPolicy,
    SuppressSms,
    apply,
    apply_opt_outs,
    event_from_envelope,
    idempotency_key,
    next_wakeup,
    render_intent,
    tick,
)
from services.sms.delivery import (
    FINAL_STATUSES,
    PROVIDER_STATUSES,
    DeliveryStatus,
    UnknownProviderStatusError,
    map_provider_status,
    next_delivery_state,
    sms_event_type,
)
from services.sms.providers import (
    ProviderWeights,
    failover_order,
    pick_provider,
    shift_weight_away,
)
from services.sms.quiet import (
    DEFAULT_QUIET_HOURS,
    QuietHours,
    earliest_send_time,
)
from services.sms.templates import (
    TEMPLATE_FIELDS,
    MissingFieldError,
    RenderedSms,
    Template,
    TemplateError,
    load_templates,
    parse_templates,
    placeholders,
    render,
)

__all__ = [
    "DEFAULT_POLICY",
    "DEFAULT_QUIET_HOURS",
    "FINAL_STATUSES",
    "NO_CONTACT",
    "OPTED_OUT",
    "POSTAL_RETURN_MODES",
    "PROVIDER_STATUSES",
    "TEMPLATE_FIELDS",
    "Contact",
    "Decision",
    "DeliveryStatus",
    "DossierState",
    "Event",
    "InvalidEventError",
    "MissingFieldError",
    "PendingOverdue",
    "ProviderWeights",
    "QuietHours",
    "RenderedSms",
    "SendSms",
    "SmsIntent",
    "SmsPolicy",
    "SuppressSms",
    "Template",
    "TemplateError",
    "UnknownProviderStatusError",
    "apply",
    "apply_opt_outs",
    "earliest_send_time",
    "event_from_envelope",
    "failover_order",
    "idempotency_key",
    "load_templates",
    "map_provider_status",
    "next_delivery_state",
    "next_wakeup",
    "parse_templates",
    "pick_provider",
    "placeholders",
    "render",
    "render_intent",
    "shift_weight_away",
    "sms_event_type",
    "tick",
]
