"""Traces, asserted with the SDK's in-memory exporter: the span tree of a
JSON answer, a stream, a stream the client cut, a retry, a fallback and a
hook error, with the GenAI conventions' attributes; the client's
traceparent continued and sent on upstream; x-request-id; log records with
the trace context."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from gateway.errors import UpstreamError
from gateway.registry import Registry
from gateway.telemetry import semconv as names
from gateway.telemetry.logs import TraceContextFilter
from gateway.telemetry.spans import Tracing
from gateway.testing import Script
from gateway.testing.inprocess import InProcessGateway, in_process_gateway

from .support import MODEL, chat_body, config, error_of, pool, sse_json

pytestmark = pytest.mark.anyio

CHAT = "/v1/chat/completions"
SERVER_NAME = f"POST {CHAT}"
CLIENT_TRACE = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
TRACEPARENT = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-01"
SAMPLING = {
    "temperature": 0.5,
    "top_p": 0.9,
    "max_tokens": 20,
    "seed": 7,
    "stop": ["END"],
    "frequency_penalty": 0.1,
    "presence_penalty": 0.2,
}


class _Ended(SpanProcessor):
    """Wakes the test when a span ends (spans end on the event loop)."""

    def __init__(self) -> None:
        self.event = asyncio.Event()

    def on_end(self, span: ReadableSpan) -> None:
        self.event.set()


class Traced:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        self._ended = _Ended()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        provider.add_span_processor(self._ended)
        self.tracing = Tracing(provider)

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    async def wait_for(self, count: int, within: float = 5.0) -> list[ReadableSpan]:
        """Wait until ``count`` spans ended (streams end theirs after the
        last byte went out)."""
        async with asyncio.timeout(within):
            while len(self.spans()) < count:
                self._ended.event.clear()
                await self._ended.event.wait()
        return self.spans()


@pytest.fixture
def traced() -> Traced:
    return Traced()


Start = Callable[[str], Any]


@pytest.fixture
def start(registry: Registry, traced: Traced) -> Start:
    @asynccontextmanager
    async def run(config_text: str) -> AsyncIterator[InProcessGateway]:
        async with in_process_gateway(config_text, registry=registry, tracing=traced.tracing) as gw:
            yield gw

    return run


def one(spans: Sequence[ReadableSpan], name: str) -> ReadableSpan:
    [span] = [s for s in spans if s.name == name]
    return span


def named(spans: Sequence[ReadableSpan], name: str) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.name == name), key=lambda s: s.start_time or 0)


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in (span.attributes or {}).items()}


def child_of(span: ReadableSpan, parent: ReadableSpan) -> bool:
    assert span.parent is not None and span.context is not None and parent.context is not None
    return (
        span.parent.span_id == parent.context.span_id
        and span.context.trace_id == parent.context.trace_id
    )


def routings(server: ReadableSpan) -> list[dict[str, Any]]:
    """The routing events of a SERVER span, one per policy call, in order."""
    return [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in (e.attributes or {}).items()}
        for e in server.events
        if e.name == names.ROUTE_EVENT
    ]


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    assert span.context is not None
    return format(span.context.trace_id, "032x"), format(span.context.span_id, "016x")


def assert_request_attributes(attempt: dict[str, Any], stream: bool) -> None:
    assert attempt[names.OPERATION_NAME] == "chat"
    assert attempt[names.PROVIDER_NAME] == "fake"
    assert attempt[names.REQUEST_MODEL] == MODEL
    assert attempt[names.REQUEST_STREAM] is stream
    assert attempt[names.REQUEST_TEMPERATURE] == 0.5
    assert attempt[names.REQUEST_TOP_P] == 0.9
    assert attempt[names.REQUEST_MAX_TOKENS] == 20
    assert attempt[names.REQUEST_SEED] == 7
    assert attempt[names.REQUEST_STOP_SEQUENCES] == ["END"]
    assert attempt[names.REQUEST_FREQUENCY_PENALTY] == 0.1
    assert attempt[names.REQUEST_PRESENCE_PENALTY] == 0.2
    assert attempt[names.DEPLOYMENT] == "m/0" and attempt[names.BACKEND] == "a"


# ---------------------------------------------------------------- JSON answer


async def test_a_json_answer_is_a_server_span_with_routing_events_and_an_attempt(
    start: Start, traced: Traced
) -> None:
    async with start(pool("a")) as gw:
        response = await gw.http.post(
            CHAT, json=chat_body(**SAMPLING), headers={"traceparent": TRACEPARENT}
        )
        assert response.status_code == 200, response.text
        call = gw.backend("a").calls[0]
    spans = await traced.wait_for(2)
    server = one(spans, SERVER_NAME)
    attempt = one(spans, f"chat {MODEL}")
    assert len(spans) == 2
    # The client's trace goes on: the SERVER span is its child.
    assert server.kind is SpanKind.SERVER
    assert hex_ids(server)[0] == CLIENT_TRACE
    assert server.parent is not None and format(server.parent.span_id, "016x") == CLIENT_SPAN
    assert child_of(attempt, server)
    assert attempt.kind is SpanKind.CLIENT
    # The tracer carries the pinned conventions' schema URL.
    assert attempt.instrumentation_scope is not None
    assert attempt.instrumentation_scope.schema_url == names.SCHEMA_URL
    on_server = attrs(server)
    assert on_server[names.HTTP_RESPONSE_STATUS_CODE] == 200
    assert on_server[names.HTTP_REQUEST_METHOD] == "POST"
    assert on_server[names.MODEL] == MODEL
    assert on_server[names.DEPLOYMENT] == "m/0"
    assert on_server[names.REQUEST_ID] == response.headers["x-request-id"]
    on_attempt = attrs(attempt)
    assert_request_attributes(on_attempt, stream=False)
    body = response.json()
    assert on_attempt[names.RESPONSE_ID] == body["id"]
    assert on_attempt[names.RESPONSE_MODEL] == body["model"]
    assert on_attempt[names.RESPONSE_FINISH_REASONS] == ["stop"]
    assert on_attempt[names.USAGE_INPUT_TOKENS] == body["usage"]["prompt_tokens"]
    assert on_attempt[names.USAGE_OUTPUT_TOKENS] == body["usage"]["completion_tokens"]
    assert on_attempt[names.ATTEMPT] == 1 and on_attempt[names.FALLBACK] is False
    assert names.ERROR_TYPE not in on_attempt
    assert attempt.status.status_code is StatusCode.UNSET
    # Routing, as an event: the policy, and each candidate's score and reason.
    [route] = routings(server)
    assert route[names.ROUTE_POLICY] == "ordered"
    assert route[names.ROUTE_CANDIDATES] == ["m/0"]
    assert route[names.ROUTE_BACKENDS] == ["a"]
    [score] = route[names.ROUTE_SCORES]
    [reason] = route[names.ROUTE_REASONS]
    assert isinstance(score, float) and isinstance(reason, str) and reason
    # The backend was handed the attempt: its traceparent names the attempt span.
    assert call.ctx.trace is not None
    sent = call.ctx.trace.headers()
    trace_id, span_id = hex_ids(attempt)
    assert sent["traceparent"] == f"00-{trace_id}-{span_id}-01"
    # Upstream, the gateway's own id of the request (the answer's), not the client's.
    assert sent["x-request-id"] == body["id"] != response.headers["x-request-id"]


async def test_the_clients_tracestate_goes_on_upstream(start: Start, traced: Traced) -> None:
    async with start(pool("a")) as gw:
        headers = {"traceparent": TRACEPARENT, "tracestate": "vendor=abc,other=1"}
        assert (await gw.http.post(CHAT, json=chat_body(), headers=headers)).status_code == 200
        trace = gw.backend("a").calls[0].ctx.trace
    assert trace is not None
    sent = trace.headers()
    assert sent["tracestate"] == "vendor=abc,other=1"
    assert sent["traceparent"].startswith(f"00-{CLIENT_TRACE}-")


async def test_a_client_trace_not_sampled_records_nothing_and_still_propagates(
    start: Start, traced: Traced
) -> None:
    # The default sampler is parent-based: the client's "not sampled" wins.
    unsampled = f"00-{CLIENT_TRACE}-{CLIENT_SPAN}-00"
    async with start(pool("a")) as gw:
        response = await gw.http.post(CHAT, json=chat_body(), headers={"traceparent": unsampled})
        assert response.status_code == 200
        trace = gw.backend("a").calls[0].ctx.trace
        # Spans end before the answer is out; a stream's later: send one too.
        streamed = await gw.http.post(
            CHAT, json=chat_body(stream=True), headers={"traceparent": unsampled}
        )
        assert streamed.status_code == 200
    assert traced.spans() == []
    assert trace is not None
    sent = trace.headers()["traceparent"]
    assert sent.startswith(f"00-{CLIENT_TRACE}-") and sent.endswith("-00")
    assert CLIENT_SPAN not in sent


async def test_without_traceparent_the_server_span_starts_a_trace(
    start: Start, traced: Traced
) -> None:
    async with start(pool("a")) as gw:
        assert (await gw.http.post(CHAT, json=chat_body())).status_code == 200
    server = one(await traced.wait_for(2), SERVER_NAME)
    assert server.parent is None


@pytest.mark.parametrize("stream", [False, True])
async def test_the_answers_text_is_recorded_as_the_hooks_left_it(
    start: Start, traced: Traced, stream: bool
) -> None:
    # "shout" upper-cases answers and streams, as a redact hook rewrites them.
    traced.tracing.capture_content = True
    async with start(pool("a", hooks=[{"type": "shout"}])) as gw:
        response = await gw.http.post(CHAT, json=chat_body(stream=stream))
        assert response.status_code == 200
        reply = gw.backend("a").config.reply
    attempt = one(await traced.wait_for(2), f"chat {MODEL}")
    recorded = attrs(attempt)[names.OUTPUT_MESSAGES]
    assert f'"content":"{reply.upper()}"' in recorded
    assert reply not in recorded
    assert '"finish_reason":"stop"' in recorded


async def test_content_is_recorded_only_when_asked(start: Start, traced: Traced) -> None:
    async with start(pool("a")) as gw:
        assert (await gw.http.post(CHAT, json=chat_body())).status_code == 200
        traced.tracing.capture_content = True
        assert (await gw.http.post(CHAT, json=chat_body())).status_code == 200
        reply = gw.backend("a").config.reply
    plain, captured = named(await traced.wait_for(4), f"chat {MODEL}")
    assert names.INPUT_MESSAGES not in attrs(plain)
    assert names.OUTPUT_MESSAGES not in attrs(plain)
    on_captured = attrs(captured)
    assert '"content":"Hello"' in on_captured[names.INPUT_MESSAGES]
    assert '"role":"user"' in on_captured[names.INPUT_MESSAGES]
    assert reply in on_captured[names.OUTPUT_MESSAGES]


# --------------------------------------------------------------------- streams


async def test_a_stream_records_time_to_first_chunk_usage_and_finish(
    start: Start, traced: Traced
) -> None:
    async with start(pool("a")) as gw:
        response = await gw.http.post(
            CHAT,
            json=chat_body(stream=True, stream_options={"include_usage": True}, **SAMPLING),
        )
        events, done = sse_json(response.content)
        assert done
    spans = await traced.wait_for(2)
    server = one(spans, SERVER_NAME)
    attempt = one(spans, f"chat {MODEL}")
    assert child_of(attempt, server)
    on_attempt = attrs(attempt)
    assert_request_attributes(on_attempt, stream=True)
    usage = events[-1]["usage"]
    assert on_attempt[names.USAGE_INPUT_TOKENS] == usage["prompt_tokens"]
    assert on_attempt[names.USAGE_OUTPUT_TOKENS] == usage["completion_tokens"]
    assert names.USAGE_ESTIMATED not in on_attempt
    assert on_attempt[names.RESPONSE_FINISH_REASONS] == ["stop"]
    assert on_attempt[names.RESPONSE_ID] == events[0]["id"]
    assert 0 < on_attempt[names.RESPONSE_TIME_TO_FIRST_CHUNK] < 5
    # The SERVER span lasts as long as the stream.
    assert server.end_time is not None and attempt.end_time is not None
    assert server.end_time >= attempt.end_time
    assert attrs(server)[names.HTTP_RESPONSE_STATUS_CODE] == 200


async def test_a_stream_cut_by_the_client_still_records_its_tokens(
    start: Start, traced: Traced
) -> None:
    async with start(pool("a")) as gw:
        gw.backend("a").script(Script(text="x" * 50, chunks=50, chunk_delay=0.01))
        async with gw.http.stream("POST", CHAT, json=chat_body(stream=True)) as response:
            seen = 0
            async for line in response.aiter_lines():
                seen += bool(line)
                if seen == 4:  # the role chunk, then three of content
                    break
        call = gw.backend("a").calls[0]
        assert await call.wait_ended() in ("cancelled", "closed")
        spans = await traced.wait_for(2)
    attempt = one(spans, f"chat {MODEL}")
    on_attempt = attrs(attempt)
    # No usage chunk came: the content chunks that passed are counted.
    assert 3 <= on_attempt[names.USAGE_OUTPUT_TOKENS] < 50
    assert on_attempt[names.USAGE_ESTIMATED] is True
    assert names.RESPONSE_TIME_TO_FIRST_CHUNK in on_attempt
    assert names.RESPONSE_FINISH_REASONS not in on_attempt
    assert attrs(one(spans, SERVER_NAME))[names.HTTP_RESPONSE_STATUS_CODE] == 200


async def test_a_stream_failing_half_way_records_its_tokens_and_error(
    start: Start, traced: Traced
) -> None:
    async with start(pool("a")) as gw:
        gw.backend("a").script(
            Script(text="y" * 10, chunks=10, error=UpstreamError("gone"), error_after=4)
        )
        response = await gw.http.post(CHAT, json=chat_body(stream=True))
        events, done = sse_json(response.content)
        assert not done and "error" in events[-1]
    spans = await traced.wait_for(2)
    attempt = one(spans, f"chat {MODEL}")
    on_attempt = attrs(attempt)
    assert on_attempt[names.ERROR_TYPE] == "upstream_error"
    assert attempt.status.status_code is StatusCode.ERROR
    assert on_attempt[names.USAGE_OUTPUT_TOKENS] == 3  # the role chunk carries no content
    assert on_attempt[names.USAGE_ESTIMATED] is True
    server = one(spans, SERVER_NAME)
    assert attrs(server)[names.ERROR_TYPE] == "upstream_error"
    assert attrs(server)[names.HTTP_RESPONSE_STATUS_CODE] == 200  # sent before the failure
    assert server.status.status_code is StatusCode.ERROR


# ------------------------------------------------------- retries and fallbacks


async def test_a_retried_attempt_is_a_second_attempt_span(start: Start, traced: Traced) -> None:
    async with start(pool("a", "b")) as gw:
        gw.backend("a").script(Script(error=UpstreamError("unreachable")))
        response = await gw.http.post(CHAT, json=chat_body())
        assert response.status_code == 200
    spans = await traced.wait_for(3)
    server = one(spans, SERVER_NAME)
    failed, answered = named(spans, f"chat {MODEL}")
    assert child_of(failed, server) and child_of(answered, server)
    assert attrs(failed)[names.DEPLOYMENT] == "m/0" and attrs(failed)[names.ATTEMPT] == 1
    assert attrs(failed)[names.ERROR_TYPE] == "upstream_error"
    assert failed.status.status_code is StatusCode.ERROR
    assert attrs(answered)[names.DEPLOYMENT] == "m/1" and attrs(answered)[names.ATTEMPT] == 2
    assert names.ERROR_TYPE not in attrs(answered)
    assert attrs(server)[names.DEPLOYMENT] == "m/1"
    assert [r[names.ROUTE_CANDIDATES] for r in routings(server)] == [["m/0", "m/1"]]


async def test_a_fallback_is_a_routing_event_and_an_attempt_span_of_its_model(
    start: Start, traced: Traced
) -> None:
    text = config(
        {"a": {}, "f": {}},
        {
            MODEL: {"deployments": [{"backend": "a"}], "fallbacks": ["f"], "retries": 0},
            "f": {"deployments": [{"backend": "f"}]},
        },
    )
    async with start(text) as gw:
        gw.backend("a").script(Script(error=UpstreamError("unreachable")))
        assert (await gw.http.post(CHAT, json=chat_body())).status_code == 200
    spans = await traced.wait_for(3)
    server = one(spans, SERVER_NAME)
    first_route, fallback_route = routings(server)
    assert first_route[names.MODEL] == MODEL and first_route[names.ROUTE_FALLBACKS] == ["f"]
    assert fallback_route[names.MODEL] == "f" and fallback_route[names.ROUTE_CANDIDATES] == ["f/0"]
    failed, answered = one(spans, f"chat {MODEL}"), one(spans, "chat f")
    assert attrs(failed)[names.FALLBACK] is False and attrs(failed)[names.ERROR_TYPE]
    assert attrs(answered)[names.FALLBACK] is True
    assert attrs(answered)[names.DEPLOYMENT] == "f/0" and attrs(answered)[names.ATTEMPT] == 2
    assert attrs(server)[names.DEPLOYMENT] == "f/0"


async def test_every_deployment_failing_is_a_server_error(start: Start, traced: Traced) -> None:
    async with start(pool("a", retries=0)) as gw:
        gw.backend("a").script(Script(error=UpstreamError("unreachable")))
        response = await gw.http.post(CHAT, json=chat_body())
        error_of(response, 502)
    spans = await traced.wait_for(2)
    server = one(spans, SERVER_NAME)
    assert attrs(server)[names.HTTP_RESPONSE_STATUS_CODE] == 502
    assert attrs(server)[names.ERROR_TYPE] == "upstream_error"
    assert server.status.status_code is StatusCode.ERROR
    assert attrs(server)[names.REQUEST_ID] == response.headers["x-request-id"]


# ------------------------------------------------------------------ hook error


@pytest.mark.parametrize("stream", [False, True])
async def test_a_failing_hook_is_an_error_on_the_server_span_and_no_attempt(
    start: Start, traced: Traced, stream: bool
) -> None:
    async with start(pool("a", hooks=[{"type": "explode", "name": "audit"}])) as gw:
        response = await gw.http.post(CHAT, json=chat_body(stream=stream))
        error_of(response, 500)
    [server] = await traced.wait_for(1)
    assert server.name == SERVER_NAME
    assert attrs(server)[names.ERROR_TYPE] == "hook_failed"
    assert attrs(server)[names.HTTP_RESPONSE_STATUS_CODE] == 500
    assert server.status.status_code is StatusCode.ERROR


async def test_a_failing_stream_hook_after_the_first_byte_is_recorded(
    start: Start, traced: Traced
) -> None:
    async with start(pool("a", hooks=[{"type": "explode-stream", "name": "tap"}])) as gw:
        response = await gw.http.post(CHAT, json=chat_body(stream=True))
        assert not sse_json(response.content)[1]
    spans = await traced.wait_for(2)
    server = one(spans, SERVER_NAME)
    assert attrs(server)[names.ERROR_TYPE] == "hook_failed"
    # The attempt itself went well: its span ended with the stream, no error.
    assert names.ERROR_TYPE not in attrs(one(spans, f"chat {MODEL}"))


# --------------------------------------------------------------- x-request-id


@pytest.mark.parametrize("stream", [False, True])
async def test_an_answer_from_a_request_hook_is_a_server_span_alone(
    start: Start, traced: Traced, stream: bool
) -> None:
    hooks = [{"type": "answer-early", "options": {"text": "cached"}}]
    async with start(pool("a", hooks=hooks)) as gw:
        response = await gw.http.post(CHAT, json=chat_body(stream=stream))
        assert response.status_code == 200 and gw.backend("a").calls == []
    [server] = await traced.wait_for(1)
    assert server.name == SERVER_NAME
    assert attrs(server)[names.HTTP_RESPONSE_STATUS_CODE] == 200
    assert routings(server) == []


async def test_x_request_id_is_kept_or_made_and_returned(start: Start, traced: Traced) -> None:
    async with start(pool("a")) as gw:
        kept = await gw.http.post(CHAT, json=chat_body(), headers={"x-request-id": "abc-123"})
        made = await gw.http.post(CHAT, json=chat_body())
        odd = await gw.http.post(CHAT, json=chat_body(), headers={"x-request-id": "a b"})
        failed = await gw.http.post(
            CHAT, json={"model": "nope", "messages": []}, headers={"x-request-id": "e-1"}
        )
        calls = gw.backend("a").calls
    assert kept.headers["x-request-id"] == "abc-123"
    assert len(made.headers["x-request-id"]) == 32
    assert odd.headers["x-request-id"] not in ("a b", "")
    assert failed.status_code >= 400 and failed.headers["x-request-id"] == "e-1"
    # Never the client's id upstream: vLLM takes x-request-id as its own
    # request id, and two clients sending the same one must not collide there.
    assert calls[0].ctx.trace is not None
    assert calls[0].ctx.trace.headers()["x-request-id"] == calls[0].ctx.request_id
    assert kept.json()["id"] == calls[0].ctx.request_id
    recorded = [attrs(s)[names.REQUEST_ID] for s in named(traced.spans(), SERVER_NAME)]
    assert "abc-123" in recorded and "e-1" in recorded


async def test_with_tracing_off_backends_get_no_trace(registry: Registry) -> None:
    async with in_process_gateway(pool("a"), registry=registry) as gw:
        assert gw.runtime.tracing is None
        response = await gw.http.post(CHAT, json=chat_body())
        assert response.status_code == 200 and response.headers["x-request-id"]
        assert gw.backend("a").calls[0].ctx.trace is None


# ------------------------------------------------------------------------ logs


@pytest.fixture
def log_records() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    handler.addFilter(TraceContextFilter())
    logger = logging.getLogger("gateway")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


async def test_log_records_carry_the_span_they_were_written_in(
    start: Start, traced: Traced, log_records: list[logging.LogRecord]
) -> None:
    # A hook that fails open is logged (by nomoat's hook chain) while the
    # request's SERVER span is current.
    async with start(pool("a", hooks=[{"type": "explode", "fail_open": True}])) as gw:
        assert (await gw.http.post(CHAT, json=chat_body())).status_code == 200
    server = one(await traced.wait_for(2), SERVER_NAME)
    trace_id, span_id = hex_ids(server)
    logged = [r for r in log_records if getattr(r, "otelTraceID", "0") != "0"]
    assert logged, [r.getMessage() for r in log_records]
    assert all(r.otelTraceID == trace_id for r in logged)  # type: ignore[attr-defined]
    assert any(r.otelSpanID == span_id for r in logged)  # type: ignore[attr-defined]
    outside = logging.LogRecord("gateway", logging.INFO, __file__, 1, "x", None, None)
    TraceContextFilter().filter(outside)
    assert outside.otelTraceID == "0"  # type: ignore[attr-defined]


async def test_a_failing_stream_hook_stops_the_generation_it_was_reading(
    start: Start, traced: Traced
) -> None:
    # The hook raises without closing the stream it reads: the gateway
    # closes it, so the backend stops (and the attempt span ends) at once.
    async with start(pool("a", hooks=[{"type": "explode-stream", "name": "tap"}])) as gw:
        gw.backend("a").script(Script(text="z" * 20, chunks=20, chunk_delay=0.01))
        response = await gw.http.post(CHAT, json=chat_body(stream=True))
        assert not sse_json(response.content)[1]
        call = gw.backend("a").calls[0]
        assert await call.wait_ended(within=1.0) in ("cancelled", "closed")
    assert call.chunks_sent < 20


async def test_a_deadline_passed_is_a_timeout_on_the_attempt(start: Start, traced: Traced) -> None:
    async with start(pool("a", timeout_seconds=0.05, retries=0)) as gw:
        gw.backend("a").script(Script(stall_after=0))
        response = await gw.http.post(CHAT, json=chat_body())
        error_of(response, 504)
    spans = await traced.wait_for(2)
    attempt = one(spans, f"chat {MODEL}")
    assert attrs(attempt)[names.ERROR_TYPE] == "timeout"
    assert attempt.status.status_code is StatusCode.ERROR
    assert attrs(one(spans, SERVER_NAME))[names.HTTP_RESPONSE_STATUS_CODE] == 504


async def test_a_client_leaving_a_json_request_cancels_the_attempt(
    start: Start, traced: Traced
) -> None:
    async with start(pool("a")) as gw:
        gw.backend("a").script(Script(stall_after=0))
        request = asyncio.ensure_future(gw.http.post(CHAT, json=chat_body()))
        await gw.backend("a").wait_for_calls(1)
        request.cancel()
        spans = await traced.wait_for(2)
    attempt = one(spans, f"chat {MODEL}")
    assert attrs(attempt)[names.ERROR_TYPE] == "cancelled"
    server = attrs(one(spans, SERVER_NAME))
    assert server[names.HTTP_RESPONSE_STATUS_CODE] == 499
    assert server[names.ERROR_TYPE] == "client_closed_request"


async def test_a_failure_logged_mid_stream_carries_the_trace_ids(
    start: Start, traced: Traced, log_records: list[logging.LogRecord]
) -> None:
    async with start(pool("a", hooks=[{"type": "explode-stream", "name": "tap"}])) as gw:
        response = await gw.http.post(CHAT, json=chat_body(stream=True))
        assert not sse_json(response.content)[1]
    server = one(await traced.wait_for(2), SERVER_NAME)
    trace_id, span_id = hex_ids(server)
    [failure] = [r for r in log_records if "tap failed" in r.getMessage()]
    assert failure.otelTraceID == trace_id  # type: ignore[attr-defined]
    assert failure.otelSpanID == span_id  # type: ignore[attr-defined]
