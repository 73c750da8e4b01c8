"""The event contract in code: the CloudEvents envelope and one model per event type.

Parsing is strict where the contract is (required fields, enums, timestamps with an offset,
non-negative integer money, `subject` equal to `data.dossier_id`) and lenient where it promises
room to grow: unknown optional fields are kept, so a newer producer never breaks an older consumer.
Every known field is bounded (the limits below, listed in docs/services.md "Intake"): ids and codes
are never blank, never hold control characters and have a maximum length, free text and addresses
have a maximum length, money a maximum amount, so every service reads what another accepted.
What depends on the clock (how far in the past or future a timestamp may lie) is intake's rule
(`services.intake.domain`), not the model's: a replay of old events stays valid.
The personal fields of `dossier.submitted` (CONTRACT section 10) are clear when a portal posts
them and sealed (`services.common.sealing`) on every topic: their models and the JSON Schema
take either form (`or_sealed`).
Audit events (`audit.<action>`, CONTRACT section 8) are the exception: their `data` has exactly
the contract's fields, so no personal data can ride along, and their `subject` is `data.target`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Generic, Literal, TypeVar

import orjson
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
)
from pydantic_core import PydanticCustomError

from services.common import topics
from services.common.operators import Role
from services.common.sealing import SEALED_MAX, SEALED_PREFIX

# --- Limits of the known fields ----------------------------------------------------------------
CODE_MAX = 128  # a dossier id, agency or procedure code, receipt number, sector
ENVELOPE_ID_MAX = 256  # an event's `id`, `source`, `subject` (services derive ids from dossier ids)
NAME_MAX = 256  # applicant.name
PHONE_MAX = 32  # applicant.phone, in any written form
EMAIL_MAX = 254  # applicant.email (RFC 5321's path limit)
REASON_MAX = 2000  # free text typed by an officer: `reason`
ADDRESS_TEXT_MAX = 500  # an address given as one string
ADDRESS_JSON_MAX = 2000  # an address given as an object: its JSON, in bytes
MONEY_MAX = 1_000_000_000_000  # VND: far above any fee, and sums of a million stay in int64

# Characters an id never holds: C0 and C1 controls, DEL, the Unicode line and paragraph
# separators. Free text may hold tabs and line breaks, none of the others.
_ID_CONTROLS = "\\x00-\\x1f\\x7f-\\x9f\\u2028\\u2029"
_TEXT_CONTROLS = "\\x00-\\x08\\x0b\\x0c\\x0e-\\x1f\\x7f-\\x9f"
# As patterns (checked in pydantic's Rust core, and stated in the JSON Schema): no control
# character, and at least one character that is not whitespace.
ID_PATTERN = f"^[^{_ID_CONTROLS}]*[^\\s{_ID_CONTROLS}][^{_ID_CONTROLS}]*$"
TEXT_PATTERN = f"^[^{_TEXT_CONTROLS}]*[^\\s{_TEXT_CONTROLS}][^{_TEXT_CONTROLS}]*$"
CONTACT_PATTERN = f"^[^{_ID_CONTROLS}]*$"
_ID_CONTROL = re.compile(f"[{_ID_CONTROLS}]")
_TEXT_CONTROL = re.compile(f"[{_TEXT_CONTROLS}]")
_CONTROLS_OF = {ID_PATTERN: _ID_CONTROL, TEXT_PATTERN: _TEXT_CONTROL, CONTACT_PATTERN: _ID_CONTROL}


def _pattern_detail(pattern: str, value: object) -> str | None:
    """What is wrong with `value` under one of the patterns above (None for another pattern)."""
    controls = _CONTROLS_OF.get(pattern)
    if controls is None or not isinstance(value, str):
        return None
    found = controls.search(value)
    if found is not None:
        return (
            f"must not contain control characters (U+{ord(found.group()):04X} at position "
            f"{found.start()})"
        )
    return "must not be blank"


def _no_controls(value: str, controls: re.Pattern[str]) -> str:
    found = controls.search(value)
    if found is not None:
        raise PydanticCustomError(
            "control_character",
            "must not contain control characters (U+{code} at position {position})",
            {"code": f"{ord(found.group()):04X}", "position": found.start()},
        )
    return value


_SEALED_VALUE = re.compile(f"^{re.escape(SEALED_PREFIX)}[A-Za-z0-9_-]+$")


def _or_sealed(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    """A personal field's value sealed with its dossier's key (`services.common.sealing`), as
    every `dossier.submitted` on `dossier.events` carries it; anything else is validated as the
    clear value a portal posts (CONTRACT sections 2 and 10)."""
    if isinstance(value, str) and value.startswith(SEALED_PREFIX):
        if len(value) > SEALED_MAX or not _SEALED_VALUE.match(value):
            raise PydanticCustomError(
                "sealed_value",
                "a sealed value is `{prefix}` and base64url, at most {limit} characters",
                {"prefix": SEALED_PREFIX, "limit": SEALED_MAX},
            )
        return value
    return handler(value)


# A sealed personal value, as the JSON Schema states it beside the clear form.
Sealed = Annotated[str, StringConstraints(pattern=_SEALED_VALUE.pattern, max_length=SEALED_MAX)]


def or_sealed(clear: Any) -> WrapValidator:
    """A personal field (CONTRACT section 10): clear from a portal, sealed on the topics; its
    JSON Schema is either form."""
    return WrapValidator(_or_sealed, json_schema_input_type=clear | Sealed)


def _address(value: dict[str, Any] | str | None) -> dict[str, Any] | str | None:
    if isinstance(value, str):
        if len(value) > ADDRESS_TEXT_MAX:
            raise PydanticCustomError(
                "address_too_long",
                "an address as text has at most {limit} characters",
                {"limit": ADDRESS_TEXT_MAX},
            )
        return _no_controls(value, _TEXT_CONTROL)
    if value is not None and len(orjson.dumps(value)) > ADDRESS_JSON_MAX:
        raise PydanticCustomError(
            "address_too_long",
            "an address as an object has at most {limit} bytes of JSON",
            {"limit": ADDRESS_JSON_MAX},
        )
    return value


Money = Annotated[
    StrictInt,
    Field(ge=0, le=MONEY_MAX, description="An integer amount of VND, never negative."),
]
NonEmpty = Annotated[str, Field(min_length=1)]
# Ids and codes: 1..CODE_MAX characters, not blank, no control characters.
Code = Annotated[str, StringConstraints(min_length=1, max_length=CODE_MAX, pattern=ID_PATTERN)]
EnvelopeId = Annotated[
    str, StringConstraints(min_length=1, max_length=ENVELOPE_ID_MAX, pattern=ID_PATTERN)
]
Name = Annotated[str, StringConstraints(min_length=1, max_length=NAME_MAX, pattern=TEXT_PATTERN)]
Reason = Annotated[
    str, StringConstraints(min_length=1, max_length=REASON_MAX, pattern=TEXT_PATTERN)
]
Phone = Annotated[str, StringConstraints(max_length=PHONE_MAX, pattern=CONTACT_PATTERN)]
Email = Annotated[str, StringConstraints(max_length=EMAIL_MAX, pattern=CONTACT_PATTERN)]
# Free-form (CONTRACT section 2): an object (postal reads province, district, commune, street) or
# one string; bounded either way.
Address = Annotated[
    dict[str, Any] | str | None,
    AfterValidator(_address),
    Field(
        description=f"An object (province, district, commune, street) of at most "
        f"{ADDRESS_JSON_MAX} bytes as JSON, or one string of at most {ADDRESS_TEXT_MAX} "
        "characters."
    ),
]
Tier = Literal["province", "district", "commune", "vertical"]
Channel = Literal["online", "counter", "postal"]
FeeMethod = Literal["online", "counter", "postal_cod", "none"]
PostalMode = Literal["none", "pickup", "return", "pickup_and_return"]


class Data(BaseModel):
    """Base of every `data` payload: unknown fields are kept, known ones validated. The
    envelope's `subject` equals the field `SUBJECT_FIELD` names."""

    model_config = ConfigDict(extra="allow", frozen=True)
    SUBJECT_FIELD: ClassVar[str] = "dossier_id"


