"""The decoded-record cache of the changelog-backed workers: trusted only for the same bytes."""

from __future__ import annotations

from services.common.changelog import DecodedCache


def counting_cache(size: int) -> tuple[DecodedCache[str], list[str]]:
    decoded: list[str] = []

    def decode(key: str, raw: bytes) -> str:
        decoded.append(key)
        return raw.decode()

    return DecodedCache(decode, size), decoded


def test_the_same_bytes_are_decoded_once_and_new_bytes_again() -> None:
    cache, decoded = counting_cache(10)
    raw = b"state-1"
    assert cache.get("D-1", raw) == cache.get("D-1", raw) == "state-1"
    assert decoded == ["D-1"]
    assert cache.get("D-1", b"state-2") == "state-2"  # the record was replaced
    assert decoded == ["D-1", "D-1"]


def test_remembered_values_need_no_decoding_and_the_least_recent_goes_first() -> None:
    cache, decoded = counting_cache(2)
    a, b, c = b"a", b"b", b"c"
    cache.remember("A", a, "A!")
    cache.remember("B", b, "B!")
    assert cache.get("A", a) == "A!"  # A is now the most recent
    cache.remember("C", c, "C!")  # evicts B
    assert decoded == []
    assert cache.get("B", b) == "b" and decoded == ["B"]
    cache.clear()
    assert cache.get("A", a) == "a"


def test_size_zero_keeps_nothing() -> None:
    cache, decoded = counting_cache(0)
    raw = b"x"
    cache.get("D", raw)
    cache.get("D", raw)
    assert decoded == ["D", "D"]
