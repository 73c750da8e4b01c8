"""The figures every metrics process answers with, whichever partitions it holds.

`Figures` is the sum of everything in the metrics changelog (`topics.METRICS_STATE_CHANGELOG`),
all partitions: the contributions of every live dossier state (`domain.contributions`) and the
folds of the retired ones (`rollups.Fold`). It is built record by record, in the order of each
partition, so it needs nothing but the topic:

- a state record replaces the dossier's previous contributions by the new ones (a tombstone
  removes them);
- a fold adds its sums and drops the live states it names, each by the digest of its bytes (the
  worker writes a fold before the tombstones of its dossiers, in the same partition, so those
  states were read just before; the tombstones that follow find nothing to remove).

The first read keeps each key's latest record and decodes only those, then applies the folds:
the same figures as record by record, at the cost of the live states.

Snapshots: the figures grow with time (a row per minute and cell), the changelog with history (on
a broker that does not compact, every version of every state; on any broker, every fold). So the
process that leads the metrics group writes the figures (`Figures.pairs`: the store's rows, the
live states' contributions, the changelog offset of each partition they stand at) to
`topics.METRICS_FIGURES_SNAPSHOTS` whenever the changelog grew since the last snapshot by more
than twice the live states (and `min_records`); a process starting reads the latest snapshot
and the changelog from its offsets on, so its start costs the figures and a bounded tail.

`FiguresFollower.follow()` (a task of the app) reads the topic from the beginning, then tails it
(a consumer of no group): `caught_up` once it has read up to the end offsets taken when it
started (the service's `/readyz` waits for it). When the broker goes away it keeps the figures it
has, builds them again from the beginning once the broker answers, and never ends the process.
Two processes that have read the same records answer the same figures.
"""

from __future__ import annotations

import asyncio
import gc
import zlib
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.structs import TopicPartition
from prometheus_client import Counter, Gauge

from services.common.following import assigned_consumer, follow_forever
from services.common.logging import get_logger
from services.common.snapshots import SnapshotStore
from services.common.state import RESERVED
from services.common.topics import TopicSpec
from services.metrics.domain import (
    OVERDUE_TYPE,
    DossierState,
    advance_watermark,
    contributions,
)
from services.metrics.rollups import InvalidFold, decode_fold, state_digest
from services.metrics.store import ROW_DTYPES, ColumnarStore, Packed, Rows

log = get_logger("motcua.metrics.figures")

SNAPSHOT_FORMAT = 4  # 2: every array zlib-compressed; 3: the online eligibility counters;
# 4: the live dossiers one JSON line each
PART_BYTES = 512 * 1024  # a snapshot's arrays are cut into records of this size

SNAPSHOTS_WRITTEN = Counter(
    "motcua_metrics_figures_snapshots_total", "Snapshots of the figures written by this process"
)
FROM_SNAPSHOT = Gauge(
    "motcua_metrics_figures_from_snapshot",
    "1 when this process's figures started from a snapshot, 0 when from the whole changelog",
)
SKIPPED = Counter(
    "motcua_metrics_records_skipped_total",
    "Records of the metrics changelog that are neither a state nor a fold",
)