class DossierData(Data):
    dossier_id: Code
    agency_code: Code


class Applicant(Data):
    name: Annotated[Name, or_sealed(Name)]
    phone: Annotated[Phone | None, or_sealed(Phone | None)] = None
    email: Annotated[Email | None, or_sealed(Email | None)] = None
    address: Annotated[Address, or_sealed(Address)] = None


class Fee(Data):
    amount_vnd: Money
    method: FeeMethod


class Postal(Data):
    mode: PostalMode
    address: Annotated[Address, or_sealed(Address)] = None


class DossierSubmitted(DossierData):
    procedure_code: Code
    tier: Tier
    sector: Code
    channel: Channel
    online_level: Literal[3, 4] | None
    applicant: Applicant
    fee: Fee
    postal: Postal
    submitted_at: AwareDatetime


class DossierReceived(DossierData):
    received_at: AwareDatetime
    due_at: AwareDatetime
    receipt_no: Code


class DossierRejected(DossierData):
    reason: Reason


class DossierSupplementRequested(DossierData):
    reason: Reason
    requested_at: AwareDatetime


class DossierSupplementReceived(DossierData):
    received_at: AwareDatetime
    new_due_at: AwareDatetime | None = None


class DossierTransferred(DossierData):
    to_agency_code: Code


