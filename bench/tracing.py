"""What tracing costs per request and per event, in process (CPU time, so a busy machine blurs
it less than rates): a FastAPI request through `create_service`'s middleware, and a consumer's
poll of 2,000 events (`BatchConsumer`, no-op handler), tracing off and at each sampling ratio.

    .venv/bin/python bench/tracing.py --mode off     # then: --mode 0.01, --mode 1

One mode per process (a tracer provider is set once per process); the events carry a sampled
`traceparent` at the ratio given, as intake stamps them.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiokafka.structs import ConsumerRecord
from fastapi import FastAPI

from services.common import tracing
from services.common.consumer import BatchConsumer
from services.common.events import parse_event
from tests.support.factories import submitted

SCOPE = {
    "type": "http",
    "asgi": {"version": "3.0"},
    "http_version": "1.1",
    "method": "POST",
    "scheme": "http",
    "path": "/v1/events",
    "raw_path": b"/v1/events",
    "query_string": b"",
    "root_path": "",
    "headers": [(b"host", b"x"), (b"content-type", b"application/json")],
    "client": ("127.0.0.1", 1),
    "server": ("127.0.0.1", 80),
}


async def per_request(api: FastAPI, n: int) -> float:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(message: Any) -> None:
        pass

    for _ in range(500):
        await api(dict(SCOPE), receive, send)
    started = time.process_time()
    for _ in range(n):
        await api(dict(SCOPE), receive, send)
    return (time.process_time() - started) / n * 1e6


async def per_event(ratio: float, polls: int, size: int = 2000) -> float:
    rng = random.Random(7)
    records = []
    for i in range(size):
        value = submitted(f"D-{i}")
        if rng.random() < ratio:
            value["traceparent"] = f"00-{rng.getrandbits(128):032x}-{rng.getrandbits(64):016x}-01"
        event = parse_event(value)
        raw = event.to_json()
        records.append(
            (ConsumerRecord("dossier.events", 0, i, 0, 0, b"D", raw, None, 1, len(raw), []), event)
        )

    async def handler(items: Any) -> None:
        pass

    consumer: BatchConsumer[Any] = BatchConsumer("bench", "127.0.0.1:1", ["t"], handler)
    handle = consumer._handle_traced if tracing.enabled() else consumer._handle_events
    await handle(records)
    started = time.process_time()
    for _ in range(polls):
        await handle(records)
    return (time.process_time() - started) / (polls * size) * 1e6


async def main(args: argparse.Namespace) -> None:
    if args.mode != "off":
        settings = tracing.TracingSettings(
            MOTCUA_TRACES_DIR=tempfile.mkdtemp(prefix="motcua-bench-traces-"),
            OTEL_TRACES_SAMPLER="parentbased_traceidratio",
            OTEL_TRACES_SAMPLER_ARG=float(args.mode),
        )
        tracing.setup("bench", settings)
    api = FastAPI(telemetry=tracing.FASTAPI_TELEMETRY_OFF)

    @api.post("/v1/events")
    async def accept() -> dict[str, int]:
        return {"accepted": 1}

    if tracing.enabled():
        tracing.instrument(api)
    request_us = await per_request(api, args.requests)
    event_us = await per_event(0.0 if args.mode == "off" else float(args.mode), args.polls)
    tracing.shutdown()
    print(f"tracing {args.mode}: {request_us:.1f} µs per request, {event_us:.2f} µs per event")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--mode", default="off", help="`off` or the sampling ratio")
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--polls", type=int, default=20)
    asyncio.run(main(parser.parse_args()))
