"""OpenTelemetry tracing, set up once per process from the standard `OTEL_*` variables.

One trace follows a dossier's event from a portal's `POST /v1/events` through every service: the
W3C `traceparent` (and `tracestate`) travels in the CloudEvents distributed-tracing extension
attributes of every event (`stamp`, read back with `traceparent_in` / `context_of`), and in the
headers of every partner call and webhook delivery (`TracedTransport`).

- `setup(service)` installs the SDK only when an exporter is configured: OTLP over HTTP
  (`OTEL_EXPORTER_OTLP_ENDPOINT`) and/or JSON lines in `MOTCUA_TRACES_DIR` (what `motcua dev`
  uses: `.motcua/logs/traces/<service>.jsonl`). Without one, or with `OTEL_SDK_DISABLED=true`,
  every helper here sees no recording span and does next to nothing, and the SDK
  (`tracing_sdk`) is not even imported: this module needs the OpenTelemetry API only.
- Sampling: `OTEL_TRACES_SAMPLER` (default `parentbased_traceidratio`) with
  `OTEL_TRACES_SAMPLER_ARG` (the ratio, default 0.01). An event whose `traceparent` is not
  sampled gets no span anywhere downstream, and only sampled contexts are stamped on events.
- Spans: HTTP handling (`TracingMiddleware`, which `create_service` adds), Kafka produce
  (`DurablePublisher`), Kafka consume (one batch span linking the events, one span per event
  whose parent is the event's `traceparent`), partner calls and portal deliveries
  (`TracedTransport`, under `span_under` the events they are made for), Redis scripts
  (`traced_script`). Log lines carry `trace_id` while a span records (`add_trace_id`).
- Nothing here creates a trace of its own but a request, a consumer's poll and the sampler's
  choice among them: every other span is a child of one that records, or is not made.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from contextvars import ContextVar
from typing import Any

import httpx
import orjson
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.common.events import TRACE_ATTRIBUTES, is_sampled
from services.common.events import traceparent_in as traceparent_in  # the consumer reads it here

TRACER_NAME = "motcua"

_PROPAGATOR = TraceContextTextMapPropagator()
_tracer = trace.get_tracer(TRACER_NAME)
_set_up: str | None = None
_set_up_lock = threading.Lock()


class TracingSettings(BaseSettings):
    """The standard OpenTelemetry variables a service reads, and where `motcua dev` writes."""

    model_config = SettingsConfigDict(env_file=None, extra="ignore")

    sdk_disabled: bool = Field(default=False, validation_alias="OTEL_SDK_DISABLED")
    sampler: str = Field(default="parentbased_traceidratio", validation_alias="OTEL_TRACES_SAMPLER")
    sampler_arg: float = Field(default=0.01, ge=0, le=1, validation_alias="OTEL_TRACES_SAMPLER_ARG")
    # OTLP over HTTP (protobuf): spans go to `<endpoint>/v1/traces`; empty: no OTLP export
    otlp_endpoint: str = Field(default="", validation_alias="OTEL_EXPORTER_OTLP_ENDPOINT")
    # A folder for one JSON-lines file of spans per service (`motcua dev`); empty: none
    traces_dir: str = Field(default="", validation_alias="MOTCUA_TRACES_DIR")


def setup(service: str, settings: TracingSettings | None = None) -> bool:
    """Install the SDK for this process (once; later calls change nothing). False when tracing
    is off: disabled, or no exporter configured."""
    global _set_up
    with _set_up_lock:
        if _set_up is not None:
            return True
        settings = settings or TracingSettings()
        if settings.sdk_disabled or not (settings.otlp_endpoint or settings.traces_dir):
            return False
        from services.common import tracing_sdk  # the SDK only when tracing is on

        provider = tracing_sdk.tracer_provider(
            service,
            sampler=tracing_sdk.sampler_of(settings.sampler, settings.sampler_arg),
            otlp_endpoint=settings.otlp_endpoint,
            traces_dir=settings.traces_dir,
        )
        trace.set_tracer_provider(provider)
        _set_up = service
        return True


def enabled() -> bool:
    """The SDK is installed in this process (spans may record)."""
    return _set_up is not None


def shutdown() -> None:
    """Export what is buffered (a process about to exit)."""
    force_flush = getattr(trace.get_tracer_provider(), "force_flush", None)  # the SDK's only
    if force_flush is not None:
        force_flush(2000)


# --- the traceparent of an event ---------------------------------------------------------------


def context_of(traceparent: str | None, tracestate: str | None = None) -> Context | None:
    """The remote context of a sampled `traceparent` (None for none, a malformed one or one
    not sampled: nothing downstream records for it)."""
    if not traceparent or not is_sampled(traceparent):
        return None
    carrier = {"traceparent": traceparent}
    if tracestate:
        carrier["tracestate"] = tracestate
    context = _PROPAGATOR.extract(carrier)
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def contexts_in(events: Iterable[bytes | str]) -> list[Context]:
    """The contexts of the sampled ones of `events` (JSON), in order; none while tracing is off."""
    if _set_up is None:
        return []
    found = (context_of(traceparent_in(raw)) for raw in events)
    return [c for c in found if c is not None]


def current_attributes() -> dict[str, str] | None:
    """`traceparent` (and `tracestate`) of the span recording now; None when none records."""
    span = trace.get_current_span()
    if not span.is_recording():
        return None
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return {name: carrier[name] for name in TRACE_ATTRIBUTES if name in carrier} or None


def stamp(value: MutableMapping[str, Any], attributes: Mapping[str, str] | None) -> None:
    """Put the distributed-tracing attributes on an event's JSON values (replacing any)."""
    if attributes:
        for name in TRACE_ATTRIBUTES:
            value.pop(name, None)
        value.update(attributes)