class DossierResolved(DossierData):
    resolved_at: AwareDatetime
    outcome: Literal["approved", "denied"]


class DossierApologyIssued(DossierData):
    reason: Reason
    new_due_at: AwareDatetime


class DossierResultReturned(DossierData):
    returned_at: AwareDatetime
    via: Literal["counter", "postal", "online"]


class DossierWithdrawn(DossierData):
    withdrawn_at: AwareDatetime


class DossierOverdue(DossierData):
    due_at: AwareDatetime
    detected_at: AwareDatetime


class OutcomeData(Data):
    """`data` of payment, postal and sms events: the dossier, and why when something failed."""

    dossier_id: NonEmpty
    reason: str | None = None


class PaymentData(OutcomeData):
    amount_vnd: Money | None = None


class PostalData(OutcomeData):
    carrier: str | None = None
    order_id: str | None = None
    amount_vnd: Money | None = None


class SmsData(OutcomeData):
    template: str | None = None
    segments: StrictInt | None = Field(default=None, ge=0)
    provider: str | None = None


# A failure always says why: these redeclare `reason` as required.
class PaymentFailed(PaymentData):
    reason: NonEmpty


class PaymentMismatch(PaymentData):
    reason: NonEmpty


class PostalFailed(PostalData):
    reason: NonEmpty


class SmsFailed(SmsData):
    reason: NonEmpty


class SmsSuppressed(SmsData):
    reason: NonEmpty


# The satisfaction survey's answer: a score from 1 (very dissatisfied) to 5 (very satisfied).
Score = Annotated[StrictInt, Field(ge=1, le=5)]
SURVEY_COMMENT_MAX = 500  # characters of the optional comment, before it is sealed


class SurveyAnswered(Data):
    """`survey.answered` on `survey.events` (keyed by dossier id): a citizen's answer to the
    satisfaction survey of a dossier (services/intake/survey.py). One answer counts per dossier:
    a later one replaces it and says which (`previous_score`, `previous_answered_at`: null for
    the first), so a consumer moves the dossier's vote instead of counting a second one. The
    comment is free text that may hold personal data: it is only ever sealed with the dossier's
    data key (CONTRACT section 10), a clear one is refused."""

    dossier_id: Code
    agency_code: Code
    score: Score
    answered_at: AwareDatetime
    previous_score: Score | None = None
    previous_answered_at: AwareDatetime | None = None
    comment: Sealed | None = None


