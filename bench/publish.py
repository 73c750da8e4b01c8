"""Memory of a large publish: what `DurablePublisher.publish` holds at its peak while it sends
thousands of records at once (a state changelog's writes after a batch), for each producer batch
size in turn, on the same broker in the same run (the first size given is the baseline).

    .venv/bin/python bench/publish.py                        # 1 MiB (the old size) and the current
    .venv/bin/python bench/publish.py --batch-kib 1024,256,128 --records 4000 --rounds 10

Starts its own Tansu broker. Memory by `tracemalloc` (Python's allocations: the producer's
batches and the request being encoded), time on the wall clock and in CPU of this process.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from services.common import kafka
from services.common.kafka import DurablePublisher, ensure_topics
from services.common.topics import TopicSpec
from services.dev.embedded import Broker, free_port

TOPICS = [TopicSpec("bench.changelog", 4, compacted=True), TopicSpec("bench.events", 4)]


async def measure(bootstrap: str, batch_bytes: int, args: argparse.Namespace) -> None:
    kafka.MAX_BATCH_BYTES = batch_bytes  # read when the publisher makes its producer
    publisher = DurablePublisher(bootstrap)
    try:
        await publisher.publish([("bench.events", b"warm-up", b"x")])
        value = os.urandom(args.value_bytes // 2).hex().encode()
        tracemalloc.start()
        started, cpu = time.perf_counter(), time.process_time()
        for round_ in range(args.rounds):
            await publisher.publish(
                [
                    (TOPICS[i % 2].name, f"D-{round_}-{i}".encode(), value)
                    for i in range(args.records)
                ]
            )
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        await publisher.close()
    mib = 2**20
    sent = args.rounds * args.records * args.value_bytes / mib
    print(
        f"{batch_bytes // 1024:>6} KiB {peak / mib:>10.1f} {seconds:>9.2f} {cpu:>8.2f}"
        f"   ({args.rounds} x {args.records:,} records, {sent:.0f} MiB)"
    )


async def main(args: argparse.Namespace) -> None:
    broker = Broker(port=free_port()).start()
    try:
        await ensure_topics(broker.bootstrap, TOPICS, 1)
        print(f"{'batch':>10} {'peak MiB':>10} {'seconds':>9} {'CPU s':>8}")
        for kib in args.batch_kib:
            await measure(broker.bootstrap, kib * 1024, args)
    finally:
        broker.stop()


def kib_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--batch-kib", type=kib_list, default=[1024, kafka.MAX_BATCH_BYTES // 1024])
    parser.add_argument("--records", type=int, default=4000, help="records per publish")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--value-bytes", type=int, default=1500)
    asyncio.run(main(parser.parse_args()))
