"""A service's per-dossier state: in memory, kept in the service's own compacted changelog.

One `StateTable` per consuming service, handed to its `BatchConsumer` (`Service.consume(...,
state=table)`), which drives its life:

- **restore on assignment**: before the first record of a new assignment is handled, the table
  is replaced by the latest value of every key on the assigned partitions of the changelog
  (co-partitioned with the inputs, see `changelog.py`); what was not yet written is dropped,
  since the inputs that produced it were not committed and come again;
- **get / put / delete** while a poll is handled: `put` keeps the encoded state and marks the key
  unsaved (an unchanged encoding is not written again); `delete` forgets the key and writes a
  tombstone; decoded states are kept in a bounded cache beside their bytes; a handler attempt
  that fails is rolled back (`checkpoint` / `rollback`, called by the consumer);
- **write-then-commit**: after the handler returned, the consumer calls `save()`, which writes one
  record per unsaved key (acks=all), and only then commits the poll's offsets.

Keys are dossier ids (str); the changelog key is their UTF-8 bytes. A key that starts with
`RESERVED` (a control character, which no dossier id has: intake refuses them) is no state: a
service may write such records beside its states (metrics writes its folds there, so they are
ordered with the states of their partition); `restore` hands them to `on_reserved` instead of
keeping them.

`STATES_RETIRED` and `STATES_LIVE` are the figures of retirement (a dossier whose story is over
for a service leaves its table), labelled by service; each service keeps them up to date.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge

from services.common.changelog import Changelog, DecodedCache
from services.common.kafka import DurablePublisher
from services.common.settings import Settings
from services.common.topics import TopicSpec

S = TypeVar("S")
RESERVED = "\x00"

STATES_RETIRED = Counter(
    "motcua_states_retired_total",
    "Dossier states retired (their story over, grace passed)",
    ["service"],
)
STATES_LIVE = Gauge("motcua_states_live", "Dossier states held in memory", ["service"])


class StateTable(Generic[S]):
    """dossier id → its encoded state, as last written to (or restored from) the changelog."""

    def __init__(
        self,
        changelog: Changelog,
        *,
        encode: Callable[[S], bytes],
        decode: Callable[[str, bytes], S],
        cache_size: int = 0,
        on_reserved: Callable[[int, str, bytes], None] | None = None,
    ) -> None:
        self.changelog = changelog
        self._on_reserved = on_reserved
        self._encode = encode
        self._decode = decode
        self._raw: dict[str, bytes] = {}
        # keys changed (or deleted) since the last `save`
        self._unsaved: set[str] = set()
        self._decoded = DecodedCache(decode, cache_size)
        # since `checkpoint`: each key's bytes and unsaved mark before its first change
        self._before: dict[str, tuple[bytes | None, bool]] | None = None

    @classmethod
    def on_changelog(
        cls,
        settings: Settings,
        publisher: DurablePublisher,
        topic_name: str,
        *,
        encode: Callable[[S], bytes],
        decode: Callable[[str, bytes], S],
        cache_size: int = 0,
        on_reserved: Callable[[int, str, bytes], None] | None = None,
    ) -> StateTable[S]:
        """A table on the compacted changelog `topic_name`, written with `publisher` and
        co-partitioned with the service's inputs (`Service.state_table` builds it this way)."""
        changelog = Changelog(
            settings.kafka_bootstrap,
            TopicSpec(topic_name, settings.topic_partitions, compacted=True),
            publisher,
            replication=settings.topic_replication,
        )
        return cls(
            changelog, encode=encode, decode=decode, cache_size=cache_size, on_reserved=on_reserved
        )

    # --- reading ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._raw)

    def __contains__(self, key: object) -> bool:
        return key in self._raw

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._raw))

    def get(self, key: str) -> S | None:
        raw = self._raw.get(key)
        return None if raw is None else self._decoded.get(key, raw)

    def raw(self, key: str) -> bytes | None:
        """The state's bytes as written (a scan may test them before paying for a decode)."""
        return self._raw.get(key)

    def items_raw(self) -> list[tuple[str, bytes]]:
        """A snapshot of every (key, bytes); safe to iterate across awaits."""
        return list(self._raw.items())

    def decode(self, key: str, raw: bytes) -> S:
        """Decode bytes of this table without touching the cache (for whole-table scans)."""
        return self._decode(key, raw)

    def decoded(self, key: str, raw: bytes) -> S:
        """The state `raw` encodes: the table's own decoded state when it holds these very
        bytes (a reader of the changelog in the process that wrote it), else decoded."""
        held = self._raw.get(key)
        if held is not None and held == raw:
            return self._decoded.get(key, held)
        return self._decode(key, raw)

    @property
    def unsaved(self) -> frozenset[str]:
        return frozenset(self._unsaved)

    # --- changing --------------------------------------------------------------------------

    def put(self, key: str, state: S) -> bool:
        """Keep `state`; False (and nothing to write) when its encoding did not change."""
        encoded = self._encode(state)
        if self._raw.get(key) == encoded:
            return False
        self._remember(key)
        self._raw[key] = encoded
        self._unsaved.add(key)
        self._decoded.remember(key, encoded, state)
        return True

    def delete(self, key: str) -> None:
        """Forget `key`; the next `save` writes its tombstone."""
        if key in self._raw:
            self._remember(key)
            del self._raw[key]
            self._unsaved.add(key)
            self._decoded.forget(key)  # a retired state holds no memory, not even decoded

    # --- attempts --------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Start remembering what changes, so that `rollback` can undo it (the consumer calls
        this before every attempt of its handler)."""
        self._before = {}

    def rollback(self) -> None:
        """Undo every `put` and `delete` since the last `checkpoint`: a failed attempt leaves
        the table as it found it, and nothing of it is written."""
        for key, (raw, unsaved) in (self._before or {}).items():
            if raw is None:
                self._raw.pop(key, None)
            else:
                self._raw[key] = raw
            if unsaved:
                self._unsaved.add(key)
            else:
                self._unsaved.discard(key)
        self._before = {}

    def keep(self) -> None:
        """The attempt succeeded: keep its changes and stop remembering."""
        self._before = None

    def _remember(self, key: str) -> None:
        if self._before is not None and key not in self._before:
            self._before[key] = (self._raw.get(key), key in self._unsaved)

    # --- the changelog ---------------------------------------------------------------------

    async def save(self) -> None:
        """Write every unsaved key once (a tombstone for a deleted one); return when the broker
        acknowledged them all."""
        if not self._unsaved:
            return
        written = {key: self._raw.get(key) for key in self._unsaved}
        await self.changelog.write({key.encode(): value for key, value in written.items()})
        for key, value in written.items():
            if self._raw.get(key) is value:  # not changed again meanwhile
                self._unsaved.discard(key)

    async def restore(self, partitions: Collection[int]) -> None:
        """Replace the table by the latest states of `partitions` in the changelog; the records
        of reserved keys go to `on_reserved` (partition, key, value), in the order of the
        partition's offsets."""
        records = await self.changelog.read_by_partition(partitions)
        raw: dict[str, bytes] = {}
        for partition, latest in records.items():
            for key_bytes, value in latest.items():
                key = key_bytes.decode()
                if not key.startswith(RESERVED):
                    raw[key] = value
                elif self._on_reserved is not None:
                    self._on_reserved(partition, key, value)
        self._raw = raw
        self._unsaved = set()
        self._before = None
        self._decoded.clear()