class AuditAction(StrEnum):
    """The operator actions that change something (CONTRACT section 8): `audit.<action>`."""

    REFUND = "refund"
    DEAD_LETTER_REPLAY = "dead_letter_replay"
    RECONCILIATION_RUN = "reconciliation_run"
    PORTAL_KEY_ADD = "portal_key_add"
    PORTAL_KEY_ROTATE = "portal_key_rotate"
    PORTAL_KEY_REVOKE = "portal_key_revoke"
    SUBSCRIPTION_CHANGE = "subscription_change"
    PERSONAL_DATA_ERASED = "personal_data_erased"


AuditOutcome = Literal["succeeded", "failed", "denied"]


class AuditData(Data):
    """`data` of an `audit.<action>` event: who (token `sub` and roles) did what to which target
    (a dossier id, a topic, a portal), how it ended, and when. Exactly these fields: an audit
    event never carries personal data, so no other field is accepted. `subject` is the target."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    SUBJECT_FIELD: ClassVar[str] = "target"

    actor: NonEmpty
    roles: list[Role]
    action: AuditAction
    target: NonEmpty
    outcome: AuditOutcome
    at: AwareDatetime


def audit_type(action: AuditAction) -> str:
    return f"audit.{action.value}"


DATA_MODELS: dict[str, type[Data]] = {
    "dossier.submitted": DossierSubmitted,
    "dossier.received": DossierReceived,
    "dossier.rejected": DossierRejected,
    "dossier.supplement_requested": DossierSupplementRequested,
    "dossier.supplement_received": DossierSupplementReceived,
    "dossier.transferred": DossierTransferred,
    "dossier.resolved": DossierResolved,
    "dossier.apology_issued": DossierApologyIssued,
    "dossier.result_returned": DossierResultReturned,
    "dossier.withdrawn": DossierWithdrawn,
    "dossier.overdue": DossierOverdue,
    "payment.requested": PaymentData,
    "payment.succeeded": PaymentData,
    "payment.failed": PaymentFailed,
    "payment.expired": PaymentData,
    "payment.refunded": PaymentData,
    "payment.refund_required": PaymentData,
    "payment.refund_requested": PaymentData,
    "payment.refund_failed": PaymentFailed,
    "payment.receipt_issued": PaymentData,
    "payment.callback_rejected": PaymentMismatch,
    "payment.reconciliation_mismatch": PaymentMismatch,
    "postal.pickup_requested": PostalData,
    "postal.picked_up": PostalData,
    "postal.delivered_to_agency": PostalData,
    "postal.return_requested": PostalData,
    "postal.out_for_delivery": PostalData,
    "postal.delivered": PostalData,
    "postal.failed": PostalFailed,
    "postal.returned_to_agency": PostalData,
    "postal.cod_collected": PostalData,
    "postal.cod_mismatch": PostalFailed,
    "sms.queued": SmsData,
    "sms.sent": SmsData,
    "sms.delivered": SmsData,
    "sms.failed": SmsFailed,
    "sms.suppressed": SmsSuppressed,
    "survey.answered": SurveyAnswered,
    **{audit_type(action): AuditData for action in AuditAction},
}

DataT = TypeVar("DataT", bound=Data)

# The CloudEvents distributed-tracing extension attributes: the W3C trace context of the event's
# creation. They say where an event was traced, not what it says: two events differing only in
# them are the same event (`content_of`).
TRACE_ATTRIBUTES = ("traceparent", "tracestate")


_TRACEPARENT_KEY = b'"traceparent":"'
_TRACEPARENT_LENGTH = 55  # 00-<32 hex>-<16 hex>-<2 hex>


def is_sampled(traceparent: str) -> bool:
    """A well-formed `traceparent` whose sampled flag is set (checked without parsing it all)."""
    return (
        len(traceparent) == _TRACEPARENT_LENGTH
        and traceparent[2] == "-"
        and traceparent[-3] == "-"
        and traceparent[-1] in "13579bdf"
    )


def traceparent_in(raw: bytes | str | None) -> str | None:
    """The `traceparent` attribute of an event in its JSON (as the services write it: no
    whitespace), found without decoding the event; None without one."""
    if not raw:
        return None
    data = raw if isinstance(raw, bytes) else raw.encode()
    start = data.find(_TRACEPARENT_KEY)
    if start < 0:
        return None
    start += len(_TRACEPARENT_KEY)
    end = start + _TRACEPARENT_LENGTH
    if data[end : end + 1] != b'"':
        return None
    try:
        return data[start:end].decode("ascii")
    except UnicodeDecodeError:
        return None


def sampled_traceparent(raw: bytes | str | None) -> dict[str, str]:
    """The `traceparent` of the event in `raw` as attributes for an event it causes, if it is
    sampled (an empty mapping otherwise: nothing downstream records for it)."""
    found = traceparent_in(raw)
    return {"traceparent": found} if found is not None and is_sampled(found) else {}


def content_of(value: dict[str, Any]) -> dict[str, Any]:
    """An envelope's JSON values without its tracing attributes (`value` itself without any)."""
    if "traceparent" not in value and "tracestate" not in value:
        return value
    return {k: v for k, v in value.items() if k not in TRACE_ATTRIBUTES}