# --- spans -------------------------------------------------------------------------------------


@contextlib.contextmanager
def child_span(
    name: str,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span | None]:
    """A span under the one recording now, current inside the block; nothing (None) when no
    span records: a step of a traced request or event, never a trace of its own."""
    if not trace.get_current_span().is_recording():
        yield None
        return
    with _tracer.start_as_current_span(name, kind=kind, attributes=attributes) as span:
        yield span


@contextlib.contextmanager
def span_under(
    name: str,
    contexts: Sequence[Context],
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
) -> Iterator[Span | None]:
    """A span whose parent is the first of `contexts` (the others are linked), current inside
    the block: one step done for several traced events at once (a batched partner call).
    Nothing (None) without a context."""
    if not contexts:
        yield None
        return
    with _tracer.start_as_current_span(
        name, context=contexts[0], kind=kind, attributes=attributes, links=_links(contexts[1:])
    ) as span:
        yield span


def start_batch(name: str, contexts: Sequence[Context], attributes: Mapping[str, Any]) -> Span:
    """A consumer's span of one poll (a trace of its own) linking the events' contexts."""
    links = _links(contexts)
    return _tracer.start_span(name, kind=SpanKind.CONSUMER, attributes=attributes, links=links)


def _links(contexts: Iterable[Context]) -> list[Link]:
    return [Link(trace.get_current_span(c).get_span_context()) for c in contexts]


def start_child(name: str, parent: Context, attributes: Mapping[str, Any]) -> Span:
    """The span of one event handled, under the event's context."""
    return _tracer.start_span(name, context=parent, kind=SpanKind.CONSUMER, attributes=attributes)


def use_span(span: Span) -> contextlib.AbstractContextManager[Span]:
    """`span` current inside the block (it is not ended on leaving)."""
    return trace.use_span(span, end_on_exit=False)


def fail(span: Span | None, exc: BaseException) -> None:
    if span is not None and span.is_recording():
        span.set_status(Status(StatusCode.ERROR, type(exc).__name__))


# --- the contexts of a batch's items (a consumer's handler works dossier by dossier) -----------

_ITEM_CONTEXTS: ContextVar[Mapping[int, Context] | None] = ContextVar(
    "motcua_item_contexts", default=None
)


@contextlib.contextmanager
def item_contexts(contexts: Mapping[int, Context]) -> Iterator[None]:
    """While a batch is handled: the span context of each traced item, by `id(item)`."""
    token = _ITEM_CONTEXTS.set(contexts)
    try:
        yield
    finally:
        _ITEM_CONTEXTS.reset(token)


@contextlib.contextmanager
def within_items(items: Sequence[object]) -> Iterator[None]:
    """The span of the last traced one of `items` current inside the block (what a dossier's
    handling produces follows its newest event); nothing when none is traced."""
    contexts = _ITEM_CONTEXTS.get()
    if not contexts:
        yield
        return
    found = next((contexts[id(i)] for i in reversed(items) if id(i) in contexts), None)
    if found is None:
        yield
        return
    token = otel_context.attach(found)
    try:
        yield
    finally:
        otel_context.detach(token)


# --- partner calls -----------------------------------------------------------------------------


