"""What an HTTP upstream receives of the trace: every request of a client
(whole or streamed) carries the attempt span's traceparent and the request
id; the attempt span records where it went (server.address and port) and
the model the upstream says answered. On a scripted transport."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from gateway.contract import Candidate
from gateway.telemetry import semconv as names
from gateway.telemetry.spans import AttemptSpan, Tracing
from tests.scripted_transport import ScriptedTransport, json_reply, sse_reply
from tests.upstream_kit import BASE_URL, ENGINE_MODEL, backend, chat_request, context, target

UPSTREAM_MODEL = "the-engines-own-name"
ANSWER: dict[str, Any] = {
    "id": "chatcmpl-up",
    "object": "chat.completion",
    "created": 1,
    "model": UPSTREAM_MODEL,
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
CHUNKS: list[dict[str, Any]] = [
    {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": UPSTREAM_MODEL,
        "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": "stop"}],
    },
    {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": UPSTREAM_MODEL,
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    },
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Attempt:
    def __init__(self) -> None:
        self.exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(self.exporter))
        tracing = Tracing(provider)
        request_span = tracing.request("POST", "/v1/chat/completions", [], "rid-1")
        self.span: AttemptSpan = request_span.attempt(
            "chat", chat_request(), Candidate(target(), "up"), fallback=False, upstream_id="up-1"
        )

    def ended(self) -> ReadableSpan:
        self.span.span.end()
        [span] = [s for s in self.exporter.get_finished_spans() if s.name.startswith("chat")]
        return span

    def traceparent(self) -> str:
        context = self.span.span.get_span_context()
        return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


@pytest.mark.anyio
@pytest.mark.parametrize("stream", [False, True])
async def test_each_upstream_request_carries_the_attempts_trace(stream: bool) -> None:
    attempt = Attempt()
    transport = ScriptedTransport(sse_reply(CHUNKS) if stream else json_reply(ANSWER))
    upstream = backend(transport)
    ctx = replace(context(), trace=attempt.span)
    if stream:
        request = chat_request(stream=True)
        _ = [chunk async for chunk in upstream.chat_stream(request, target(), ctx)]
    else:
        await upstream.chat(chat_request(), target(), ctx)
    [sent] = transport.sent
    assert sent.headers is not None
    assert sent.headers["traceparent"] == attempt.traceparent()
    assert sent.headers["x-request-id"] == "up-1"
    recorded = dict(attempt.ended().attributes or {})
    assert recorded[names.RESPONSE_MODEL] == UPSTREAM_MODEL
    assert BASE_URL.startswith("http://upstream.test/")
    assert recorded[names.SERVER_ADDRESS] == "upstream.test"
    assert recorded[names.SERVER_PORT] == 80
    assert recorded[names.REQUEST_MODEL] == ENGINE_MODEL


@pytest.mark.anyio
async def test_without_tracing_nothing_is_added_to_upstream_requests() -> None:
    transport = ScriptedTransport(json_reply(ANSWER))
    await backend(transport).chat(chat_request(), target(), context())
    [sent] = transport.sent
    assert not sent.headers
