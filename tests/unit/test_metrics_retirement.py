"""Retirement in metrics: closed dossiers leave the worker's states, folded into the changelog,
and the figures every process reads from that changelog stay exact.

The worker runs as the batch consumer drives it (handler, then `save`) on a changelog kept in a
list (`LogChangelog`, a fake with the real one's partitioning); `Figures` reads that list in
order, as `FiguresFollower` reads the topic. The expected figures are recounted straight from the
distinct events (`naive_summary`).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.common.changelog import PartitionRead
from services.common.events import CloudEvent
from services.common.kafka import dossier_partition
from services.common.state import StateTable
from services.common.topics import TopicSpec
from services.metrics import figures as figures_module
from services.metrics import worker as worker_module
from services.metrics.codec import decode_state, encode_state
from services.metrics.domain import (
    Cell,
    DossierState,
    RetirePolicy,
    derive,
    event_from_envelope,
    fact_of,
    retire_after,
)
from services.metrics.figures import Figures, FiguresFollower, InvalidFiguresSnapshot, _keep
from services.metrics.rollups import decode_fold
from services.metrics.settings import MetricsSettings
from services.metrics.worker import FOLD_PREFIX, MetricsWorker
from tests.support.metrics_stream import stream
from tests.unit.test_metrics_domain import naive_summary

PARTITIONS = 4
RANGES = [
    (datetime(2019, 1, 1, tzinfo=UTC), datetime(2019, 12, 1, tzinfo=UTC)),
    (datetime(2019, 2, 3, 10, 17, tzinfo=UTC), datetime(2019, 2, 20, 15, 43, tzinfo=UTC)),
]
POLICY = RetirePolicy(after=timedelta(days=14), idle_after=timedelta(days=90))


class LogChangelog:
    """The changelog as a list of (partition, key, value), partitioned as the producer does."""

    def __init__(self) -> None:
        self.spec = TopicSpec("metrics-changelog", PARTITIONS, compacted=True)
        self.snapshots = None
        self.records: list[tuple[int, bytes, bytes | None]] = []

    def _after(self, partition: int) -> int:
        return sum(1 for p, _, _ in self.records if p == partition)

    async def write(self, records: Mapping[bytes, bytes | None]) -> dict[int, int]:
        for key, value in records.items():
            self.records.append((dossier_partition(key, PARTITIONS), key, value))
        return {p: self._after(p) for p in {dossier_partition(k, PARTITIONS) for k in records}}

    async def write_to(self, partition: int, key: bytes, value: bytes) -> int:
        self.records.append((partition, key, value))
        return self._after(partition)

    async def read_by_partition(self, partitions: Collection[int]) -> dict[int, PartitionRead]:
        out: dict[int, dict[bytes, bytes]] = {p: {} for p in partitions}
        for partition, key, value in self.records:
            if partition in out:
                if value:
                    out[partition].pop(key, None)
                    out[partition][key] = value
                else:
                    out[partition].pop(key, None)
        return {p: PartitionRead(latest, self._after(p)) for p, latest in out.items()}


def worker_on(log: LogChangelog, **settings: Any) -> MetricsWorker:
    table: StateTable[DossierState] = StateTable(
        log,  # type: ignore[arg-type]  # the fake has what StateTable uses
        encode=encode_state,
        decode=decode_state,
    )
    metrics = MetricsSettings(retire_interval_seconds=0, **settings)

    async def publish(events: Sequence[CloudEvent[Any]]) -> None:
        return None

    return MetricsWorker(table, metrics, publish, partitions=PARTITIONS)


def figures_of(log: LogChangelog) -> Figures:
    figures = Figures(decode_state)
    for partition, key, value in log.records:
        figures.record(partition, key, value)
    return figures


def expected(events: list[CloudEvent[Any]]) -> list[dict[str, Any]]:
    domain = [event_from_envelope(e.to_dict()) for e in events]
    return [naive_summary(domain, a, b) for a, b in RANGES]


def answered(figures: Figures) -> list[dict[str, Any]]:
    return [figures.store.summary(a, b) for a, b in RANGES]


def batches(events: list[CloudEvent[Any]], size: int) -> list[list[CloudEvent[Any]]]:
    return [events[i : i + size] for i in range(0, len(events), size)]


def test_retire_after_waits_for_the_end_of_the_story() -> None:
    [events] = stream(1, seed=3)
    domain = [event_from_envelope(e.to_dict()) for e in events]
    facts = [f for f in (fact_of(e) for e in domain) if f is not None]
    assert retire_after(derive("d", []), POLICY) is None
    for cut in range(1, len(facts) + 1):
        state = derive("d", facts[:cut])
        grace = retire_after(state, POLICY)
        if state.status in ("returned", "withdrawn", "rejected"):
            assert grace == POLICY.after
        elif state.status in ("resolved", "unknown"):
            assert grace == POLICY.idle_after
        else:  # submitted, received, waiting for a supplement: in progress
            assert grace is None, state.status


def fold_sizes(log: LogChangelog) -> list[int]:
    """How many dossiers each fold written to the changelog takes."""
    return [
        len(decode_fold(partition, value).folded)
        for partition, key, value in log.records
        if value is not None and key.startswith(FOLD_PREFIX.encode())
    ]


@pytest.mark.parametrize(("seed", "fold_most"), [(1, 1000), (2, 1000), (3, 4)])
def test_figures_stay_exact_while_closed_dossiers_retire(
    seed: int, fold_most: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With `fold_most` 4, most steps find more closed dossiers due in a partition than one fold
    takes: the rest retire at the next steps."""
    monkeypatch.setattr(worker_module, "FOLD_MOST", fold_most)
    rng = random.Random(seed)
    events = [e for lifecycle in stream(300, seed=seed) for e in lifecycle]
    events.sort(key=lambda e: e.time)
    log = LogChangelog()
    worker = worker_on(log, retire_after_seconds=0.0, retire_idle_after_seconds=0.0)

    async def run() -> None:
        for batch in batches(events, rng.randint(20, 80)):
            await worker.on_batch(batch)
            await worker.states.save()
        for _ in range(300 // fold_most + 2):  # those closed in the last batches retire next
            await worker.on_batch([])
            await worker.states.save()

    asyncio.run(run())
    sizes = fold_sizes(log)
    assert sizes and max(sizes) <= fold_most
    if fold_most == 4:
        assert sizes.count(4) > 10, sizes  # the cap was met, again and again
    figures = figures_of(log)
    assert answered(figures) == expected(events)
    # closed dossiers left: what is held is what is still in progress
    assert 0 < len(worker.states) < 300
    for dossier_id in worker.states:
        state = worker.states.get(dossier_id)
        assert state is not None and retire_after(state, POLICY) is None
    assert figures.dossiers == len(worker.states)
    assert figures.folds > 0


class FailingOnce(LogChangelog):
    """A changelog whose second fold write of a step fails once (the broker away then)."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.writes = 0
        self.failed = False

    async def write_to(self, partition: int, key: bytes, value: bytes) -> int:
        self.writes += self.armed
        if self.writes == 2 and not self.failed:
            self.failed = True
            raise ConnectionError("the broker went away")
        return await super().write_to(partition, key, value)


def test_a_fold_that_fails_leaves_its_partition_and_the_next_ones_to_retire_later() -> None:
    events = [e for lifecycle in stream(200, seed=6) for e in lifecycle]
    events.sort(key=lambda e: e.time)
    log = FailingOnce()
    worker = worker_on(log, retire_after_seconds=0.0, retire_idle_after_seconds=0.0)

    async def run() -> None:
        for batch in batches(events, 50):
            await worker.on_batch(batch)  # the closed dossiers of the batch before retire
            await worker.states.save()
        log.armed = True  # the last batch's closed dossiers: the second partition's fold fails
        with pytest.raises(ConnectionError):
            await worker.on_batch([])
        await worker.states.save()  # the first partition's fold took its dossiers
        for _ in range(3):
            await worker.on_batch([])
            await worker.states.save()

    asyncio.run(run())
    assert log.failed
    figures = figures_of(log)
    assert answered(figures) == expected(events)
    for dossier_id in worker.states:  # every closed dossier retired, the failed ones too
        state = worker.states.get(dossier_id)
        assert state is not None and retire_after(state, POLICY) is None


def test_a_worker_stopped_between_a_fold_and_its_tombstones_folds_nothing_twice() -> None:
    events = [e for lifecycle in stream(200, seed=5) for e in lifecycle]
    events.sort(key=lambda e: e.time)
    log = LogChangelog()
    first = worker_on(log, retire_after_seconds=0.0, retire_idle_after_seconds=0.0)
    half = len(events) // 2

    async def crash_after_a_fold() -> None:
        for batch in batches(events[:half], 50):
            await first.on_batch(batch)
            await first.states.save()
        # the last batch: its fold is written, then the process dies before `save`
        await first.on_batch(events[half : half + 50])

    asyncio.run(crash_after_a_fold())
    folded_but_alive = [k for p, k, v in log.records[-1:] if k.startswith(b"\x00fold:")]
    assert folded_but_alive, "the last record is a fold whose tombstones were never written"

    second = worker_on(log, retire_after_seconds=0.0, retire_idle_after_seconds=0.0)

    async def restart_and_finish() -> None:
        await second.states.restore(range(PARTITIONS))
        await second.after_restore(frozenset())
        for batch in batches(events[half:], 50):  # the uncommitted batch comes again
            await second.on_batch(batch)
            await second.states.save()

    asyncio.run(restart_and_finish())
    assert answered(figures_of(log)) == expected(events)


def test_a_late_event_for_a_retired_dossier_counts_once_from_then_on() -> None:
    [events] = stream(1, seed=8)
    events.sort(key=lambda e: e.time)
    log = LogChangelog()
    worker = worker_on(log, retire_after_seconds=0.0, retire_idle_after_seconds=0.0)
    late = events[-1].model_copy(
        update={"id": "late-report", "type": "sms.delivered", "time": events[-1].time}
    )

    async def run() -> None:
        await worker.on_batch(events)
        await worker.states.save()
        await worker.on_batch([])  # retirement at the end of the next batch
        await worker.states.save()
        assert len(worker.states) == 0
        await worker.on_batch([late])
        await worker.states.save()

    asyncio.run(run())
    figures = figures_of(log)
    assert answered(figures) == expected([*events, late])
    assert figures.dossiers == 1  # the late event's dossier, held again


def first_read_of(log: LogChangelog) -> Figures:
    """What `FiguresFollower` builds on its first read: latest records, then the folds."""
    latest: dict[tuple[int, bytes], bytes] = {}
    folds: list[tuple[int, bytes]] = []
    for partition, key, value in log.records:
        _keep(latest, folds, partition, key, value)
    follower = FiguresFollower("127.0.0.1:1", log.spec, decode_state)
    return asyncio.run(follower._built(latest, folds))


def test_the_first_read_builds_the_figures_record_by_record_reading_builds() -> None:
    events = [e for lifecycle in stream(200, seed=9) for e in lifecycle]
    events.sort(key=lambda e: e.time)
    log = LogChangelog()
    worker = worker_on(log, retire_after_seconds=0.0, retire_idle_after_seconds=0.0)
    half = len(events) // 2

    async def run() -> None:
        for batch in batches(events[:half], 40):
            await worker.on_batch(batch)
            await worker.states.save()
        await worker.on_batch(events[half : half + 40])  # a fold whose tombstones never came

    asyncio.run(run())
    assert log.records[-1][1].startswith(b"\x00fold:")
    want = expected(events[:half])  # the last batch itself was never written
    assert answered(figures_of(log)) == want
    assert answered(first_read_of(log)) == want
    assert first_read_of(log).dossiers == figures_of(log).dossiers


def test_figures_from_a_snapshot_and_the_tail_equal_those_of_the_whole_changelog() -> None:
    events = [e for lifecycle in stream(300, seed=11) for e in lifecycle]
    events.sort(key=lambda e: e.time)
    log = LogChangelog()
    worker = worker_on(log, retire_after_seconds=0.0, retire_idle_after_seconds=0.0)
    half = len(events) // 2

    async def run(part: list[CloudEvent[Any]]) -> None:
        for batch in batches(part, 40):
            await worker.on_batch(batch)
            await worker.states.save()

    asyncio.run(run(events[:half]))
    at_snapshot = {p: log._after(p) for p in range(PARTITIONS)}
    snapshot = dict(figures_of(log).pairs(at_snapshot))
    asyncio.run(run(events[half:]))

    restored, offsets = Figures.from_pairs(decode_state, snapshot)
    assert offsets == at_snapshot
    seen: dict[int, int] = {}
    for partition, key, value in log.records:  # the tail: what came after the snapshot
        seen[partition] = seen.get(partition, 0) + 1
        if seen[partition] > offsets[partition]:
            restored.record(partition, key, value)

    whole = figures_of(log)
    assert restored.folds == whole.folds > 0
    assert answered(restored) == answered(whole) == expected(events)
    for start, end in RANGES:
        for by in ("agency_code", "sector", "tier"):
            assert restored.store.breakdown(by, start, end) == whole.store.breakdown(by, start, end)
    assert restored.dossiers == whole.dossiers
    assert (restored.watermark, restored.first_minute) == (whole.watermark, whole.first_minute)


def test_records_that_are_no_figures_snapshot_are_refused() -> None:
    figures = Figures(decode_state)
    records = dict(figures.pairs({0: 0}))
    Figures.from_pairs(decode_state, records)  # an empty one is whole
    with pytest.raises(InvalidFiguresSnapshot):
        Figures.from_pairs(decode_state, {})
    with pytest.raises(InvalidFiguresSnapshot):
        Figures.from_pairs(decode_state, {**records, b"meta": b'{"format": 7}'})
    with pytest.raises(InvalidFiguresSnapshot):
        Figures.from_pairs(decode_state, {**records, b"minute:0": b"\x00" * 8})


def test_a_snapshot_read_a_few_rows_at_a_time_holds_every_row_and_refuses_a_cut_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows written a day at a time and read back 7 at a time, from records of 64 bytes: the
    same store; a column that ends inside a value, or shorter than the others, is refused."""
    rnd = random.Random(5)
    figures = Figures(decode_state)
    for _ in range(300):
        minute = 25_000_000 + rnd.randrange(20 * 1440)
        agency = rnd.choice(["000.00.01.H34", "000.00.02.H34", "000.00.03.H34"])
        figures.store.apply({(Cell(minute, agency, "province", "land"), "received"): 1})
    for number in range(40):  # live dossiers: their lines span many records
        cells = [[25_000_000 + number, "000.00.01.H34", "province", "land", "received", 1]]
        figures.held(f"D-{number}", f"digest-{number}", figures.store.pack_cells(cells))
    monkeypatch.setattr(figures_module, "PART_BYTES", 64)
    monkeypatch.setattr(figures_module, "ROWS_PER_PART", 7)
    records = dict(figures.pairs({0: 0}))
    assert len([k for k in records if k.startswith(b"minute:")]) > 1
    for name in (b"minute", b"combo", b"counter", b"value", b"live"):
        sizes = [len(v) for k, v in records.items() if k.split(b":")[0] == name]
        assert sizes and all(size == 64 for size in sizes[:-1]) and 0 < sizes[-1] <= 64

    restored, _ = Figures.from_pairs(decode_state, records)

    def rows(f: Figures) -> list[tuple[int, int, int, int]]:
        return [
            (int(m), int(c), int(k), int(v))
            for part in f.store.day_rows()
            for m, c, k, v in zip(*part, strict=True)
        ]

    assert len(rows(figures)) > 250
    assert rows(restored) == rows(figures)
    assert restored.store.combos == figures.store.combos
    assert restored.dossiers == figures.dossiers == 40
    assert dict(restored.pairs({0: 0})) == records  # the live dossiers too, line for line
    assert restored.store.totals_by(("agency_code",)) == figures.store.totals_by(("agency_code",))
    counters = [k for k in records if k.startswith(b"counter:")]
    last = max(counters, key=lambda k: int(k.split(b":")[1]))
    live = [k for k in records if k.startswith(b"live:")]
    last_live = max(live, key=lambda k: int(k.split(b":")[1]))
    for cut in (
        {**records, last: records[last][:-1]},  # a compressed stream cut short
        {k: v for k, v in records.items() if k != last},  # a column shorter than the others
        {**records, last_live: records[last_live][:-1]},  # the live dossiers' stream cut short
    ):
        with pytest.raises(InvalidFiguresSnapshot):
            Figures.from_pairs(decode_state, cut)