class Figures:
    """The store of every dossier's counts, and what the dashboard says about the data."""

    def __init__(self, decode: Callable[[str, bytes], DossierState]) -> None:
        self._decode = decode
        self.store = ColumnarStore()
        # dossier id -> (digest of its state's bytes, its contributions packed by the store)
        self._live: dict[str, tuple[str, Packed[int]]] = {}
        self.watermark: datetime | None = None
        self.first_minute: datetime | None = None
        self.folds = 0

    @property
    def dossiers(self) -> int:
        """Dossiers whose per-dossier state is held (in progress, or closed lately)."""
        return len(self._live)

    def state(self, dossier_id: str, raw: bytes | None) -> None:
        """A state record (None: its tombstone)."""
        before = self._live.pop(dossier_id, None)
        if raw is None:
            if before is not None:
                self.store.apply_packed(before[1], -1)
            return
        state = self._decode(dossier_id, raw)
        if before is None:
            after = self.store.apply_and_pack(contributions(state))
        else:
            after = self.store.pack(contributions(state))
            self.store.apply_change(before[1], after)
        self._live[dossier_id] = (state_digest(raw), after)
        times = [fact.time for fact in state.facts if fact.type != OVERDUE_TYPE]
        if times:  # the facts are in the order of their times
            self._saw(times[0])
            self._saw(times[-1])

    def held(self, dossier_id: str, digest: str, packed: Packed[int]) -> None:
        """A live dossier whose contributions (packed by the store) the store's sums hold
        already (a snapshot's)."""
        self._live[dossier_id] = (digest, packed)

    def fold(self, partition: int, raw: bytes) -> None:
        """A fold: its sums in, the states it names out."""
        fold = decode_fold(partition, raw)
        self.store.apply(fold.deltas)
        for dossier_id, digest in fold.folded.items():
            before = self._live.get(dossier_id)
            if before is not None and before[0] == digest:  # not a later state of that dossier
                del self._live[dossier_id]
                self.store.apply_packed(before[1], -1)
        minutes = [cell.minute for cell, _ in fold.deltas]
        if minutes:  # the event times of the folded dossiers, to the minute
            self._saw(datetime.fromtimestamp(min(minutes) * 60, UTC))
            self._saw(datetime.fromtimestamp(max(minutes) * 60, UTC))
        self.folds += 1

    def record(self, partition: int, key: bytes | None, value: bytes | None) -> None:
        """Any record of the changelog."""
        if key is None:
            SKIPPED.inc()
            return
        name = key.decode(errors="replace")
        if not name.startswith(RESERVED):
            self.state(name, value or None)
            return
        if not value:
            return  # nothing tombstones a fold
        try:
            self.fold(partition, value)
        except InvalidFold as exc:
            SKIPPED.inc()
            log.warning("metrics_record_skipped", key=name[:80], reason=str(exc))

    def _saw(self, moment: datetime) -> None:
        self.watermark = advance_watermark(self.watermark, moment)
        if self.first_minute is None or moment < self.first_minute:
            self.first_minute = moment

    # --- snapshots -------------------------------------------------------------------------

    def pairs(self, offsets: Mapping[int, int]) -> Iterator[tuple[bytes, bytes]]:
        """The figures as (key, value) records of a snapshot, standing at changelog `offsets`
        (partition -> offset after the last record they hold)."""
        meta = {
            "format": SNAPSHOT_FORMAT,
            "offsets": {str(p): o for p, o in offsets.items()},
            "watermark": None if self.watermark is None else self.watermark.isoformat(),
            "first_minute": None if self.first_minute is None else self.first_minute.isoformat(),
            "folds": self.folds,
            "combos": self.store.combos,
        }
        yield b"meta", orjson.dumps(meta)
        # Everything is compressed before the first record leaves: the figures change between
        # the writes the records are sent in. The compressed pieces are cut into records as
        # they are sent, never joined whole.
        compressed = [*self._columns_compressed().items(), ("live", self._live_compressed())]
        for name, pieces in compressed:
            yield from _cut(name, pieces)

    def _columns_compressed(self) -> dict[str, list[bytes]]:
        """Each column of the store's rows (`Rows`), compressed as the days come, all in one
        pass over the days: the rows are never held a second time, whole, beside the store
        (sorted minutes, small counts: a tenth of the size)."""
        packers = [zlib.compressobj(1) for _ in Rows._fields]
        out: list[list[bytes]] = [[] for _ in Rows._fields]
        for day in self.store.day_rows():
            for packer, found, column in zip(packers, out, day, strict=True):
                found.append(packer.compress(np.ascontiguousarray(column).data))
        for packer, found in zip(packers, out, strict=True):
            found.append(packer.flush())
        return dict(zip(Rows._fields, out, strict=True))

    def _live_compressed(self) -> list[bytes]:
        """The live dossiers' contributions, one JSON line per dossier, compressed as they are
        written: neither side ever holds them all in clear, or parsed, at once."""
        packer = zlib.compressobj(1)
        out = []
        for dossier_id, (digest, packed) in self._live.items():
            cells = self.store.cells(packed)
            if piece := packer.compress(orjson.dumps([dossier_id, digest, cells]) + b"\n"):
                out.append(piece)
        out.append(packer.flush())
        return out

    @classmethod
    def from_pairs(
        cls, decode: Callable[[str, bytes], DossierState], records: Mapping[bytes, bytes]
    ) -> tuple[Figures, dict[int, int]]:
        """The figures of a snapshot's records, and the changelog offsets they stand at.
        Raises `InvalidFiguresSnapshot` when the records are not such a snapshot."""
        collecting = gc.isenabled()
        gc.disable()  # a few hundred thousand objects, none of them garbage
        try:
            return cls._from_pairs(decode, records)
        finally:
            if collecting:
                gc.enable()

    @classmethod
    def _from_pairs(
        cls, decode: Callable[[str, bytes], DossierState], records: Mapping[bytes, bytes]
    ) -> tuple[Figures, dict[int, int]]:
        try:
            meta = orjson.loads(records[b"meta"])
            if meta.get("format") != SNAPSHOT_FORMAT:
                raise InvalidFiguresSnapshot(f"format {meta.get('format')!r}")

            def parts(name: str) -> list[bytes]:
                found: list[bytes] = []
                while (part := records.get(f"{name}:{len(found)}".encode())) is not None:
                    found.append(part)
                return found

            columns = [_Column(parts(name), ROW_DTYPES[name]) for name in Rows._fields]

            def rows() -> Iterator[Rows]:
                """The rows a part at a time: never the whole history decompressed at once."""
                while True:
                    part = Rows(*(column.take(ROWS_PER_PART) for column in columns))
                    if (
                        not len(part.minute)
                        == len(part.combo)
                        == len(part.counter)
                        == len(part.value)
                    ):
                        raise InvalidFiguresSnapshot("rows of different lengths")
                    if not len(part.minute):
                        return
                    yield part

            figures = cls(decode)
            combos = [(str(a), str(t), str(s)) for a, t, s in meta["combos"]]
            figures.store = ColumnarStore.from_rows(combos, rows())
            # One dossier parsed at a time, packed at once: the load stands in about the memory
            # of what it keeps.
            for line in _lines(parts("live")):
                dossier_id, digest, cells = orjson.loads(line)
                figures.held(str(dossier_id), str(digest), figures.store.pack_cells(cells))
            if meta["watermark"] is not None:
                figures.watermark = datetime.fromisoformat(meta["watermark"])
            if meta["first_minute"] is not None:
                figures.first_minute = datetime.fromisoformat(meta["first_minute"])
            figures.folds = int(meta["folds"])
            offsets = {int(p): int(o) for p, o in meta["offsets"].items()}
        except (KeyError, TypeError, ValueError, orjson.JSONDecodeError, zlib.error) as exc:
            if isinstance(exc, InvalidFiguresSnapshot):
                raise
            raise InvalidFiguresSnapshot(f"{type(exc).__name__}: {str(exc)[:100]}") from None
        return figures, offsets


