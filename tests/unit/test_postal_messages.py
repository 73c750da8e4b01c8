"""Callback bodies (VNPost shape) and the internal `postal.callbacks` messages."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest

from services.postal.callback_bodies import MalformedCallback, callback_dedupe_id, parse_callback
from services.postal.carriers import Leg
from services.postal.inputs import CarrierCallback, Tick
from services.postal.messages import BadMessage, decode, encode_callback, encode_tick

DID = "000.00.12.H34-190704-0001"
BODY = {
    "order_id": "VN000000001",
    "client_order_id": f"{DID}:pickup",
    "status_code": 6,
    "status_time": "2019-07-04T09:00:00+07:00",
}


def test_a_callback_body_becomes_a_carrier_callback() -> None:
    cb = parse_callback("vnpost", orjson.dumps({**BODY, "cod_amount": 50_000}))
    assert cb == CarrierCallback(
        dossier_id=DID,
        leg=Leg.PICKUP,
        carrier="vnpost",
        order_id="VN000000001",
        code="6",
        carrier_time=datetime(2019, 7, 4, 2, tzinfo=UTC),
        cod_amount_vnd=50_000,
    )
    assert parse_callback("vnpost", orjson.dumps({**BODY, "status_code": " 99 "})).code == "99"


@pytest.mark.parametrize(
    "body",
    [
        b"{nope",
        b"[]",
        orjson.dumps({k: v for k, v in BODY.items() if k != "status_time"}),
        orjson.dumps({**BODY, "status_time": "2019-07-04T09:00:00"}),  # no offset
        orjson.dumps({**BODY, "client_order_id": f"{DID}:elsewhere"}),
        orjson.dumps({**BODY, "status_code": None}),
        orjson.dumps({**BODY, "status_code": "  "}),
        orjson.dumps({**BODY, "cod_amount": -1}),
        orjson.dumps({**BODY, "order_id": ""}),
    ],
)
def test_malformed_bodies_raise_malformed_callback_only(body: bytes) -> None:
    with pytest.raises(MalformedCallback):
        parse_callback("vnpost", body)


def test_internal_messages_round_trip() -> None:
    cb = parse_callback("vnpost", orjson.dumps(BODY))
    assert decode(encode_callback(cb)) == cb
    tick = Tick(DID, datetime(2019, 7, 5, tzinfo=UTC))
    assert decode(encode_tick(tick)) == tick


@pytest.mark.parametrize(
    "raw",
    [b"", b"garbage", b"[]", b'{"kind": "other"}', b'{"kind": "tick"}', b'{"kind": "callback"}'],
)
def test_bad_internal_messages_are_bad_messages(raw: bytes) -> None:
    with pytest.raises(BadMessage):
        decode(raw)


def test_dedupe_id_is_the_same_instant_whatever_the_offset() -> None:
    cb = parse_callback("vnpost", orjson.dumps(BODY))
    utc = parse_callback("vnpost", orjson.dumps({**BODY, "status_time": "2019-07-04T02:00:00Z"}))
    assert callback_dedupe_id(cb) == callback_dedupe_id(utc)
    later = CarrierCallback(
        DID, Leg.PICKUP, "vnpost", "VN000000001", "6", cb.carrier_time + timedelta(seconds=1)
    )
    assert callback_dedupe_id(later) != callback_dedupe_id(cb)
    other_code = parse_callback("vnpost", orjson.dumps({**BODY, "status_code": 7}))
    assert callback_dedupe_id(other_code) != callback_dedupe_id(cb)
    assert cb.carrier_time.tzinfo is not None
    assert cb.carrier_time.utcoffset() == timezone(timedelta(hours=7)).utcoffset(None)
