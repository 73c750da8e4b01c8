"""JSON bytes to keep: `orjson.dumps` leaves its output in a buffer of at least 4 KiB (orjson
3.12 on; `sys.getsizeof` shows only the length), so a small body held across an await, in a
queue or in a cache costs that much. `dumps_kept` copies it into a bytes object of its own
length (`right_sized` does it for bytes already made). Use it for a body that outlives the call
that made it; a reply sent at once needs no copy. Pure."""

from __future__ import annotations

from typing import Any

import orjson


def right_sized(raw: bytes) -> bytes:
    """`raw` in a bytes object of its own length (a copy: `bytes(raw)` would be `raw` itself)."""
    return bytes(memoryview(raw))


def dumps_kept(value: Any) -> bytes:
    """`orjson.dumps(value)`, right-sized."""
    return right_sized(orjson.dumps(value))
