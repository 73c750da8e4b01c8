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
  record per unsaved key (acks=all), and only then commits the poll's offsets;
- **snapshots**: after a commit the consumer calls `write_snapshots()`: a partition whose
  changelog grew since its last snapshot by more than twice its live keys (and at least
  `snapshot_min_records`) gets a new one (`snapshots.py`), so that a restore reads the live
  states and a bounded tail, never the whole history.

Keys are dossier ids (str); the changelog key is their UTF-8 bytes. A key that starts with
`RESERVED` (a control character, which no dossier id has: intake refuses them) is no state: a
service may write such records beside its states (metrics writes its folds there, so they are
ordered with the states of their partition); `restore` hands them to `on_reserved` instead of
keeping them. Of the reserved records, a snapshot keeps the latest one of its partition
(`write_reserved` writes one and remembers it): what metrics needs again after a restore.

`STATES_RETIRED` and `STATES_LIVE` are the figures of retirement (a dossier whose story is over
for a service leaves its table), labelled by service; each service keeps them up to date.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from typing import Generic, TypeVar

from prometheus_client import Counter, Gauge

from services.common.changelog import Changelog, DecodedCache
from services.common.kafka import DurablePublisher, dossier_partition
from services.common.kept_json import right_sized
from services.common.logging import get_logger
from services.common.settings import Settings
from services.common.snapshots import SnapshotStore, snapshot_spec
from services.common.topics import TopicSpec

S = TypeVar("S")
RESERVED = "\x00"
SNAPSHOT_MIN_RECORDS = 20_000

log = get_logger("motcua.state")

STATES_RETIRED = Counter(
    "motcua_states_retired_total",
    "Dossier states retired (their story over, grace passed)",
    ["service"],
)
STATES_LIVE = Gauge("motcua_states_live", "Dossier states held in memory", ["service"])
SNAPSHOTS_WRITTEN = Counter(
    "motcua_state_snapshots_total", "Snapshots of a changelog partition written", ["topic"]
)


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
        snapshot_min_records: int = SNAPSHOT_MIN_RECORDS,
    ) -> None:
        self.changelog = changelog
        self._on_reserved = on_reserved
        self._snapshot_min_records = snapshot_min_records
        # per restored partition: the changelog offset after its last record, that of its
        # latest snapshot, and its latest reserved record
        self._next: dict[int, int] = {}
        self._snapshot_upto: dict[int, int] = {}
        self._reserved_last: dict[int, tuple[bytes, bytes]] = {}
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
        """A table on the compacted changelog `topic_name` and its snapshots, written with
        `publisher` and co-partitioned with the service's inputs (`Service.state_table` builds
        it this way)."""
        spec = TopicSpec(topic_name, settings.topic_partitions, compacted=True)
        changelog = Changelog(
            settings.kafka_bootstrap,
            spec,
            publisher,
            replication=settings.topic_replication,
            snapshots=SnapshotStore(
                settings.kafka_bootstrap,
                snapshot_spec(spec),
                publisher,
                replication=settings.topic_replication,
            ),
        )
        return cls(
            changelog,
            encode=encode,
            decode=decode,
            cache_size=cache_size,
            on_reserved=on_reserved,
            snapshot_min_records=settings.state_snapshot_min_records,
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

    def readable(self) -> Iterator[tuple[str, S]]:
        """Every (key, state) held, decoded without touching the cache (a worker's indexes
        rebuilt after a restore). A state that does not decode is left as it is, and logged:
        the next input for it fails and is dead-lettered."""
        for key, raw in self.items_raw():
            try:
                state = self._decode(key, raw)
            except Exception:
                log.warning("unreadable_state", dossier_id=key)
                continue
            yield key, state

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
        encoded = right_sized(encoded)  # held until the next change: no spare buffer with it
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
        after = await self.changelog.write({key.encode(): value for key, value in written.items()})
        for partition, offset in after.items():
            self._next[partition] = max(self._next.get(partition, 0), offset)
        for key, value in written.items():
            if self._raw.get(key) is value:  # not changed again meanwhile
                self._unsaved.discard(key)

    def last_reserved(self) -> dict[int, bytes]:
        """Each restored partition's latest reserved record (its value), as restored or
        written since: what a snapshot of the partition keeps of them."""
        return {p: value for p, (_, value) in self._reserved_last.items()}

    async def write_reserved(self, partition: int, key: str, value: bytes) -> None:
        """Write a record of a reserved key (see the module) to `partition`; return once
        acknowledged. The partition's snapshots keep the latest such record."""
        if not key.startswith(RESERVED):
            raise ValueError("a reserved record's key starts with RESERVED")
        after = await self.changelog.write_to(partition, key.encode(), value)
        self._next[partition] = max(self._next.get(partition, 0), after)
        self._reserved_last[partition] = (key.encode(), value)

    async def restore(self, partitions: Collection[int]) -> None:
        """Replace the table by the latest states of `partitions` in the changelog (from their
        snapshots on); the records of reserved keys go to `on_reserved` (partition, key,
        value), in the order of the partition's offsets."""
        read = await self.changelog.read_by_partition(partitions)
        raw: dict[str, bytes] = {}
        self._next, self._snapshot_upto, self._reserved_last = {}, {}, {}
        for partition, found in read.items():
            self._next[partition] = found.next_offset
            self._snapshot_upto[partition] = found.snapshot_upto
            for key_bytes, value in found.latest.items():
                key = key_bytes.decode()
                if not key.startswith(RESERVED):
                    raw[key] = value
                    continue
                self._reserved_last[partition] = (key_bytes, value)
                if self._on_reserved is not None:
                    self._on_reserved(partition, key, value)
        self._raw = raw
        self._unsaved = set()
        self._before = None
        self._decoded.clear()

    def snapshots_due(self) -> list[int]:
        """The partitions whose changelog grew since their last snapshot by more than twice
        their share of the live states, and by at least `snapshot_min_records`."""
        if not self._next or self.changelog.snapshots is None:
            return []
        share = len(self._raw) / len(self._next)
        bound = max(self._snapshot_min_records, 2 * share)
        return sorted(
            p for p, after in self._next.items() if after - self._snapshot_upto.get(p, 0) >= bound
        )

    async def write_snapshots(self) -> None:
        """Write a snapshot of every partition due (nothing while some state is unsaved: a
        snapshot holds exactly what the changelog holds up to its offset)."""
        due = self.snapshots_due()
        if not due or self._unsaved:
            return
        count = self.changelog.spec.partitions
        by_partition: dict[int, list[tuple[bytes, bytes]]] = {p: [] for p in due}
        for key, value in self._raw.items():
            encoded = key.encode()
            held = by_partition.get(dossier_partition(encoded, count))
            if held is not None:
                held.append((encoded, value))
        for partition in due:
            records = by_partition[partition]
            if partition in self._reserved_last:
                records.append(self._reserved_last[partition])
            upto = self._next[partition]
            keys = await self.changelog.snapshot(partition, upto, records)
            self._snapshot_upto[partition] = upto
            SNAPSHOTS_WRITTEN.labels(self.changelog.topic).inc()
            log.info(
                "state_snapshot_written",
                topic=self.changelog.topic,
                partition=partition,
                keys=keys,
                upto=upto,
            )
