"""The portal keys' rules (services/common/portal_keys.py): the fold of the settings' keys and the
records of `portal.keys`, the records' encoding, and the decisions on an operator's add, rotate
and revoke; and the follower's lazy rate buckets and its patience with a broker that is away."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta, timezone

import orjson
import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st

from services.common.coordination import TokenBucket
from services.common.portal_keys import (
    KEY_ID_LENGTH,
    InvalidRecord,
    KeyEntry,
    KeyRecord,
    KeyTable,
    Refusal,
    decide_add,
    decide_revoke,
    decode_record,
    fold,
    key_id_of,
    static_table,
)
from services.common.portal_keys_view import PortalKeys
from services.common.settings import DEV_PORTALS, Portal, hash_key
from services.intake.buckets import PortalBuckets

AT = datetime(2026, 11, 26, 9, 30, tzinfo=timezone(timedelta(hours=7)))
STATIC = [
    Portal(source="portal/a", key_sha256=hash_key("key-a"), rate_per_second=7.0, burst=70),
    Portal(source="portal/b", key_sha256=hash_key("key-b")),
]


def record(source: str, key: str, state: str = "active", minutes: int = 0) -> KeyRecord:
    digest = hash_key(key)
    return KeyRecord(source, key_id_of(digest), digest, state, AT + timedelta(minutes=minutes))  # type: ignore[arg-type]


# A small world of keys, so that records of one key id often follow one another.
KEYS = [f"key-{n}" for n in range(6)] + ["key-a", "key-b"]
records_strategy = st.lists(
    st.builds(
        record,
        st.sampled_from(["portal/a", "portal/b", "portal/c"]),
        st.sampled_from(KEYS),
        st.sampled_from(["active", "revoked"]),
        st.integers(0, 1000),
    ),
    max_size=30,
)


def latest_per_key(records: list[KeyRecord]) -> list[KeyRecord]:
    """What a compacted topic keeps (and `read_latest` returns): the last record of each key."""
    latest: dict[str, KeyRecord] = {}
    for r in records:
        latest.pop(r.key_id, None)
        latest[r.key_id] = r
    return list(latest.values())


def accepted(table: KeyTable) -> dict[str, str]:
    """Key -> source of every key of `KEYS` the table accepts."""
    found = {key: table.find(hash_key(key)) for key in KEYS}
    return {key: portal.source for key, portal in found.items() if portal is not None}


# --- the fold -------------------------------------------------------------------------------


def test_the_settings_keys_are_active_under_an_id_derived_from_their_hash() -> None:
    table = fold(STATIC, [])
    assert accepted(table) == {"key-a": "portal/a", "key-b": "portal/b"}
    entry = table.entries[hash_key("key-a")[:12]]
    assert (entry.origin, entry.state, entry.at) == ("settings", "active", None)
    assert len(entry.key_id) == KEY_ID_LENGTH
    # the dev default too: `portal/dev` with `dev-portal-key`
    assert fold(DEV_PORTALS, []).find(hash_key("dev-portal-key")).source == "portal/dev"  # type: ignore[union-attr]


def test_a_record_adds_a_key_and_a_later_one_revokes_it() -> None:
    added = fold(STATIC, [record("portal/c", "key-1")])
    assert accepted(added)["key-1"] == "portal/c"
    revoked = fold(STATIC, [record("portal/c", "key-1"), record("portal/c", "key-1", "revoked")])
    assert "key-1" not in accepted(revoked)
    assert revoked.entries[key_id_of(hash_key("key-1"))].state == "revoked"


def test_a_settings_key_is_revoked_by_a_record_of_its_id() -> None:
    table = fold(STATIC, [record("portal/a", "key-a", "revoked")])
    assert accepted(table) == {"key-b": "portal/b"}


def test_two_keys_of_one_source_are_valid_together() -> None:
    table = fold(STATIC, [record("portal/a", "key-1")])
    assert accepted(table) == {"key-a": "portal/a", "key-b": "portal/b", "key-1": "portal/a"}
    assert sorted(e.key_id for e in table.active_keys("portal/a")) == sorted(
        [key_id_of(hash_key("key-a")), key_id_of(hash_key("key-1"))]
    )


@given(records_strategy)
def test_a_key_is_accepted_exactly_when_its_latest_word_is_active(
    records: list[KeyRecord],
) -> None:
    table = fold(STATIC, records)
    expected: dict[str, str] = {p.key_sha256: p.source for p in STATIC}
    for r in records:
        if r.state == "active":
            expected[r.key_sha256] = r.source
        else:
            expected.pop(r.key_sha256, None)
    assert {hash_key(k): s for k, s in accepted(table).items()} == expected
    # one entry per key id ever seen: memory grows with keys issued, not with changes
    assert len(table.entries) == len(
        {*(key_id_of(p.key_sha256) for p in STATIC), *(r.key_id for r in records)}
    )


@given(records_strategy)
def test_folding_one_record_at_a_time_is_the_same_fold(records: list[KeyRecord]) -> None:
    table = fold(STATIC, [])
    for r in records:
        table = table.with_record(r)
    assert table.entries == fold(STATIC, records).entries


@given(records_strategy, st.data())
def test_the_compacted_topic_then_the_records_read_again_fold_to_the_same_table(
    records: list[KeyRecord], data: st.DataObject
) -> None:
    """The follower's catch-up: the latest record of each key up to some point `seen` (what
    `read_latest` returns), then every record from an earlier point `start` (where tailing
    begins) folds to the table of the whole topic."""
    seen = data.draw(st.integers(0, len(records)))
    start = data.draw(st.integers(0, seen))
    caught_up = fold(STATIC, [*latest_per_key(records[:seen]), *records[start:]])
    assert caught_up.entries == fold(STATIC, records).entries


def test_a_portal_of_the_topic_alone_gets_the_default_rate_a_configured_one_keeps_its_own() -> None:
    table = fold(STATIC, [record("portal/a", "key-1"), record("portal/c", "key-2")])
    default = Portal(source="x", key_sha256="")
    assert table.limits("portal/a") == (7.0, 70)
    assert table.limits("portal/c") == (default.rate_per_second, default.burst)
    found = table.find(hash_key("key-1"))
    assert found is not None
    assert (found.source, found.rate_per_second, found.burst) == ("portal/a", 7.0, 70)
    assert found.key_sha256 == hash_key("key-1")


def test_the_listing_shows_no_hash() -> None:
    table = fold(STATIC, [record("portal/c", "key-1", minutes=5)])
    listing = table.listing()
    assert [k["source"] for k in listing] == ["portal/a", "portal/b", "portal/c"]
    assert listing[2] == {
        "source": "portal/c",
        "key_id": key_id_of(hash_key("key-1")),
        "state": "active",
        "at": (AT + timedelta(minutes=5)).isoformat(),
        "origin": "portal.keys",
    }
    text = orjson.dumps(listing)
    for key in ("key-a", "key-b", "key-1"):
        assert hash_key(key).encode() not in text


# --- the records ------------------------------------------------------------------------------


@given(records_strategy)
def test_a_record_reads_back_as_written(records: list[KeyRecord]) -> None:
    for r in records:
        assert decode_record(r.key_id.encode(), r.encode()) == r
        assert set(orjson.loads(r.encode())) == {"source", "key_id", "key_sha256", "state", "at"}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"state": "deleted"}, "state"),
        ({"key_sha256": hash_key("k").upper()}, "key_sha256"),
        ({"key_id": "0" * 12}, "key_id"),
        ({"at": "2026-11-26T09:30:00"}, "at"),
        ({"at": "yesterday"}, "at"),
        ({"source": ""}, "source"),
        ({"source": None}, "source"),
    ],
)
def test_a_record_not_written_by_motcua_is_refused(change: dict[str, object], reason: str) -> None:
    raw = {**orjson.loads(record("portal/c", "k").encode()), **change}
    with pytest.raises(InvalidRecord, match=reason):
        decode_record(None, orjson.dumps(raw))


def test_a_record_under_another_kafka_key_or_not_json_is_refused() -> None:
    good = record("portal/c", "k")
    with pytest.raises(InvalidRecord, match="Kafka key"):
        decode_record(b"another", good.encode())
    for value in (b"not json", b"[1, 2]"):
        with pytest.raises(InvalidRecord):
            decode_record(None, value)


# --- the operators' requests ---------------------------------------------------------------


def test_add_makes_the_first_key_of_a_source() -> None:
    digest = hash_key("new")
    decided = decide_add(fold(STATIC, []), "portal/c", rotate=False, key_sha256=digest, at=AT)
    assert decided == KeyRecord("portal/c", digest[:12], digest, "active", AT)


def test_add_refuses_a_source_with_an_active_key_and_names_it() -> None:
    decided = decide_add(
        fold(STATIC, []), "portal/a", rotate=False, key_sha256=hash_key("n"), at=AT
    )
    assert isinstance(decided, Refusal) and decided.status == 409
    assert key_id_of(hash_key("key-a")) in decided.detail and "rotate" in decided.detail


def test_add_after_every_key_of_a_source_was_revoked_is_allowed() -> None:
    table = fold(STATIC, [record("portal/a", "key-a", "revoked")])
    decided = decide_add(table, "portal/a", rotate=False, key_sha256=hash_key("n"), at=AT)
    assert isinstance(decided, KeyRecord) and decided.state == "active"


def test_rotate_adds_beside_the_active_key_and_needs_one() -> None:
    table = fold(STATIC, [])
    rotated = decide_add(table, "portal/a", rotate=True, key_sha256=hash_key("n"), at=AT)
    assert isinstance(rotated, KeyRecord)
    assert len(table.with_record(rotated).active_keys("portal/a")) == 2
    nothing = decide_add(table, "portal/c", rotate=True, key_sha256=hash_key("n"), at=AT)
    assert isinstance(nothing, Refusal) and nothing.status == 404


@pytest.mark.parametrize(
    "source", ["", "portal with space", "/portal", "motcua/metrics", "p" * 201, "portal/é"]
)
def test_a_source_no_portal_may_own_is_422(source: str) -> None:
    decided = decide_add(fold(STATIC, []), source, rotate=False, key_sha256=hash_key("n"), at=AT)
    assert isinstance(decided, Refusal) and decided.status == 422


def test_a_key_whose_id_is_taken_is_not_added() -> None:
    table = fold(STATIC, [record("portal/c", "key-1", "revoked")])
    decided = decide_add(table, "portal/d", rotate=False, key_sha256=hash_key("key-1"), at=AT)
    assert isinstance(decided, Refusal) and decided.status == 409


def test_revoke_writes_the_revocation_of_a_known_id_only() -> None:
    table = fold(STATIC, [])
    key_id = key_id_of(hash_key("key-b"))
    decided = decide_revoke(table, key_id, at=AT)
    assert decided == KeyRecord("portal/b", key_id, hash_key("key-b"), "revoked", AT)
    assert isinstance(decided, KeyRecord)
    again = decide_revoke(table.with_record(decided), key_id, at=AT)
    assert isinstance(again, KeyEntry) and again.state == "revoked"
    unknown = decide_revoke(table, "000000000000", at=AT)
    assert isinstance(unknown, Refusal) and unknown.status == 404


def test_static_table_keeps_the_first_settings_of_a_source_for_its_rate() -> None:
    second = Portal(source="portal/a", key_sha256=hash_key("key-a2"), rate_per_second=1.0, burst=1)
    table = static_table([*STATIC, second])
    assert table.limits("portal/a") == (7.0, 70)
    assert len(table.active_keys("portal/a")) == 2


# --- the follower's shell ----------------------------------------------------------------


def test_a_bucket_is_made_once_per_source_with_its_portals_rate() -> None:
    keyring = PortalKeys("127.0.0.1:1", STATIC)
    keyring.apply_record(record("portal/c", "key-1"))
    client = aioredis.Redis()  # never connected: buckets are only made here
    made: list[tuple[float, int]] = []

    def make(rate: float, burst: int) -> TokenBucket:
        made.append((rate, burst))
        return TokenBucket(client, "test:rate", rate, burst)

    buckets = PortalBuckets(keyring, make)
    assert buckets["portal/a"] is buckets["portal/a"]
    default = Portal(source="x", key_sha256="")
    assert buckets["portal/c"].rate == default.rate_per_second
    assert made == [(7.0, 70), (default.rate_per_second, default.burst)]
    assert sorted(buckets) == ["portal/a", "portal/c"]


async def test_the_follower_waits_for_an_unreachable_broker_without_ending() -> None:
    keyring = PortalKeys("127.0.0.1:1", STATIC)  # nothing listens on port 1
    following = asyncio.create_task(keyring.follow())
    await asyncio.sleep(1.5)
    assert not following.done()
    assert not await keyring.read()
    # the settings' keys are known meanwhile
    assert keyring.find(hash_key("key-a")) is not None
    following.cancel()
    with pytest.raises(asyncio.CancelledError):
        await following