class InvalidFiguresSnapshot(ValueError):
    """Records of the figures' snapshot topic that are not a whole snapshot of figures."""


ROWS_PER_PART = 1 << 20  # rows a snapshot's load decompresses and adds to the store at a time


def _cut(name: str, pieces: list[bytes]) -> Iterator[tuple[bytes, bytes]]:
    """The `<name>:<index>` records of a snapshot's compressed stream, `PART_BYTES` each (the
    last one shorter), cut from its `pieces` as they are sent; the pieces are let go as they
    are cut."""
    part = bytearray()
    index = 0
    pieces.reverse()  # taken from the end: each piece is dropped once it is in a part
    while pieces:
        part += pieces.pop()
        while len(part) >= PART_BYTES:
            yield f"{name}:{index}".encode(), bytes(part[:PART_BYTES])
            del part[:PART_BYTES]
            index += 1
    if part:
        yield f"{name}:{index}".encode(), bytes(part)


def _lines(parts: list[bytes]) -> Iterator[bytes]:
    """The non-empty lines of a snapshot's compressed stream of JSON lines, decompressed a
    record at a time: never the whole stream in clear, or split, at once."""
    inflate = zlib.decompressobj()
    rest = b""
    for part in parts:
        lines = (rest + inflate.decompress(part)).split(b"\n")
        rest = lines.pop()
        yield from (line for line in lines if line)
    if parts and not inflate.eof:
        raise InvalidFiguresSnapshot("the live dossiers' records end inside their stream")
    if rest:
        yield rest


