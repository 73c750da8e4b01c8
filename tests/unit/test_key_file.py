"""The data keys' file (services/common/key_file.py): what a process keeps of `dossier.keys`
on disk, and finds again when it starts again."""

from __future__ import annotations

from pathlib import Path

from services.common.key_file import ERASED, KeyFile

SOURCE = "127.0.0.1:9092/ns"


def opened(path: Path, source: str = SOURCE, *, erased_kept: int = 100) -> KeyFile:
    return KeyFile(path, source, erased_kept=erased_kept, cached=4)


def test_keys_erasures_and_offsets_are_there_when_the_file_is_opened_again(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite"
    first = opened(path)
    first.put("A", b"wrapped-a")
    first.put("B", b"wrapped-b")
    first.put("B", ERASED)
    first.flush({0: (3, 1_700_000_000_000), 1: (0, -1)})
    first.put("C", b"wrapped-c")  # put after the last flush: not in the file
    first.close()
    again = opened(path)
    assert again.get("A") == b"wrapped-a"
    assert again.get("B") == ERASED
    assert again.get("C") is None
    assert again.offsets() == {0: (3, 1_700_000_000_000), 1: (0, -1)}
    assert again.count() == 1


def test_a_file_of_another_source_is_emptied(tmp_path: Path) -> None:
    path = tmp_path / "keys.sqlite"
    first = opened(path)
    first.put("A", b"wrapped-a")
    first.flush({0: (1, 5)})
    first.close()
    other = opened(path, "127.0.0.1:9093/other")
    assert other.get("A") is None
    assert other.offsets() == {}


def test_a_put_is_read_before_and_after_its_flush_and_the_latest_put_wins(tmp_path: Path) -> None:
    keys = opened(tmp_path / "keys.sqlite")
    keys.put("A", b"one")
    assert keys.get("A") == b"one"
    keys.flush()
    assert keys.get("A") == b"one"  # now from the cache
    keys.put("A", ERASED)
    assert keys.get("A") == ERASED
    keys.put("A", b"two")  # a key again after an erasure
    keys.flush()
    assert keys.get("A") == b"two"
    assert keys.holding(["A", "B"]) == {"A"}


def test_only_the_latest_erasures_are_kept(tmp_path: Path) -> None:
    keys = opened(tmp_path / "keys.sqlite", erased_kept=3)
    keys.put("kept", b"wrapped")
    for n in range(5):
        keys.put(f"E{n}", ERASED)
    keys.flush()
    assert [d for d in ("E0", "E1", "E2", "E3", "E4") if keys.get(d) == ERASED] == [
        "E2",
        "E3",
        "E4",
    ]
    keys.put("E2", ERASED)  # erased again: the latest now
    keys.put("E5", ERASED)
    keys.flush()
    assert [d for d in ("E2", "E3", "E4", "E5") if keys.get(d) == ERASED] == ["E2", "E4", "E5"]
    assert keys.get("kept") == b"wrapped"


def test_holding_answers_for_many_ids_those_with_a_key(tmp_path: Path) -> None:
    keys = opened(tmp_path / "keys.sqlite")
    for n in range(1_200):
        keys.put(f"D{n}", b"wrapped" if n % 3 else ERASED)
    keys.flush()
    keys.put("new", b"wrapped")  # not flushed yet
    keys.put("D1", ERASED)  # erased, not flushed yet
    asked = [f"D{n}" for n in range(1_200)] + ["new", "never"]
    expected = {f"D{n}" for n in range(1_200) if n % 3 and n != 1} | {"new"}
    assert keys.holding(asked) == expected


def test_processes_sharing_a_directory_keep_a_file_each(tmp_path: Path) -> None:
    one = KeyFile.in_directory(tmp_path, SOURCE, erased_kept=10, cached=4)
    two = KeyFile.in_directory(tmp_path, SOURCE, erased_kept=10, cached=4)
    one.put("A", b"of-one")
    one.flush({0: (1, 1)})
    assert two.get("A") is None
    one.close()
    started_again = KeyFile.in_directory(tmp_path, SOURCE, erased_kept=10, cached=4)
    assert started_again.get("A") == b"of-one"  # the slot the first one gave up
    two.close()
    started_again.close()
