"""The OpenTelemetry SDK side of tracing: the tracer provider `tracing.setup` installs, its
sampler and exporters. Only `tracing.setup` imports this module, and only when an exporter is
configured, so a process with tracing off never loads the SDK (with psutil, which its resources
use)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)

# A traces file is moved aside (`.1`, replacing the one before) once it grows past this.
TRACES_FILE_MAX_BYTES = 20 * 1024 * 1024

SAMPLERS = frozenset(
    {
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    }
)


def sampler_of(name: str, ratio: float) -> Sampler:
    """The sampler `OTEL_TRACES_SAMPLER` names (the six the specification defines)."""
    name = name.strip().lower()
    if name not in SAMPLERS:
        known = ", ".join(sorted(SAMPLERS))
        raise ValueError(f"OTEL_TRACES_SAMPLER {name!r}: expected one of {known}")
    root = name.removeprefix("parentbased_")
    chosen: Sampler = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
    }.get(root) or TraceIdRatioBased(ratio)
    return ParentBased(chosen) if name.startswith("parentbased_") else chosen


def tracer_provider(
    service: str, *, sampler: Sampler, otlp_endpoint: str, traces_dir: str
) -> TracerProvider:
    """The provider of `service`'s spans: sampled by `sampler`, exported over OTLP/HTTP to
    `<otlp_endpoint>/v1/traces` and/or as JSON lines to `<traces_dir>/<service>.jsonl`
    (either empty: not that one)."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": f"motcua-{service}"}), sampler=sampler
    )
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        endpoint = otlp_endpoint.rstrip("/") + "/v1/traces"
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    if traces_dir:
        path = Path(traces_dir) / f"{service}.jsonl"
        provider.add_span_processor(
            BatchSpanProcessor(
                SpanFileExporter(path), schedule_delay_millis=500, max_queue_size=16_384
            )
        )
    return provider


# --- spans as JSON lines (`motcua dev`) --------------------------------------------------------


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """One finished span as plain JSON values: what a line of a traces file holds."""
    context = span.get_span_context()
    parent = span.parent
    start, end = span.start_time or 0, span.end_time or 0
    return {
        "trace_id": f"{context.trace_id:032x}" if context else "",
        "span_id": f"{context.span_id:016x}" if context else "",
        "parent_id": f"{parent.span_id:016x}" if parent else None,
        "name": span.name,
        "kind": span.kind.name,
        "service": span.resource.attributes.get("service.name", ""),
        "start_ns": start,
        "duration_ms": round((end - start) / 1e6, 3),
        "status": span.status.status_code.name,
        "attributes": dict(span.attributes or {}),
        "links": [
            {"trace_id": f"{link.context.trace_id:032x}", "span_id": f"{link.context.span_id:016x}"}
            for link in span.links
        ],
    }


class SpanFileExporter(SpanExporter):
    """Finished spans appended to `path` as JSON lines; moved aside to `<path>.1` past
    `max_bytes`, so a long session keeps at most about twice that."""

    def __init__(self, path: Path, *, max_bytes: int = TRACES_FILE_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = b"".join(orjson.dumps(span_record(s), default=str) + b"\n" for s in spans)
        try:
            if self.path.exists() and self.path.stat().st_size > self.max_bytes:
                self.path.replace(self.path.with_name(self.path.name + ".1"))
            with self.path.open("ab") as out:
                out.write(lines)
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS
