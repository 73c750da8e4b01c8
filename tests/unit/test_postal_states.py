"""The postal worker's states (its `StateTable` and the index of when each next needs a tick) and
its input decoder, without a broker: what is written to the changelog, what the scan takes, what
is retired, skipped or dead-lettered."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from services.common import topics
from services.common.changelog import Changelog
from services.common.dead_letters import PoisonMessage
from services.common.kafka import DurablePublisher
from services.common.state import StateTable
from services.common.topics import TopicSpec
from services.postal.carriers import Leg, PostalStatus
from services.postal.commands import BookOrder
from services.postal.domain import PostalConfig, apply
from services.postal.inputs import (
    CarrierCallback,
    DossierResolved,
    DossierSubmitted,
    OrderBooked,
    Tick,
)
from services.postal.messages import encode_tick
from services.postal.plans import Address, Plan, PostalMode, SealedAddress
from services.postal.shipments import (
    DossierState,
    Shipment,
    decode_state,
    encode_state,
    initial_state,
)
from services.postal.stale import StalePolicy, unacknowledged_bookings
from services.postal.worker import DossierStates, decode_input
from tests.support.postal import postal_submitted

DID = "000.00.12.H34-190704-0001"
T0 = datetime(2019, 7, 1, 1, 0, tzinfo=UTC)
POLICY = StalePolicy(query_after_hours=24, give_up_after_days=7)
ADDRESS = {"province": "Khánh Hòa", "district": "Nha Trang", "commune": "Vĩnh Hải", "street": "1"}


class KeptChangelog(Changelog):
    """The changelog's records kept in a list instead of sent (nothing here reaches a broker)."""

    def __init__(self) -> None:
        bootstrap = "127.0.0.1:1"  # never contacted
        spec = TopicSpec(topics.POSTAL_STATE_CHANGELOG, 4, compacted=True)
        super().__init__(bootstrap, spec, DurablePublisher(bootstrap))
        self.written: list[dict[bytes, bytes | None]] = []

    async def write(self, records: Mapping[bytes, bytes | None]) -> dict[int, int]:
        self.written.append(dict(records))
        return {}


CONFIG = PostalConfig(stale=POLICY, retire_after=timedelta(days=30))
REBOOK = timedelta(seconds=60)


def states() -> DossierStates:
    table = StateTable[DossierState](
        KeptChangelog(), encode=encode_state, decode=decode_state, cache_size=10
    )
    return DossierStates(table, CONFIG, REBOOK)


def submitted(mode: PostalMode) -> DossierSubmitted:
    return DossierSubmitted(
        dossier_id=DID,
        agency_code="000.00.12.H34",
        mode=mode,
        submitted_at=T0,
        applicant_name="Nguyễn Văn A",
        applicant_phone="0905123456",
        applicant_address=ADDRESS,
        postal_address=None,
        fee_amount_vnd=50_000,
        fee_method="online",
    )


def record(topic: str, value: bytes, timestamp: int = 0) -> Any:
    return ConsumerRecord(topic, 0, 0, timestamp, 0, DID.encode(), value, None, 0, len(value), [])


def figure(name: str) -> float:
    return REGISTRY.get_sample_value(name, {"service": "postal"}) or 0.0


def written(store: DossierStates) -> list[dict[bytes, bytes | None]]:
    kept = store.table.changelog
    assert isinstance(kept, KeptChangelog)
    return kept.written


async def test_only_changed_states_are_written_and_a_dossier_without_legs_not_at_all() -> None:
    store = states()
    assert store.put(initial_state(DID)) is False  # a callback or tick about a stranger
    assert store.put(apply(initial_state(DID), submitted(PostalMode.NONE)).state) is False
    assert len(store) == 0 and store.table.unsaved == set()
    state = apply(initial_state(DID), submitted(PostalMode.PICKUP)).state
    store.put(state)
    assert store.table.unsaved == {DID} and store.load(DID) == state
    await store.table.save()
    assert written(store) == [{DID.encode(): encode_state(state)}]
    store.put(apply(state, submitted(PostalMode.PICKUP)).state)  # a redelivery changes nothing
    assert store.table.unsaved == set()


def test_the_scan_takes_a_dossier_when_its_next_tick_is_due_once_the_attempt_succeeded() -> None:
    store = states()
    booking = apply(initial_state(DID), submitted(PostalMode.PICKUP)).state
    store.put(booking)
    later = T0 + timedelta(minutes=2)
    assert store.pop_due(later) == []  # not before the handler's attempt succeeded
    store.settle()
    assert store.pop_due(T0) == []
    assert store.pop_due(later) == [DID]  # a booking never acknowledged: re-sent
    assert store.pop_due(later) == []  # taken until its tick comes back
    store.put(booking)  # the tick changed nothing (the carrier was away): due again
    store.settle()
    assert store.pop_due(later) == [DID]
    acked = apply(booking, OrderBooked(DID, Leg.PICKUP, "vnpost", "VN1", T0)).state
    store.put(acked)
    store.settle()
    assert store.pop_due(later) == []
    assert store.pop_due(T0 + POLICY.query_after + timedelta(seconds=1)) == [DID]
    store.due_again([DID], later)  # its tick could not be sent
    assert store.pop_due(later + timedelta(seconds=1)) == [DID]