class TracedTransport(httpx.AsyncBaseTransport):
    """An httpx transport that, while a span records, makes each request a client span and sends
    its `traceparent`; otherwise it hands the request straight through."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if not trace.get_current_span().is_recording():
            return await self.inner.handle_async_request(request)
        attributes = {
            "http.request.method": request.method,
            "server.address": request.url.host,
            "url.path": request.url.path,
        }
        with _tracer.start_as_current_span(
            f"{request.method} {request.url.path}", kind=SpanKind.CLIENT, attributes=attributes
        ) as span:
            carrier: dict[str, str] = {}
            _PROPAGATOR.inject(carrier)
            request.headers.update(carrier)
            response = await self.inner.handle_async_request(request)
            span.set_attribute("http.response.status_code", response.status_code)
            if response.status_code >= 500:
                span.set_status(Status(StatusCode.ERROR, f"HTTP {response.status_code}"))
            return response

    async def aclose(self) -> None:
        await self.inner.aclose()


# --- log lines ---------------------------------------------------------------------------------


def add_trace_id(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: the `trace_id` of the span recording now, if one does."""
    span = trace.get_current_span()
    if span.is_recording():
        event_dict.setdefault("trace_id", f"{span.get_span_context().trace_id:032x}")
    return event_dict


# --- the services' shells ----------------------------------------------------------------------

# Probes and scrapes are not traced.
_UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})


# FastAPI's own telemetry, off: it would trace every request, and each step of one (dependencies,
# endpoint, serialization), as soon as a tracer provider is set, at three times the cost of
# `TracingMiddleware` for a request not sampled (measured: 30 µs against 9 µs).
FASTAPI_TELEMETRY_OFF: Any = {
    "tracing": False,
    "metrics": False,
    "logs": False,
    "operation_spans": False,
}


def instrument(api: Any) -> None:
    """Every request `api` (FastAPI) handles is a server span (`TracingMiddleware`)."""
    api.add_middleware(TracingMiddleware)


class TracingMiddleware:
    """ASGI: a request is a server span named by its route, under the caller's `traceparent`
    header when it sends one. A request not sampled costs a header scan and the sampler's
    decision, and runs with no span current (so nothing under it records)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in _UNTRACED:
            await self.app(scope, receive, send)
            return
        carrier: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name == b"traceparent" or name == b"tracestate":
                carrier[name.decode()] = value.decode("latin-1")
        method = scope["method"]
        span = _tracer.start_span(
            f"{method} {scope['path']}",
            context=_PROPAGATOR.extract(carrier) if carrier else None,
            kind=SpanKind.SERVER,
        )
        if not span.is_recording():
            await self.app(scope, receive, send)
            return
        span.set_attributes({"http.request.method": method, "url.path": scope["path"]})

        async def send_traced(message: Any) -> None:
            if message["type"] == "http.response.start":
                status = int(message["status"])
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
            await send(message)

        with trace.use_span(span, end_on_exit=True):
            try:
                await self.app(scope, receive, send_traced)
            finally:
                route = getattr(scope.get("route"), "path", None)
                if isinstance(route, str):  # the template, not the ids in the path
                    span.update_name(f"{method} {route}")
                    span.set_attribute("http.route", route)


def event_json(event: Any, attributes: Mapping[str, str] | None) -> bytes:
    """An event's JSON (`CloudEvent.to_json`) with `attributes` stamped, unless it carries
    its own trace context already."""
    if attributes is None or (event.model_extra or {}).get("traceparent"):
        return bytes(event.to_json())
    value = event.to_dict()
    stamp(value, attributes)
    return orjson.dumps(value)


class TracedScript:
    """A registered Redis script (`register_script`) whose calls are client spans while a span
    records; otherwise called straight through."""

    def __init__(self, script: Any, name: str) -> None:
        self.script = script
        self.name = name

    async def __call__(
        self,
        keys: Sequence[Any] | None = None,
        args: Iterable[Any] | None = None,
        client: Any = None,
    ) -> Any:
        with script_span(self.name, len(keys or ())):
            return await self.script(keys=keys, args=args, client=client)


def script_span(name: str, keys: int) -> contextlib.AbstractContextManager[Span | None]:
    """The client span `redis <name>` of one call of a Redis script over `keys` keys, under
    the span recording now (`child_span`)."""
    attributes = {
        "db.system": "redis",
        "db.operation.name": "EVALSHA",
        "redis.script": name,
        "redis.keys": keys,
    }
    return child_span(f"redis {name}", kind=SpanKind.CLIENT, attributes=attributes)


def traced_script(client: Any, source: str, name: str) -> TracedScript:
    """`client.register_script(source)`, its calls traced as `redis <name>`."""
    return TracedScript(client.register_script(source), name)