class CloudEvent(BaseModel, Generic[DataT]):
    """A CloudEvents 1.0 envelope in structured JSON mode (CONTRACT section 1)."""

    # Extension attributes are allowed by CloudEvents and kept as they came.
    model_config = ConfigDict(extra="allow", frozen=True)

    specversion: Literal["1.0"]
    id: EnvelopeId
    source: EnvelopeId
    type: NonEmpty
    subject: EnvelopeId
    time: AwareDatetime
    datacontenttype: Literal["application/json"] = "application/json"
    data: DataT

    @property
    def topic(self) -> str:
        return topic_of(self.type)

    @property
    def key(self) -> bytes:
        """The Kafka message key: the subject (the dossier id; an audit event's target), so one
        dossier's events stay in order."""
        return self.subject.encode()

    def to_dict(self) -> dict[str, Any]:
        """The envelope as JSON values, with only the fields that were given (and nulls kept)."""
        value = self.model_dump(mode="json", exclude_unset=True)
        value.setdefault("datacontenttype", "application/json")
        return value

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


EVENT_MODELS: dict[str, type[CloudEvent[Any]]] = {
    type_: CloudEvent[model]  # type: ignore[valid-type]
    for type_, model in DATA_MODELS.items()
}


def topic_of(event_type: str) -> str:
    """The topic an event type lives on: its prefix names it (`dossier.x` → `dossier.events`)."""
    prefix = event_type.split(".", 1)[0]
    topic = topics.BY_PREFIX.get(prefix)
    if topic is None or event_type not in DATA_MODELS:
        raise UnknownEventType(event_type)
    return topic


class UnknownEventType(ValueError):
    def __init__(self, event_type: str) -> None:
        super().__init__(f"unknown event type {event_type!r}")
        self.event_type = event_type


class FieldError(BaseModel):
    """One precise complaint about an event: where (a JSON pointer) and what."""

    pointer: str
    detail: str


