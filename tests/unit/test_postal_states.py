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
from prometheus_client import REGISTRY

from services.common import topics
from services.common.changelog import Changelog
from services.common.dead_letters import PoisonMessage
from services.common.kafka import DurablePublisher
from services.common.state import StateTable
from services.common.topics import TopicSpec
from services.postal.carriers import Leg
from services.postal.domain import PostalConfig, apply
from services.postal.inputs import DossierSubmitted, OrderBooked, Tick
from services.postal.messages import encode_tick
from services.postal.plans import PostalMode
from services.postal.shipments import DossierState, decode_state, encode_state, initial_state
from services.postal.stale import StalePolicy
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
