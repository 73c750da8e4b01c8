"""How the batch consumer turns records into events: what it skips and what it dead-letters."""

from __future__ import annotations

import orjson
import pytest
from aiokafka.structs import ConsumerRecord

from services.common.consumer import event_decoder
from services.common.dead_letters import PoisonMessage
from services.common.events import InvalidEvent
from tests.support.factories import envelope, submitted


def record(value: bytes) -> ConsumerRecord:
    return ConsumerRecord(
        topic="dossier.events",
        partition=0,
        offset=0,
        timestamp=0,
        timestamp_type=0,
        key=b"k",
        value=value,
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=len(value),
        headers=(),
    )


WANTED = frozenset({"dossier.submitted"})


def test_a_wanted_valid_event_is_decoded() -> None:
    event = event_decoder(WANTED)(record(orjson.dumps(submitted("D-1"))))
    assert event is not None and event.type == "dossier.submitted" and event.subject == "D-1"


def test_an_unwanted_type_is_skipped_even_when_it_would_not_validate() -> None:
    broken = envelope("dossier.received", "D-2", {})
    del broken["time"]
    assert event_decoder(WANTED)(record(orjson.dumps(broken))) is None


@pytest.mark.parametrize(
    "value",
    [
        b"not json",
        b"[1, 2]",
        orjson.dumps({**submitted("D-3"), "time": "yesterday"}),
    ],
)
def test_what_cannot_be_a_wanted_event_is_poison_with_the_validation_error(value: bytes) -> None:
    for decode in (event_decoder(WANTED), event_decoder()):
        with pytest.raises(PoisonMessage) as raised:
            decode(record(value))
        assert isinstance(raised.value.__cause__, InvalidEvent)


def test_an_unknown_type_is_poison_only_to_a_consumer_of_every_type() -> None:
    value = orjson.dumps({**submitted("D-4"), "type": "dossier.unheard_of"})
    assert event_decoder(WANTED)(record(value)) is None
    with pytest.raises(PoisonMessage):
        event_decoder()(record(value))


def test_without_types_every_valid_event_is_decoded() -> None:
    received = envelope(
        "dossier.received",
        "D-5",
        {
            "receipt_no": "H34.19-0001",
            "received_at": "2019-03-04T08:20:00+07:00",
            "due_at": "2019-03-11T17:00:00+07:00",
        },
    )
    event = event_decoder()(record(orjson.dumps(received)))
    assert event is not None and event.type == "dossier.received"
