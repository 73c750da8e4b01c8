"""The messages of `portals.callbacks`, the worker's own input beside the event topics: pure.

Keyed by dossier id like the events, so the member holding a dossier's state applies them:

- `{"kind": "attempt", ...}`: the outcome of one delivery attempt (`domain.Attempt`), written
  by the deliverer once the portal answered, or did not within the timeout;
- `{"kind": "redeliver", "dossier_id", "delivery_id", "at"}`: `POST
  /v1/deliveries/{id}/redeliver`;
- `{"kind": "tick", "dossier_id", "at"}`: the scan found the dossier's retirement due;
- a CloudEvent: a dead letter of `portals.callbacks.dlq` put back (`motcua dlq-replay`), which
  redelivers that event.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import orjson

from services.portals.domain import Attempt


@dataclass(frozen=True)
class Redeliver:
    dossier_id: str
    delivery_id: str
    at: datetime


@dataclass(frozen=True)
class Tick:
    dossier_id: str
    at: datetime


class BadMessage(ValueError):
    """A message of `portals.callbacks` that is none of the above."""


def encode(message: Attempt | Redeliver | Tick) -> bytes:
    match message:
        case Attempt():
            body: dict[str, Any] = {
                "kind": "attempt",
                "dossier_id": message.dossier_id,
                "delivery_id": message.delivery_id,
                "attempt": message.attempt,
                "ok": message.ok,
                "status_code": message.status_code,
                "error": message.error,
                "at": message.at.isoformat(),
            }
        case Redeliver():
            body = {
                "kind": "redeliver",
                "dossier_id": message.dossier_id,
                "delivery_id": message.delivery_id,
                "at": message.at.isoformat(),
            }
        case Tick():
            body = {"kind": "tick", "dossier_id": message.dossier_id, "at": message.at.isoformat()}
    return orjson.dumps(body)


def _text(value: dict[str, Any], name: str) -> str:
    field = value.get(name)
    if not isinstance(field, str) or not field:
        raise BadMessage(f"{name} is missing")
    return field


def _at(value: dict[str, Any], name: str = "at") -> datetime:
    try:
        at = datetime.fromisoformat(_text(value, name))
    except ValueError:
        raise BadMessage(f"{name} is not an RFC 3339 time") from None
    if at.tzinfo is None:
        raise BadMessage(f"{name} has no offset")
    return at


def decode(raw: bytes, *, now: datetime) -> Attempt | Redeliver | Tick:
    """A message of `portals.callbacks`; `BadMessage` for anything else (a dead letter)."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadMessage(f"malformed JSON: {exc}"[:300]) from None
    if not isinstance(value, dict):
        raise BadMessage("not a JSON object")
    if "specversion" in value:  # a dead letter put back: deliver the event again
        return Redeliver(_text(value, "subject"), _text(value, "id"), now)
    kind = value.get("kind")
    if kind == "attempt":
        number, ok, code, error = (value.get(k) for k in ("attempt", "ok", "status_code", "error"))
        if not isinstance(number, int) or number < 1 or not isinstance(ok, bool):
            raise BadMessage("attempt needs a positive attempt number and ok")
        if code is not None and not isinstance(code, int):
            raise BadMessage("status_code must be an integer")
        if error is not None and not isinstance(error, str):
            raise BadMessage("error must be a string")
        return Attempt(
            _text(value, "dossier_id"),
            _text(value, "delivery_id"),
            number,
            ok,
            code,
            error,
            _at(value),
        )
    if kind == "redeliver":
        return Redeliver(_text(value, "dossier_id"), _text(value, "delivery_id"), _at(value))
    if kind == "tick":
        return Tick(_text(value, "dossier_id"), _at(value))
    raise BadMessage(f"unknown kind {kind!r}")