class _Column:
    """One column of a snapshot's rows: its compressed records, decompressed `take` values at
    a time."""

    def __init__(self, parts: list[bytes], dtype: type[np.generic]) -> None:
        self._parts = iter(parts)
        self._inflate = zlib.decompressobj()
        self._dtype = np.dtype(dtype)

    def take(self, count: int) -> npt.NDArray[Any]:
        """The next `count` values (fewer at the end of the column)."""
        wanted = count * self._dtype.itemsize
        out: list[bytes] = []
        while wanted > 0:
            data = self._inflate.unconsumed_tail or next(self._parts, b"")
            if not data:
                if not self._inflate.eof:
                    raise InvalidFiguresSnapshot("a column's records end inside its stream")
                break
            chunk = self._inflate.decompress(data, wanted)
            out.append(chunk)
            wanted -= len(chunk)
        raw = b"".join(out)
        if len(raw) % self._dtype.itemsize:
            raise InvalidFiguresSnapshot("a column ends inside a value")
        return np.frombuffer(raw, self._dtype)


class FiguresFollower:
    """This process's `Figures`, and the task that keeps them current."""

    def __init__(
        self,
        bootstrap: str,
        spec: TopicSpec,
        decode: Callable[[str, bytes], DossierState],
        *,
        replication: int = 1,
        poll_ms: int = 200,
        snapshots: SnapshotStore | None = None,
        leads: Callable[[], bool] = lambda: False,
        snapshot_min_records: int = 20_000,
    ) -> None:
        self._bootstrap = bootstrap
        self._spec = spec
        self._decode = decode
        self._replication = replication
        self._poll_ms = poll_ms
        self._snapshots = snapshots
        self._leads = leads
        self._snapshot_min_records = snapshot_min_records
        self.figures = Figures(decode)
        # the changelog offset after the last record `figures` holds, per partition: replaced
        # together with `figures`, advanced as records are applied
        self._offsets: dict[int, int] = {}
        self._since_snapshot = 0  # records applied since the last snapshot (or the start)
        self.caught_up = False
        self.from_snapshot = False  # the last catch-up started from a snapshot

    async def figures_read(self) -> bool:
        """Whether the first whole read of the changelog is done (a ready check)."""
        return self.caught_up

    async def follow(self) -> None:
        """Catch up, then tail the changelog until cancelled; start again after any failure."""
        await follow_forever(self._catch_up_and_tail, name="figures_follower")

    async def _catch_up_and_tail(self, caught_up: Callable[[], None]) -> None:
        async with assigned_consumer(
            self._bootstrap,
            self._spec,
            self._replication,
            poll_ms=self._poll_ms,
            max_partition_fetch_bytes=8 * 1024 * 1024,
        ) as (consumer, tps):
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            snapshot = await self._latest_snapshot({tp.partition: ends[tp] for tp in tps})
            if snapshot is not None:
                figures, offsets = snapshot
                for tp in tps:
                    consumer.seek(tp, min(offsets.get(tp.partition, 0), ends[tp]))
                behind = {tp for tp in tps if ends[tp] > offsets.get(tp.partition, 0)}
                tail = 0
                while behind:
                    batch = await consumer.getmany(*tps, timeout_ms=500, max_records=20_000)
                    tail += self._apply(figures, offsets, batch)
                    for tp in list(behind):
                        if await consumer.position(tp) >= ends[tp]:
                            behind.discard(tp)
                    await asyncio.sleep(0)
            else:
                figures, offsets = await self._read_whole(consumer, tps, ends)
                tail = 0
            self.figures, self._offsets = figures, offsets
            self._since_snapshot = tail if snapshot is not None else sum(offsets.values())
            self.from_snapshot = snapshot is not None
            FROM_SNAPSHOT.set(1 if self.from_snapshot else 0)
            if not self.caught_up:
                log.info(
                    "figures_caught_up",
                    dossiers=self.figures.dossiers,
                    folds=self.figures.folds,
                    partitions=len(tps),
                    from_snapshot=self.from_snapshot,
                )
            self.caught_up = True
            caught_up()
            while True:
                batch = await consumer.getmany(timeout_ms=self._poll_ms, max_records=20_000)
                self._since_snapshot += self._apply(self.figures, self._offsets, batch)

    async def _read_whole(
        self,
        consumer: AIOKafkaConsumer,
        tps: list[TopicPartition],
        ends: Mapping[TopicPartition, int],
    ) -> tuple[Figures, dict[int, int]]:
        """The figures of the whole changelog. The first read keeps each key's latest record
        and decodes only those: every version of every state ever written is on a broker that
        does not compact."""
        latest: dict[tuple[int, bytes], bytes] = {}
        folds: list[tuple[int, bytes]] = []
        offsets: dict[int, int] = {}
        behind = {tp for tp in tps if ends[tp] > 0}
        while behind:
            batch = await consumer.getmany(*tps, timeout_ms=500, max_records=20_000)
            for tp, records in batch.items():
                for record in records:
                    _keep(latest, folds, tp.partition, record.key, record.value)
                if records:
                    offsets[tp.partition] = records[-1].offset + 1
            for tp in list(behind):
                if await consumer.position(tp) >= ends[tp]:
                    behind.discard(tp)
        return await self._built(latest, folds), offsets

    async def _built(
        self, latest: dict[tuple[int, bytes], bytes], folds: list[tuple[int, bytes]]
    ) -> Figures:
        """The figures of the latest states, then the folds (each drops the very state it took,
        when its tombstone was not written yet)."""
        figures = Figures(self._decode)
        for count, ((partition, key), raw) in enumerate(latest.items(), start=1):
            figures.record(partition, key, raw)
            if count % 5000 == 0:
                await asyncio.sleep(0)  # stay responsive (/healthz, the consumer's heartbeats)
        for partition, raw in folds:
            figures.record(partition, f"{RESERVED}fold".encode(), raw)
        return figures

    @staticmethod
    def _apply(
        figures: Figures,
        offsets: dict[int, int],
        batch: Mapping[TopicPartition, list[ConsumerRecord[bytes, bytes]]],
    ) -> int:
        applied = 0
        for tp, records in batch.items():
            for record in records:
                figures.record(tp.partition, record.key, record.value)
            if records:
                offsets[tp.partition] = records[-1].offset + 1
                applied += len(records)
        return applied

    # --- snapshots -------------------------------------------------------------------------

    async def _latest_snapshot(
        self, ends: Mapping[int, int]
    ) -> tuple[Figures, dict[int, int]] | None:
        """The latest snapshot of the figures, unless there is none or it is not whole, or it
        names records of a partition that is empty now (an earlier topic of that name)."""
        if self._snapshots is None:
            return None
        found = (await self._snapshots.latest([0])).get(0)
        if found is None:
            return None
        try:
            figures, offsets = Figures.from_pairs(self._decode, found.records)
        except InvalidFiguresSnapshot as exc:
            log.warning("figures_snapshot_unusable", reason=str(exc))
            return None
        if any(offset > 0 and ends.get(p, 0) == 0 for p, offset in offsets.items()):
            log.warning("figures_snapshot_of_empty_changelog")
            return None
        return figures, offsets

    def snapshot_due(self) -> bool:
        """Caught up, leading the group, and the changelog grew since the last snapshot by more
        than twice the live states (and by at least `snapshot_min_records`)."""
        if self._snapshots is None or not self.caught_up or not self._leads():
            return False
        bound = max(self._snapshot_min_records, 2 * self.figures.dossiers)
        return self._since_snapshot >= bound

    async def snapshot_if_due(self) -> None:
        """Write a snapshot of the figures when one is due (a timer of the app)."""
        if not self.snapshot_due():
            return
        assert self._snapshots is not None
        applied = self._since_snapshot
        # built without an await: the figures and their offsets as they stand together
        records = list(self.figures.pairs(self._offsets))
        await self._snapshots.write(0, 0, records)
        self._since_snapshot -= applied
        SNAPSHOTS_WRITTEN.inc()
        log.info(
            "figures_snapshot_written",
            dossiers=self.figures.dossiers,
            folds=self.figures.folds,
            bytes=sum(len(v) for _, v in records),
        )


def _keep(
    latest: dict[tuple[int, bytes], bytes],
    folds: list[tuple[int, bytes]],
    partition: int,
    key: bytes | None,
    value: bytes | None,
) -> None:
    """A record of the first read: a fold kept in order, a state's latest version by key."""
    if key is None:
        return
    if key.startswith(RESERVED.encode()):
        if value:
            folds.append((partition, value))
    elif value:
        latest.pop((partition, key), None)
        latest[(partition, key)] = value
    else:
        latest.pop((partition, key), None)
