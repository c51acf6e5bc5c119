"""nomoat's OTLP span encoder writes the very bytes the SDK's encoder does,
for every kind of value, event, link, status and parent, several resources
and scopes; its caches give the same bytes the second time; the http
exporter sends them."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Event, ReadableSpan, SpanLimits, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import Link, SpanContext, SpanKind, Status, StatusCode, TraceFlags
from opentelemetry.trace.span import TraceState

from gateway.telemetry.otlp import FastOTLPSpanExporter, SpanEncoder

TRACE = 0x0AF7651916CD43DD8448EB211C80319C
RESOURCE = Resource.create({"service.name": "nomoat", "host.name": "h"})
OTHER_RESOURCE = Resource.create({"service.name": "edge"}, schema_url="https://example/1")
SCOPE = InstrumentationScope("nomoat", "1.0", "https://opentelemetry.io/schemas/x")
BARE_SCOPE = InstrumentationScope("other")
VALUES: dict[str, object] = {
    "s": "POST",
    "unicode": "héllo ✓",
    "empty": "",
    "long": "x" * 300,
    # Around the longest pair written in one go (key, value and lengths in
    # 127 bytes), uncached (over 64 characters): the second time, once the
    # key's encoding is known.
    "mid": "y" * 100,
    "edge1": "w" * 116,
    "edge2": "w" * 117,
    "nomoat.request.id": "0123456789abcdef0123456789abcdef",
    "t": True,
    "f": False,
    "zero": 0,
    "i": 7,
    "big": 2**40,
    "neg": -3,
    "float": 0.5,
    "one_float": 1.0,
    "strs": ("stop", "length"),
    "ints": (1, 2, 300),
    "floats": (0.25, -1.5),
    "bools": (True, False),
    "mixed_list": ["a", 1],
    "nested": [["a"], ["b", "c"]],
    "mapping": {"k": "v", "n": 1},
}


def context(span_id: int, *, remote: bool = False, state: TraceState | None = None) -> SpanContext:
    return SpanContext(
        TRACE, span_id, is_remote=remote, trace_flags=TraceFlags(1), trace_state=state
    )


def spans() -> list[ReadableSpan]:
    client = context(0xB7AD6B7169203331, remote=True)
    server = context(1, state=TraceState([("vendor", "v1"), ("b", "2")]))
    return [
        ReadableSpan(
            "POST /v1/chat/completions",
            server,
            client,
            RESOURCE,
            dict(VALUES),
            [Event("nomoat.route", {"nomoat.route.scores": (1.0, 0.5)}, timestamp=5)],
            (),
            SpanKind.SERVER,
            status=Status(StatusCode.ERROR, "upstream failed"),
            start_time=1_700_000_000_000_000_000,
            end_time=1_700_000_000_500_000_000,
            instrumentation_scope=SCOPE,
        ),
        ReadableSpan(
            "chat m",
            context(2),
            server,
            RESOURCE,
            {"gen_ai.operation.name": "chat", "nomoat.attempt": 1},
            [Event("bare", None, timestamp=9), Event("", {"k": "v"}, timestamp=0)],
            [Link(client, {"why": "batch"}), Link(context(3))],
            SpanKind.CLIENT,
            status=Status(StatusCode.OK),
            start_time=2,
            end_time=3,
            instrumentation_scope=SCOPE,
        ),
        ReadableSpan(
            "engine.decode",
            context(4),
            context(2),
            RESOURCE,
            {},
            kind=SpanKind.INTERNAL,
            start_time=4,
            end_time=5,
            instrumentation_scope=BARE_SCOPE,
        ),
        ReadableSpan("root", context(5), None, OTHER_RESOURCE, None, kind=SpanKind.PRODUCER),
        ReadableSpan("no scope", context(6), None, RESOURCE, {"s": "POST"}, start_time=1),
    ]


def sdk_bytes(batch: Sequence[ReadableSpan]) -> bytes:
    return encode_spans(batch).SerializePartialToString()


def test_the_same_bytes_as_the_sdks_encoder() -> None:
    batch = spans()
    assert SpanEncoder().request(batch) == sdk_bytes(batch)
    for span in batch:
        assert SpanEncoder().request([span]) == sdk_bytes([span])


def test_the_caches_give_the_same_bytes_again() -> None:
    encoder = SpanEncoder()
    batch = spans()
    first = encoder.request(batch)
    assert encoder.request(batch) == first == sdk_bytes(batch)
    # A value equal to another of a different type is not mistaken for it.
    for a, b in [(True, 1), (1, 1.0), (False, 0), (0.0, -0.0), ((0.0,), (-0.0,)), ((1,), (True,))]:
        one = ReadableSpan("x", context(7), None, RESOURCE, {"k": a}, start_time=1)
        two = ReadableSpan("x", context(7), None, RESOURCE, {"k": b}, start_time=1)
        assert encoder.request([one]) == sdk_bytes([one])
        assert encoder.request([two]) == sdk_bytes([two])


def test_the_bytes_decode_as_an_export_request() -> None:
    decoded = ExportTraceServiceRequest.FromString(SpanEncoder().request(spans()))
    [nomoat, edge] = decoded.resource_spans
    assert [s.scope.name for s in nomoat.scope_spans] == ["nomoat", "other", ""]
    server = nomoat.scope_spans[0].spans[0]
    assert server.name == "POST /v1/chat/completions"
    assert server.trace_state == "vendor=v1,b=2"
    assert server.status.message == "upstream failed"
    assert edge.schema_url == "https://example/1"


def test_an_unencodable_value_fails_the_batch_not_the_thread() -> None:
    exporter = FastOTLPSpanExporter(endpoint="http://127.0.0.1:9/v1/traces")
    bad = ReadableSpan("x", context(8), None, RESOURCE, {"k": object()}, start_time=1)  # type: ignore[dict-item]
    assert exporter.export([bad]) is SpanExportResult.FAILURE
    exporter.shutdown()
    assert exporter.export(spans()) is SpanExportResult.FAILURE


@pytest.mark.parametrize("value", [2**63 - 1, -(2**63)])
def test_int64_limits(value: int) -> None:
    span = ReadableSpan("x", context(9), None, RESOURCE, {"k": value}, start_time=1)
    assert SpanEncoder().request([span]) == sdk_bytes([span])


def test_the_sdks_own_spans_encode_as_the_sdk_encodes_them() -> None:
    # What the SDK's tracer hands its processors (bounded attributes and
    # events, some dropped here) and its Span objects themselves (read
    # through their properties): the same bytes as the SDK's encoder.
    exporter = InMemorySpanExporter()
    limits = SpanLimits(max_span_attributes=2, max_events=1, max_event_attributes=1)
    provider = TracerProvider(resource=RESOURCE, span_limits=limits)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("sdk", "1.0")
    attributes = {"n": 3, "s": "x", "b": True}
    server = SpanKind.SERVER
    with tracer.start_as_current_span("outer", kind=server, attributes=attributes) as outer:
        outer.add_event("e", {"f": 0.5, "l": ["a", "b"]})
        outer.add_event("dropped")
        with tracer.start_as_current_span("inner", attributes={"s": "x"}) as inner:
            inner.set_status(Status(StatusCode.ERROR, "failed"))
    batch = list(exporter.get_finished_spans())
    assert batch[1].dropped_attributes == 1 and batch[1].dropped_events == 1
    encoder = SpanEncoder()
    for spans in (batch, [inner, outer]):
        assert encoder.request(spans) == sdk_bytes(spans)
        assert encoder.request(spans) == sdk_bytes(spans)
