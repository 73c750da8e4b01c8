"""What a `DataKeys` holds in memory (services/common/data_keys.py): every process that opens
personal data follows `dossier.keys` whole, and the keys are in a file of its data directory;
the process holds the keys not in the file yet and its latest lookups, not a key per dossier."""

from __future__ import annotations

import gc
import tracemalloc
from pathlib import Path

import pytest

from services.common.data_keys import DataKeys, KeyErased
from services.common.sealing import Keks, new_data_key
from services.common.settings import DEV_KEK

KEKS = Keks.parse(DEV_KEK)
N = 3_000
CACHED = 100


class FollowedToTheEnd(DataKeys):
    """The keys as a follower that has read `dossier.keys` to its end holds them."""

    async def read_to_now(self) -> None:
        return None


async def test_keys_go_to_the_file_and_memory_holds_only_the_latest_lookups(
    tmp_path: Path,
) -> None:
    keys = FollowedToTheEnd(
        "127.0.0.1:1",
        KEKS,
        partitions=1,
        cached=CACHED,
        flush_seconds=0,  # every batch read goes to the file
        directory=tmp_path,
        source="test",
    )
    ids = [f"000.00.00.H29-20240304-{i:06d}" for i in range(N)]
    made = {d: new_data_key() for d in ids[:3]}
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for n, dossier_id in enumerate(ids):
            key = made.get(dossier_id) or new_data_key()
            keys.apply_written(dossier_id, KEKS.wrap(dossier_id, key).encode())
            if n % 500 == 499:
                keys.applied({0: (n + 1, 0)})  # a batch read back: into the file
        for dossier_id in ids:
            assert dossier_id in keys
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    # each of the latest lookups costs a few hundred bytes; the file's pages are not Python's
    assert held < CACHED * 1_000, f"{held} bytes held for {N} keys"
    for dossier_id, key in made.items():
        assert await keys.data_key(dossier_id) == key
    keys.apply_written(ids[0], None)
    with pytest.raises(KeyErased):
        await keys.data_key(ids[0])
    assert len(keys) == N - 1
