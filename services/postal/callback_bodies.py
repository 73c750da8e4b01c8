"""A carrier's status callback (VNPost shape) as the core's `CarrierCallback`, and the id it is
deduplicated by. Pure: the webhook (`webhook.py`) and the carrier adapter's queries
(`partner.py`) both read callbacks through here.

A callback body is JSON: `{"order_id", "client_order_id", "status_code", "status_time",
"cod_amount"?}`.
"""

from __future__ import annotations

import hashlib
from datetime import UTC

import orjson
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, StrictInt, ValidationError

from services.postal.inputs import CarrierCallback
from services.postal.plans import parse_order_ref


class MalformedCallback(ValueError):
    """A callback body that can never be applied (answered 422)."""


class VNPostCallbackBody(BaseModel):
    """A status report as VNPost sends it, to the webhook or in answer to a query."""

    model_config = ConfigDict(extra="allow", frozen=True)

    order_id: str = Field(min_length=1, max_length=64)
    client_order_id: str = Field(min_length=3, max_length=200)
    status_code: StrictInt | str
    status_time: AwareDatetime
    cod_amount: StrictInt | None = Field(default=None, ge=0)


def parse_callback(carrier: str, body: bytes) -> CarrierCallback:
    """A webhook body as a `CarrierCallback`; raises `MalformedCallback` (never anything else)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise MalformedCallback("malformed JSON") from None
    if not isinstance(value, dict):
        raise MalformedCallback("the body must be a JSON object")
    try:
        parsed = VNPostCallbackBody.model_validate(value)
    except ValidationError as exc:
        fields = ", ".join(".".join(str(p) for p in e["loc"]) for e in exc.errors())
        raise MalformedCallback(f"invalid fields: {fields}") from None
    return callback_from_body(carrier, parsed)


def callback_from_body(carrier: str, parsed: VNPostCallbackBody) -> CarrierCallback:
    """A validated body as the core's input; raises `MalformedCallback` for a reference or a
    code that is not ours to apply."""
    ref = parse_order_ref(parsed.client_order_id)
    if ref is None:
        raise MalformedCallback("client_order_id is not one of our order references")
    code = str(parsed.status_code).strip()
    if not code:
        raise MalformedCallback("empty status_code")
    dossier_id, leg = ref
    return CarrierCallback(
        dossier_id=dossier_id,
        leg=leg,
        carrier=carrier,
        order_id=parsed.order_id,
        code=code,
        carrier_time=parsed.status_time,
        cod_amount_vnd=parsed.cod_amount,
    )


def callback_dedupe_id(cb: CarrierCallback) -> str:
    """(carrier, order, status, carrier time) as one short id; equal instants, equal ids."""
    instant = cb.carrier_time.astimezone(UTC).isoformat()
    text = f"{cb.carrier}\x00{cb.order_id}\x00{cb.code}\x00{instant}"
    return hashlib.sha256(text.encode()).hexdigest()[:40]
