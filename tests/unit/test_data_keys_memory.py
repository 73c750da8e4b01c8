"""What a `DataKeys` holds per dossier (services/common/data_keys.py): every process that
opens personal data follows `dossier.keys` whole, so its memory is bytes per key times keys."""

from __future__ import annotations

import gc
import tracemalloc

import pytest

from services.common.data_keys import DataKeys, KeyErased
from services.common.sealing import Keks, new_data_key
from services.common.settings import DEV_KEK

KEKS = Keks.parse(DEV_KEK)
N = 2_000


class FollowedToTheEnd(DataKeys):
    """The keys as a follower that has read `dossier.keys` to its end holds them."""

    async def read_to_now(self) -> None:
        return None


async def test_a_key_intake_writes_is_held_in_a_few_hundred_bytes_and_still_opens() -> None:
    """Intake folds in the keys it writes as `WrappedKey.encode` made them (orjson output, in a
    4 KiB buffer): what is held per key stays the size of the key, as for one read back."""
    keys = FollowedToTheEnd("127.0.0.1:1", KEKS, partitions=1)
    ids = [f"000.00.00.H29-20240304-{i:06d}" for i in range(N)]
    made = {d: new_data_key() for d in ids[:3]}
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for dossier_id in ids:
            key = made.get(dossier_id) or new_data_key()
            keys.apply_written(dossier_id, KEKS.wrap(dossier_id, key).encode())
        gc.collect()
        per_key = (tracemalloc.get_traced_memory()[0] - before) / N
    finally:
        tracemalloc.stop()
    assert per_key < 300, f"{per_key:.0f} bytes held per key"
    for dossier_id, key in made.items():
        assert await keys.data_key(dossier_id) == key
    keys.apply_written(ids[0], None)
    with pytest.raises(KeyErased):
        await keys.data_key(ids[0])
