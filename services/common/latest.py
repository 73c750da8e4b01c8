"""A record of the latest keys seen, at most a given number: adding one that is there makes it
the latest again, and past the bound the oldest go first. Pure."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class LatestKeys(Generic[K]):
    def __init__(self, most: int) -> None:
        self.most = most
        self._keys: OrderedDict[K, None] = OrderedDict()

    def add(self, keys: Iterable[K]) -> None:
        for key in keys:
            self._keys[key] = None
            self._keys.move_to_end(key)
        while len(self._keys) > self.most:
            self._keys.popitem(last=False)

    def discard(self, key: K) -> None:
        self._keys.pop(key, None)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __len__(self) -> int:
        return len(self._keys)
