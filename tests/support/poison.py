"""One mix of good and poison messages for every consumer's dead-letter test, and what its
dead letters must look like (CONTRACT section 3)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from tests.support.factories import submitted


@dataclass(frozen=True)
class PoisonMix:
    messages: list[tuple[bytes, bytes]]  # (key, value), in order
    good_ids: frozenset[str]  # the events handled on either side of the poison
    failing_id: str  # valid, but the test handlers raise on it every time
    dead_keys: frozenset[bytes]


def poison_mix() -> PoisonMix:
    """Valid, undecodable bytes, invalid (no UTC offset), failing (`procedure_code` "explode"),
    valid."""
    first, last = submitted(), submitted()
    failing = submitted(procedure_code="explode")
    no_offset = submitted(submitted_at="2019-03-04T08:15:00")
    messages = [
        (first["subject"].encode(), orjson.dumps(first)),
        (b"D-poison", b"\xff\xfe not json at all"),
        (no_offset["subject"].encode(), orjson.dumps(no_offset)),
        (failing["subject"].encode(), orjson.dumps(failing)),
        (last["subject"].encode(), orjson.dumps(last)),
    ]
    dead = {b"D-poison", no_offset["subject"].encode(), failing["subject"].encode()}
    return PoisonMix(messages, frozenset({first["id"], last["id"]}), failing["id"], frozenset(dead))


def assert_dead_letters(dead: Sequence[Any], mix: PoisonMix) -> None:
    """The three poison messages, each once, with the headers saying why and after how many
    attempts (one for what cannot be decoded, the retries for a failing handler)."""
    by_value = {record.value: dict(record.headers) for record in dead}
    assert len(dead) == 3 and set(by_value) == {value for _, value in mix.messages[1:4]}
    undecodable = by_value[mix.messages[1][1]]
    assert undecodable["error_type"] == b"InvalidEvent"
    assert b"malformed JSON" in undecodable["error"]
    assert undecodable["attempts"] == b"1"
    assert by_value[mix.messages[2][1]]["error"].startswith(b"/data/submitted_at")
    exploded = by_value[mix.messages[3][1]]
    assert exploded["error_type"] == b"RuntimeError"
    assert exploded["attempts"] == b"3"
    for headers in by_value.values():
        assert set(headers) == {"error", "error_type", "attempts", "failed_at"}
    assert {record.key for record in dead} == mix.dead_keys