def test_a_failed_attempt_leaves_the_index_as_it_was() -> None:
    store = states()
    store.table.checkpoint()  # as the consumer does before every attempt
    store.put(apply(initial_state(DID), submitted(PostalMode.PICKUP)).state)
    store.discard()
    store.table.rollback()
    assert len(store) == 0 and store.pop_due(T0 + timedelta(days=365)) == []


async def test_a_retired_dossier_leaves_the_table_with_a_tombstone_and_is_counted() -> None:
    store = states()
    state = apply(initial_state(DID), submitted(PostalMode.PICKUP)).state
    store.put(state)
    store.settle()
    await store.table.save()
    live, retired = figure("motcua_states_live"), figure("motcua_states_retired_total")
    assert live == 1
    assert store.put(initial_state(DID)) is True
    store.settle()
    await store.table.save()
    assert written(store)[-1] == {DID.encode(): None}
    assert len(store) == 0 and store.pop_due(T0 + timedelta(days=365)) == []
    assert figure("motcua_states_live") == 0
    assert figure("motcua_states_retired_total") == retired + 1


def test_restored_states_are_indexed_from_their_bytes() -> None:
    store = states()
    booking = apply(initial_state(DID), submitted(PostalMode.PICKUP)).state
    # a state kept before dossiers without postal legs were dropped: retired after the grace
    no_legs = replace(booking, dossier_id="no-legs", pickup=None)
    assert no_legs.plan is not None
    no_legs = replace(no_legs, plan=replace(no_legs.plan, mode=PostalMode.NONE))
    for state in (booking, no_legs):  # as the table holds them once restored
        store.table.put(state.dossier_id, state)
    store.restored()
    assert figure("motcua_states_live") == 2
    assert store.pop_due(T0 + timedelta(minutes=2)) == [DID]
    assert store.pop_due(T0 + CONFIG.retire_after + timedelta(seconds=1)) == ["no-legs"]


def test_decoder_skips_other_dossier_types_and_dead_letters_what_can_never_apply() -> None:
    event = postal_submitted(DID, "pickup")
    wanted = decode_input(record(topics.DOSSIER_EVENTS, orjson.dumps(event)))
    assert isinstance(wanted, DossierSubmitted) and wanted.mode is PostalMode.PICKUP
    other = {**event, "type": "dossier.received"}
    assert decode_input(record(topics.DOSSIER_EVENTS, orjson.dumps(other))) is None
    no_legs = postal_submitted(DID, "none")
    assert decode_input(record(topics.DOSSIER_EVENTS, orjson.dumps(no_legs))) is None
    at = int(T0.timestamp() * 1000)
    stamped = decode_input(record(topics.DOSSIER_EVENTS, orjson.dumps(event), at))
    assert isinstance(stamped, DossierSubmitted) and stamped.recorded_at == T0
    tick = Tick(dossier_id=DID, now=T0)
    assert decode_input(record(topics.POSTAL_CALLBACKS, encode_tick(tick))) == tick
    with pytest.raises(PoisonMessage):
        decode_input(record(topics.POSTAL_CALLBACKS, b'{"kind": "nonsense"}'))
    broken = {**event, "data": {**event["data"], "postal": {"mode": "by pigeon"}}}
    with pytest.raises(PoisonMessage):
        decode_input(record(topics.DOSSIER_EVENTS, orjson.dumps(broken)))


# --- the changelog record --------------------------------------------------------------------

NAME, PHONE, SEALED = "sealed:v1:bmFtZQ", "sealed:v1:cGhvbmU", "sealed:v1:YWRkcmVzcw"
# written by the form where each shipment kept a copy of its booking (with the sealed fields):
# pickup acknowledged with one callback, the return booked but never acknowledged
OLDER_RECORD = (
    b'{"dossier_id":"000.00.12.H34-190704-0001","plan":{"mode":"pickup_and_return",'
    b'"agency_code":"000.00.12.H34","address":{"sealed":"sealed:v1:YWRkcmVzcw",'
    b'"field":"applicant.address"},"contact_name":"sealed:v1:bmFtZQ",'
    b'"contact_phone":"sealed:v1:cGhvbmU","cod_amount_vnd":50000,'
    b'"submitted_at":"2019-07-01T01:00:00Z"},"resolved_at":"2019-07-03T01:00:00Z",'
    b'"withdrawn":false,"pickup":{"leg":"pickup","last_update_at":"2019-07-01T03:00:00Z",'
    b'"booking":{"dossier_id":"000.00.12.H34-190704-0001","leg":"pickup","carrier":"vnpost",'
    b'"order_ref":"000.00.12.H34-190704-0001:pickup","agency_code":"000.00.12.H34",'
    b'"address":{"sealed":"sealed:v1:YWRkcmVzcw","field":"applicant.address"},'
    b'"contact_name":"sealed:v1:bmFtZQ","contact_phone":"sealed:v1:cGhvbmU",'
    b'"cod_amount_vnd":50000},"status":"picked_up","order_id":"VN1",'
    b'"last_carrier_time":"2019-07-01T03:00:00Z","last_queried_at":null,'
    b'"seen":[["vnpost","VN1","6","2019-07-01T03:00:00Z"]],"cod_expected_vnd":50000,'
    b'"cod_collected":false,"abandoned":false,"emitted":2},"return_":{"leg":"return",'
    b'"last_update_at":"2019-07-03T01:00:00Z","booking":{"dossier_id":'
    b'"000.00.12.H34-190704-0001","leg":"return","carrier":"vnpost",'
    b'"order_ref":"000.00.12.H34-190704-0001:return","agency_code":"000.00.12.H34",'
    b'"address":{"sealed":"sealed:v1:YWRkcmVzcw","field":"applicant.address"},'
    b'"contact_name":"sealed:v1:bmFtZQ","contact_phone":"sealed:v1:cGhvbmU",'
    b'"cod_amount_vnd":0},"status":null,"order_id":null,"last_carrier_time":null,'
    b'"last_queried_at":null,"seen":[],"cod_expected_vnd":0,"cod_collected":false,'
    b'"abandoned":false,"emitted":0}}'
)