class InvalidEvent(ValueError):
    """Raised by `parse_event`; `errors` names every bad field by JSON pointer."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("; ".join(f"{e.pointer}: {e.detail}" for e in errors))
        self.errors = errors


def json_pointer(loc: tuple[int | str, ...]) -> str:
    """RFC 6901 pointer for a pydantic error location."""
    parts = (str(p).replace("~", "~0").replace("/", "~1") for p in loc)
    return "".join("/" + p for p in parts)


# pydantic names the failing member of a union in the location; that is no part of a JSON path.
_UNION_MEMBERS = frozenset({"str", "dict[str,any]"})


def errors_of(exc: ValidationError) -> list[FieldError]:
    """One error per bad field; the alternatives of a union are joined into one detail."""
    by_pointer: dict[str, list[str]] = {}
    for err in exc.errors():
        loc = tuple(p for p in err["loc"] if p not in _UNION_MEMBERS)
        detail = err["msg"]
        if err["type"] == "string_pattern_mismatch":
            detail = _pattern_detail(err.get("ctx", {}).get("pattern", ""), err["input"]) or detail
        by_pointer.setdefault(json_pointer(loc), []).append(detail)
    return [FieldError(pointer=p, detail=" or ".join(msgs)) for p, msgs in by_pointer.items()]


def parse_event(value: Any, *, allowed_types: frozenset[str] | None = None) -> CloudEvent[Any]:
    """Validate one envelope (already decoded from JSON) against its type's model."""
    if not isinstance(value, dict):
        raise InvalidEvent([FieldError(pointer="", detail="an event must be a JSON object")])
    event_type = value.get("type")
    if not isinstance(event_type, str) or event_type not in DATA_MODELS:
        known = sorted(allowed_types or DATA_MODELS)
        detail = (
            "missing event type"
            if event_type is None
            else f"unknown event type {event_type!r}; expected one of {', '.join(known)}"
        )
        raise InvalidEvent([FieldError(pointer="/type", detail=detail)])
    if allowed_types is not None and event_type not in allowed_types:
        raise InvalidEvent(
            [FieldError(pointer="/type", detail=f"event type {event_type!r} is not accepted here")]
        )
    try:
        event = EVENT_MODELS[event_type].model_validate(value)
    except ValidationError as exc:
        raise InvalidEvent(errors_of(exc)) from None
    field = type(event.data).SUBJECT_FIELD
    expected = getattr(event.data, field, None)
    if event.subject != expected:
        detail = f"subject {event.subject!r} must equal data.{field} {expected!r}"
        raise InvalidEvent([FieldError(pointer="/subject", detail=detail)])
    if isinstance(event.data, AuditData) and event_type != audit_type(event.data.action):
        detail = f"data.action {event.data.action.value!r} must name the type {event_type!r}"
        raise InvalidEvent([FieldError(pointer="/data/action", detail=detail)])
    return event


def decode_event(raw: bytes, *, allowed_types: frozenset[str] | None = None) -> CloudEvent[Any]:
    """Bytes off the wire to a validated event; malformed JSON is an `InvalidEvent` too."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent([FieldError(pointer="", detail=f"malformed JSON: {exc}")]) from None
    return parse_event(value, allowed_types=allowed_types)


def decode_event_of(raw: bytes, types: frozenset[str] | None) -> CloudEvent[Any] | None:
    """The validated event in `raw` if its type is one of `types` (any type when None); None for
    a JSON object of another type, which is skipped before validation (a service does not
    dead-letter what it has no business with). Raises `InvalidEvent` for what does not
    validate."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidEvent([FieldError(pointer="", detail=f"malformed JSON: {exc}")]) from None
    if types is not None and isinstance(value, dict):
        kind = value.get("type")
        if isinstance(kind, str) and kind not in types:
            return None
    event = parse_event(value)
    return event if types is None or event.type in types else None


def make_event(
    type_: str,
    *,
    source: str,
    id: str,
    subject: str,
    time: datetime,
    data: dict[str, Any],
    trace: Mapping[str, str] | None = None,
) -> CloudEvent[Any]:
    """Build and validate an event the services produce; `trace`: the tracing attributes of
    the event that caused it (`sampled_traceparent`)."""
    return parse_event(
        {
            "specversion": "1.0",
            "id": id,
            "source": source,
            "type": type_,
            "subject": subject,
            "time": time.isoformat(),
            "datacontenttype": "application/json",
            "data": data,
            **(trace or {}),
        }
    )


def json_schemas() -> dict[str, Any]:
    """One JSON Schema document holding every event type's envelope under `$defs`."""
    defs: dict[str, Any] = {}
    one_of: list[dict[str, str]] = []
    for event_type, model in EVENT_MODELS.items():
        schema = model.model_json_schema(ref_template="#/$defs/{model}")
        for name, sub in schema.pop("$defs", {}).items():
            defs[name] = sub
        schema["properties"]["type"] = {"const": event_type, "title": "Type", "type": "string"}
        schema["title"] = event_type
        defs[event_type] = schema
        one_of.append({"$ref": f"#/$defs/{event_type}"})
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "https://motcua.example/schemas/events.json",
        "title": "motcua events (CloudEvents 1.0, structured JSON mode)",
        "oneOf": one_of,
        "$defs": dict(sorted(defs.items())),
    }
