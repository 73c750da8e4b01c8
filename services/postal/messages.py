"""What goes on the internal topic `postal.callbacks`: verified carrier callbacks and scan ticks.

Both are keyed by dossier id, so the consumer member that applies them holds the dossier's
state (the same partition number of `dossier.events`). The encoding is ours (not CloudEvents):
small JSON objects with a `kind`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson

from services.postal.carriers import Leg
from services.postal.inputs import CarrierCallback, Tick


class BadMessage(ValueError):
    """An internal message that can never be applied (dead-lettered at once)."""


def encode_callback(cb: CarrierCallback) -> bytes:
    return orjson.dumps(
        {
            "kind": "callback",
            "dossier_id": cb.dossier_id,
            "leg": cb.leg.value,
            "carrier": cb.carrier,
            "order_id": cb.order_id,
            "code": cb.code,
            "carrier_time": cb.carrier_time.isoformat(),
            "cod_amount_vnd": cb.cod_amount_vnd,
        }
    )


def encode_tick(tick: Tick) -> bytes:
    return orjson.dumps(
        {"kind": "tick", "dossier_id": tick.dossier_id, "now": tick.now.isoformat()}
    )


def decode(raw: bytes) -> CarrierCallback | Tick:
    try:
        value: Any = orjson.loads(raw)
        if not isinstance(value, dict):
            raise BadMessage("not a JSON object")
        kind = value.get("kind")
        if kind == "callback":
            amount = value.get("cod_amount_vnd")
            return CarrierCallback(
                dossier_id=str(value["dossier_id"]),
                leg=Leg(value["leg"]),
                carrier=str(value["carrier"]),
                order_id=str(value["order_id"]),
                code=str(value["code"]),
                carrier_time=datetime.fromisoformat(value["carrier_time"]),
                cod_amount_vnd=int(amount) if amount is not None else None,
            )
        if kind == "tick":
            return Tick(
                dossier_id=str(value["dossier_id"]), now=datetime.fromisoformat(value["now"])
            )
        raise BadMessage(f"unknown kind {kind!r}")
    except BadMessage:
        raise
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise BadMessage(f"{type(exc).__name__}: {exc}"[:200]) from None
