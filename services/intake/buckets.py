"""The rate bucket of each portal source (CONTRACT section 4's 429s), with its portal's limits."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from services.common.coordination import TokenBucket
from services.common.portal_keys_view import PortalKeys


class PortalBuckets(Mapping[str, TokenBucket]):
    """The rate bucket of each portal source, made the first time the source is seen, with the
    rate and burst of its portal (`Portal`'s defaults for a portal of `portal.keys` alone)."""

    def __init__(self, keys: PortalKeys, make: Callable[[float, int], TokenBucket]) -> None:
        self._keys = keys
        self._make = make
        self._buckets: dict[str, TokenBucket] = {}

    def __getitem__(self, source: str) -> TokenBucket:
        bucket = self._buckets.get(source)
        if bucket is None:
            rate, burst = self._keys.table.limits(source)
            bucket = self._buckets[source] = self._make(rate, burst)
        return bucket

    def __iter__(self) -> Iterator[str]:
        return iter(self._buckets)

    def __len__(self) -> int:
        return len(self._buckets)
