"""Memory of the metrics figures' snapshot: what writing one (`Figures.pairs`) and loading one
(`Figures.from_pairs`, a metrics process starting) hold at their peak, against what the loaded
figures keep (the baseline of the same run), measured with `tracemalloc`. Writing is measured
twice: first with every record kept (the first snapshot of the store also compacts its days,
which stays), then as a worker writes one, each record let go once it is sent.

    .venv/bin/python bench/figures_snapshot.py                    # 30,000 live dossiers
    .venv/bin/python bench/figures_snapshot.py --dossiers 100000 --cells 6
    .venv/bin/python bench/figures_snapshot.py --history 600000   # with a year's rows retired

The live dossiers are synthetic: `--cells` counts per dossier (days x counters) on 97 agencies;
the first seed half-year at F = 1.0 left about 30,000 live dossiers in the figures. `--history`
adds retired dossiers, whose counts are only rows of the store (each at minutes of its own).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.metrics.domain import COUNTERS, Cell
from services.metrics.figures import Figures


def synthetic(dossiers: int, cells: int, seed: int, history: int = 0) -> Figures:
    rnd = random.Random(seed)
    agencies = [f"000.00.{i:02d}.H34" for i in range(97)]
    counters = COUNTERS[:3]
    figures = Figures(lambda dossier_id, raw: None)  # type: ignore[arg-type,return-value]
    for _ in range(history):
        first = 25_000_000 + rnd.randrange(525_600)  # minutes: a year
        agency = rnd.choice(agencies)
        figures.store.apply(
            {
                (Cell(first + day * 1440 + rnd.randrange(600), agency, "province", "land"), name): 1
                for day in range(max(1, cells // len(counters)))
                for name in counters
            }
        )
    for i in range(dossiers):
        first = 25_000_000 + rnd.randrange(262_800)  # minutes: a half-year
        agency = rnd.choice(agencies)
        deltas = {
            (Cell(first + day * 1440, agency, "province", "land"), name): 1
            for day in range(max(1, cells // len(counters)))
            for name in counters
        }
        figures.store.apply(deltas)
        figures.held(f"{agency}-{i:07d}", f"{i:016x}", figures.store.pack(deltas))
    return figures


def main(args: argparse.Namespace) -> None:
    figures = synthetic(args.dossiers, args.cells, args.seed, args.history)
    tracemalloc.start()
    started = time.perf_counter()
    pairs = dict(figures.pairs({0: 0}))
    written_s = time.perf_counter() - started
    _, write_peak = tracemalloc.get_traced_memory()
    size = sum(len(v) for v in pairs.values())
    # Written again as a worker writes it: each record let go once it is taken (sent), the
    # store's days compacted by the write before.
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    started = time.perf_counter()
    for _record in figures.pairs({0: 0}):
        pass
    sent_s = time.perf_counter() - started
    _, sent_peak = tracemalloc.get_traced_memory()
    sent_peak -= before
    del figures
    tracemalloc.reset_peak()
    before, _ = tracemalloc.get_traced_memory()
    started = time.perf_counter()
    loaded, _ = Figures.from_pairs(lambda dossier_id, raw: None, pairs)  # type: ignore[arg-type,return-value]
    load_s = time.perf_counter() - started
    after, load_peak = tracemalloc.get_traced_memory()
    kept = after - before
    load_peak -= before
    mib = 2**20
    print(
        f"{loaded.dossiers:,} live dossiers x {args.cells} cells, {args.history:,} retired; "
        f"snapshot {size / mib:.1f} MiB"
    )
    print(f"{'':<28}{'MiB':>8}{'x kept':>8}{'seconds':>9}")
    print(f"{'loaded figures keep':<28}{kept / mib:>8.1f}{1.0:>8.2f}")
    for name, peak, seconds in (
        ("writing, all kept: peak", write_peak, written_s),
        ("writing, as sent: peak", sent_peak, sent_s),
        ("loading: peak", load_peak, load_s),
    ):
        print(f"{name:<28}{peak / mib:>8.1f}{peak / kept:>8.2f}{seconds:>9.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--dossiers", type=int, default=30_000)
    parser.add_argument("--cells", type=int, default=18)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--history", type=int, default=0, help="retired dossiers")
    main(parser.parse_args())
