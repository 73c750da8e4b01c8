"""Tracing's propagation: the `traceparent` an event carries, the spans a consumer opens under
it, what the services stamp on what they produce and send, and intake's content hash that a
trace context does not change. Spans go to an in-memory exporter (no global provider set)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest
from aiokafka.structs import ConsumerRecord
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

from services.common import tracing, tracing_sdk
from services.common.consumer import BatchConsumer, for_each_dossier
from services.common.events import (
    CloudEvent,
    content_of,
    parse_event,
    sampled_traceparent,
    traceparent_in,
)
from services.common.logging import processors
from services.common.partner import http_client
from services.intake.domain import (
    canonical_json,
    content_digest,
    digest_of,
    read_batch,
    traced_bytes,
)
from services.intake.ledger import accepted_entry
from tests.support.factories import submitted

TRACE = "0af7651916cd43dd8448eb211c80319c"
SAMPLED = f"00-{TRACE}-b7ad6b7169203331-01"
NOT_SAMPLED = f"00-{TRACE}-b7ad6b7169203331-00"


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, every new trace sampled, spans kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider(sampler=ParentBased(TraceIdRatioBased(1.0)))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    monkeypatch.setattr(tracing, "_tracer", provider.get_tracer("test"))
    monkeypatch.setattr(tracing, "_set_up", "test")
    yield exporter


SUBMITTED = submitted("D-1", event_id="D-1-submitted")


def event(**extra: Any) -> CloudEvent[Any]:
    return parse_event({**SUBMITTED, **extra})


# --- the traceparent of an event ---------------------------------------------------------------


def test_the_traceparent_is_found_in_an_events_bytes_without_decoding_it() -> None:
    raw = event(traceparent=SAMPLED).to_json()
    assert traceparent_in(raw) == SAMPLED
    assert traceparent_in(raw.decode()) == SAMPLED
    assert traceparent_in(event().to_json()) is None
    assert traceparent_in(b'{"traceparent":"00-short"}') is None
    assert traceparent_in(None) is None


def test_only_a_sampled_well_formed_traceparent_gives_a_context() -> None:
    context = tracing.context_of(SAMPLED)
    assert context is not None
    assert trace.get_current_span(context).get_span_context().trace_id == int(TRACE, 16)
    assert tracing.context_of(NOT_SAMPLED) is None
    assert tracing.context_of("00-" + "0" * 32 + "-b7ad6b7169203331-01") is None  # invalid id
    assert tracing.context_of(None) is None
    assert sampled_traceparent(event(traceparent=SAMPLED).to_json()) == {"traceparent": SAMPLED}
    assert sampled_traceparent(event(traceparent=NOT_SAMPLED).to_json()) == {}


def test_the_samplers_the_specification_names() -> None:
    assert (
        "TraceIdRatioBased{0.25}"
        in tracing_sdk.sampler_of("parentbased_traceidratio", 0.25).get_description()
    )
    assert tracing_sdk.sampler_of("always_on", 0).get_description() == "AlwaysOnSampler"
    with pytest.raises(ValueError, match="OTEL_TRACES_SAMPLER"):
        tracing_sdk.sampler_of("jaeger_remote", 0.1)


def test_without_an_exporter_tracing_is_not_set_up() -> None:
    assert tracing.setup("test", tracing.TracingSettings(OTEL_EXPORTER_OTLP_ENDPOINT="")) is False
    off = tracing.TracingSettings(OTEL_SDK_DISABLED=True, MOTCUA_TRACES_DIR="/tmp/x")
    assert tracing.setup("test", off) is False


# --- intake: the same event whatever its trace context -----------------------------------------


def test_a_resent_event_with_another_traceparent_has_the_same_content_hash() -> None:
    canonical = canonical_json(event())
    first = traced_bytes(canonical, {"traceparent": SAMPLED})
    again = traced_bytes(canonical, {"traceparent": f"00-{'1' * 32}-{'2' * 16}-01"})
    assert orjson.loads(first)["traceparent"] == SAMPLED
    assert first != again
    # what the ledger restores from the topic is the content's digest, not the bytes'
    assert (
        accepted_entry(first)
        == accepted_entry(again)
        == ("portal/test", "D-1-submitted", digest_of(canonical))
    )
    assert content_digest(first, orjson.loads(first)) == digest_of(canonical)
    assert traced_bytes(canonical, None) is canonical


def test_intake_does_not_keep_a_portals_own_tracing_attributes() -> None:
    body = orjson.dumps([{**SUBMITTED, "traceparent": SAMPLED, "tracestate": "portal=1"}])
    (read,) = read_batch(body, now=event().time)
    assert "traceparent" not in read.to_dict()
    assert canonical_json(read) == canonical_json(event())
    assert content_of({"a": 1, "traceparent": SAMPLED}) == {"a": 1}


# --- spans and stamping ------------------------------------------------------------------------


def test_nothing_is_stamped_or_recorded_while_no_span_records(spans: InMemorySpanExporter) -> None:
    assert tracing.current_attributes() is None
    with tracing.child_span("redis x") as span:
        assert span is None
    assert tracing.event_json(event(), None) == event().to_json()
    assert spans.get_finished_spans() == ()


def test_an_event_produced_in_a_span_carries_its_context(spans: InMemorySpanExporter) -> None:
    with tracing.span_under("work", [tracing.context_of(SAMPLED)]) as span:  # type: ignore[list-item]
        assert span is not None
        attributes = tracing.current_attributes()
        produced = orjson.loads(tracing.event_json(event(), attributes))
        kept = orjson.loads(tracing.event_json(event(traceparent=NOT_SAMPLED), attributes))
    assert attributes is not None
    assert produced["traceparent"].split("-")[1] == TRACE
    assert produced["traceparent"].split("-")[2] == f"{span.get_span_context().span_id:016x}"
    assert kept["traceparent"] == NOT_SAMPLED  # an event's own context is left as it is


async def test_a_partner_call_in_a_trace_is_a_client_span_sending_its_traceparent(
    spans: InMemorySpanExporter,
) -> None:
    seen: list[str | None] = []

    def partner(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("traceparent"))
        return httpx.Response(200, json={})

    client = http_client(base_url="http://partner.test", transport=httpx.MockTransport(partner))
    await client.post("/v1/untraced")
    with tracing.span_under("send", [tracing.context_of(SAMPLED)]):  # type: ignore[list-item]
        await client.post("/v1/messages")
    await client.aclose()
    assert seen[0] is None
    assert seen[1] is not None and seen[1].split("-")[1] == TRACE
    (call,) = [s for s in spans.get_finished_spans() if s.kind == trace.SpanKind.CLIENT]
    assert call.name == "POST /v1/messages"
    assert call.attributes is not None and call.attributes["http.response.status_code"] == 200
    assert seen[1].split("-")[2] == f"{call.context.span_id:016x}"


def test_log_lines_carry_the_trace_id_of_the_span_recording(spans: InMemorySpanExporter) -> None:
    add_trace_id = processors(json=True)[1]
    assert add_trace_id(None, "info", {"event": "x"}) == {"event": "x"}
    with tracing.span_under("work", [tracing.context_of(SAMPLED)]):  # type: ignore[list-item]
        assert add_trace_id(None, "info", {"event": "x"})["trace_id"] == TRACE


# --- a consumer's spans ------------------------------------------------------------------------


def record(offset: int, value: bytes) -> ConsumerRecord:
    return ConsumerRecord("dossier.events", 0, offset, 0, 0, b"D", value, None, 1, len(value), [])


async def test_a_batch_is_one_span_linking_its_traced_events_each_handled_in_its_own_trace(
    spans: InMemorySpanExporter,
) -> None:
    other = f"00-{'3' * 32}-{'4' * 16}-01"
    events = [
        event(traceparent=SAMPLED),
        parse_event({**submitted("D-2"), "traceparent": other}),
        parse_event({**submitted("D-3"), "traceparent": NOT_SAMPLED}),
        parse_event(submitted("D-4")),
    ]
    stamped: dict[str, str | None] = {}

    async def handle(dossier_id: str, items: list[CloudEvent[Any]]) -> None:
        attributes = tracing.current_attributes()
        stamped[dossier_id] = attributes["traceparent"].split("-")[1] if attributes else None

    async def handler(items: Any) -> None:
        await for_each_dossier(items, lambda e: e.subject, handle, concurrency=4)

    consumer: BatchConsumer[CloudEvent[Any]] = BatchConsumer(
        "test", "127.0.0.1:1", ["dossier.events"], handler
    )
    pairs = [(record(i, e.to_json()), e) for i, e in enumerate(events)]
    await consumer._handle_traced(pairs)

    # what a dossier's handling produces follows its event's trace; the others, the poll's
    finished = spans.get_finished_spans()
    (batch,) = [s for s in finished if s.name == "consume dossier.events"]
    poll = f"{batch.context.trace_id:032x}"
    assert stamped == {"D-1": TRACE, "D-2": "3" * 32, "D-3": poll, "D-4": poll}
    assert {link.context.trace_id for link in batch.links} == {int(TRACE, 16), int("3" * 32, 16)}
    handled = [s for s in finished if s.name == "process dossier.events"]
    assert sorted(s.context.trace_id for s in handled) == sorted(
        [int(TRACE, 16), int("3" * 32, 16)]
    )
    assert {s.parent.span_id for s in handled if s.parent} == {
        0xB7AD6B7169203331,
        int("4" * 16, 16),
    }


def test_a_payment_event_carries_the_trace_of_the_input_that_made_its_version(
    spans: InMemorySpanExporter,
) -> None:
    from services.payments.domain import GatewayAccount, open_payment, order_for
    from services.payments.ledger import LedgerRecord, outgoing_event

    order = order_for(
        {
            "dossier_id": "D-1",
            "agency_code": "A",
            "fee": {"amount_vnd": 150_000, "method": "online"},
        },
        account=GatewayAccount("vnpay", "M"),
        submitted_at=datetime(2026, 11, 27, 8, 0, tzinfo=UTC),
    )
    assert order is not None
    record = LedgerRecord(
        payment=open_payment(order, "ce-1").payment, agency_code="A", payment_url="http://pay"
    )
    untraced = outgoing_event(record, 1).to_dict()
    assert "traceparent" not in untraced
    assert LedgerRecord.from_bytes(record.to_bytes()) == record  # no trace: nothing written
    with tracing.span_under("work", [tracing.context_of(SAMPLED)]):  # type: ignore[list-item]
        traced = record.model_copy(update={"trace": tracing.current_attributes()})
    assert LedgerRecord.from_bytes(traced.to_bytes()) == traced  # kept in the changelog
    produced = outgoing_event(traced, 1).to_dict()
    assert produced["traceparent"].split("-")[1] == TRACE
    assert {k: v for k, v in produced.items() if k != "traceparent"} == untraced
