"""`dumps_kept`: the same JSON as `orjson.dumps`, in a bytes object no larger than its text."""

from __future__ import annotations

import tracemalloc

import orjson

from services.common.kept_json import dumps_kept

BODY = {"order_id": "VN000000001", "client_order_id": "D-1:pickup", "status_code": 2}


def test_the_same_bytes_held_at_their_own_size() -> None:
    assert dumps_kept(BODY) == orjson.dumps(BODY)
    tracemalloc.start()
    try:
        kept = [dumps_kept(BODY) for _ in range(1000)]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(kept) == 1000 and held < 1000 * 512  # orjson's own buffer is 4 KiB each
