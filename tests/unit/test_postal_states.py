"""The postal worker's states (its `StateTable` and the scan's watched set) and its input decoder,
without a broker: what is written to the changelog, what the stale scan looks at, what is
skipped or dead-lettered."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from services.common import topics
from services.common.changelog import Changelog
from services.common.dead_letters import PoisonMessage
from services.common.kafka import DurablePublisher
from services.common.state import StateTable
from services.common.topics import TopicSpec
from services.postal.carriers import Leg
from services.postal.domain import apply
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

    async def write(self, records: Mapping[bytes, bytes | None]) -> None:
        self.written.append(dict(records))


def states() -> DossierStates:
    table = StateTable[DossierState](
        KeptChangelog(), encode=encode_state, decode=decode_state, cache_size=10
    )
    return DossierStates(table)


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


def record(topic: str, value: bytes) -> Any:
    return ConsumerRecord(topic, 0, 0, 0, 0, DID.encode(), value, None, 0, len(value), [])


async def test_only_changed_states_are_written_and_an_unplanned_dossier_not_at_all() -> None:
    store = states()
    store.put(initial_state(DID))  # a callback or tick about a dossier postal never planned
    assert len(store) == 0 and store.table.unsaved == set()
    state = apply(initial_state(DID), submitted(PostalMode.NONE)).state
    store.put(state)
    assert store.table.unsaved == {DID} and store.load(DID) == state
    await store.table.save()
    kept = store.table.changelog
    assert isinstance(kept, KeptChangelog)
    assert kept.written == [{DID.encode(): encode_state(state)}]
    store.put(apply(state, submitted(PostalMode.NONE)).state)  # a redelivery changes nothing
    assert store.table.unsaved == set()


async def test_the_scan_looks_at_open_legs_only_and_forgets_the_rest() -> None:
    store = states()
    quiet = apply(initial_state(DID), submitted(PostalMode.NONE)).state
    store.put(quiet)
    assert store.watched == set()
    booking = apply(initial_state(DID), submitted(PostalMode.PICKUP)).state
    store.put(booking)
    assert store.watched == {DID}
    # a booking never acknowledged is re-sent after `rebook_after`
    assert await store.due_for_scan(T0, POLICY, timedelta(seconds=60)) == []
    later = T0 + timedelta(minutes=2)
    assert await store.due_for_scan(later, POLICY, timedelta(seconds=60)) == [DID]
    acked = apply(booking, OrderBooked(DID, Leg.PICKUP, "vnpost", "VN1", T0)).state
    store.put(acked)
    assert await store.due_for_scan(later, POLICY, timedelta(seconds=60)) == []
    # restored states are all looked at once; those without an open leg are then forgotten
    store.table.put("other", replace(acked, dossier_id="other", pickup=None))
    store.watched = {DID, "other", "revoked"}
    await store.due_for_scan(later, POLICY, timedelta(seconds=60))
    assert store.watched == {DID}


def test_decoder_skips_other_dossier_types_and_dead_letters_what_can_never_apply() -> None:
    event = postal_submitted(DID, "pickup")
    wanted = decode_input(record(topics.DOSSIER_EVENTS, orjson.dumps(event)))
    assert isinstance(wanted, DossierSubmitted) and wanted.mode is PostalMode.PICKUP
    other = {**event, "type": "dossier.received"}
    assert decode_input(record(topics.DOSSIER_EVENTS, orjson.dumps(other))) is None
    tick = Tick(dossier_id=DID, now=T0)
    assert decode_input(record(topics.POSTAL_CALLBACKS, encode_tick(tick))) == tick
    with pytest.raises(PoisonMessage):
        decode_input(record(topics.POSTAL_CALLBACKS, b'{"kind": "nonsense"}'))
    broken = {**event, "data": {**event["data"], "postal": {"mode": "by pigeon"}}}
    with pytest.raises(PoisonMessage):
        decode_input(record(topics.DOSSIER_EVENTS, orjson.dumps(broken)))