def sealed_story() -> DossierState:
    """The story of `OLDER_RECORD`, applied by the current core."""
    sealed = replace(
        submitted(PostalMode.PICKUP_AND_RETURN),
        applicant_name=NAME,
        applicant_phone=PHONE,
        applicant_address=SealedAddress(SEALED, "applicant.address"),
        fee_method="postal_cod",
    )
    state = initial_state(DID)
    for event in (
        sealed,
        OrderBooked(DID, Leg.PICKUP, "vnpost", "VN1", T0 + timedelta(minutes=1)),
        CarrierCallback(DID, Leg.PICKUP, "vnpost", "VN1", "6", T0 + timedelta(hours=2)),
        DossierResolved(DID, resolved_at=T0 + timedelta(days=2), outcome="approved"),
    ):
        state = apply(state, event, CONFIG).state
    return state


def test_a_record_of_the_older_form_restores_as_the_state_kept_now() -> None:
    state = decode_state(DID, OLDER_RECORD)
    assert state == sealed_story()
    # the return never acknowledged is re-sent as the order the older record booked
    older = orjson.loads(OLDER_RECORD)["return_"]["booking"]
    address = SealedAddress(**older.pop("address"))
    [resent] = unacknowledged_bookings(state)
    assert resent == BookOrder(**{**older, "leg": Leg.RETURN, "address": address})
    again = encode_state(state)
    assert b"booking" not in again and again.count(NAME.encode()) == 1
    assert len(again) < len(OLDER_RECORD) / 2
    assert decode_state(DID, again) == state


def test_the_record_leaves_out_defaults_and_keeps_each_sealed_field_once() -> None:
    record = orjson.loads(encode_state(sealed_story()))
    assert record["return_"] == {
        "leg": "return",
        "last_update_at": "2019-07-03T01:00:00Z",
        "carrier": "vnpost",
    }
    assert "withdrawn" not in record and "abandoned" not in record["pickup"]
    for sealed in (NAME, PHONE, SEALED):
        assert encode_state(sealed_story()).count(sealed.encode()) == 1


AWARE = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)
WORDS = st.sampled_from(["", "VN1", "vnpost", "booking", "Vĩnh Hải", "a:b", NAME])


def shipments(leg: Leg) -> st.SearchStrategy[Shipment]:
    keys = st.tuples(WORDS, WORDS, WORDS, AWARE)
    return st.builds(
        Shipment,
        leg=st.just(leg),
        last_update_at=AWARE,
        carrier=st.none() | WORDS,
        status=st.none() | st.sampled_from(list(PostalStatus)),
        order_id=st.none() | WORDS,
        last_carrier_time=st.none() | AWARE,
        last_queried_at=st.none() | AWARE,
        seen=st.frozensets(keys, max_size=3),
        cod_expected_vnd=st.integers(0, 10**9),
        cod_collected=st.booleans(),
        abandoned=st.booleans(),
        emitted=st.integers(0, 50),
    )


ADDRESSES = (
    st.none()
    | st.builds(SealedAddress, WORDS, WORDS)
    | st.builds(Address, WORDS, WORDS, WORDS, st.none() | WORDS)
)
PLANS = st.builds(
    Plan,
    mode=st.sampled_from(list(PostalMode)),
    agency_code=WORDS,
    address=ADDRESSES,
    contact_name=WORDS,
    contact_phone=st.none() | WORDS,
    cod_amount_vnd=st.integers(0, 10**9),
    submitted_at=AWARE,
)
STATES = st.builds(
    DossierState,
    dossier_id=st.just(DID),
    plan=st.none() | PLANS,
    resolved_at=st.none() | AWARE,
    withdrawn=st.booleans(),
    pickup=st.none() | shipments(Leg.PICKUP),
    return_=st.none() | shipments(Leg.RETURN),
)


@settings(max_examples=200)
@given(STATES)
def test_any_state_round_trips_through_its_record(state: DossierState) -> None:
    assert decode_state(DID, encode_state(state)) == state
