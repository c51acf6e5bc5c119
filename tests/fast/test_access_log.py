"""The access log: one JSON line per request with its id, the trace and span
ids of the span current when it arrived (whoever set it up), the model
asked for and the deployment that answered, status, tokens, latency and time
to first token; never the prompt or the answer."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import msgspec
import pytest
from opentelemetry.sdk.trace import TracerProvider

from gateway.access_log import AccessRecord
from gateway.errors import UpstreamError
from gateway.testing import Script

from .conftest import Start
from .support import MODEL, chat_body, error_of, pool, sse_json

pytestmark = pytest.mark.anyio

PROMPT = "a prompt that must never reach a log 7c1e"
KEYS = {field.encode_name for field in msgspec.structs.fields(AccessRecord)}


def with_log(path: Path, *names: str) -> str:
    return pool(*names) + f'\n[access_log]\nenabled = true\npath = "{path}"\n'


def lines(path: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        assert set(record) == KEYS
    return records


async def test_one_line_per_request_and_never_the_prompt(start: Start, tmp_path: Path) -> None:
    log = tmp_path / "logs" / "access.jsonl"
    messages = [{"role": "user", "content": PROMPT}]
    async with start(with_log(log, "a", "b")) as gw:
        answer = await gw.http.post("/v1/chat/completions", json=chat_body(messages=messages))
        assert answer.status_code == 200
        stream = await gw.http.post(
            "/v1/chat/completions", json=chat_body(messages=messages, stream=True)
        )
        events, done = sse_json(stream.content)
        assert done
        error_of(await gw.http.post("/v1/chat/completions", json=chat_body(model="nope")), 404)
        gw.backend("a").script(Script(error=UpstreamError("down")))
        retried = await gw.http.post("/v1/chat/completions", json=chat_body(messages=messages))
        assert retried.status_code == 200
    text = log.read_text()
    assert PROMPT not in text
    assert answer.json()["choices"][0]["message"]["content"] not in text
    first, streamed, missing, moved = lines(log)
    assert first["request_id"] == answer.json()["id"]
    assert first["path"] == "/v1/chat/completions"
    assert (first["status"], first["error"], first["stream"]) == (200, None, False)
    assert (first["model"], first["served_model"]) == (MODEL, MODEL)
    assert (first["deployment"], first["backend"], first["attempts"]) == ("m/0", "a", 1)
    usage = answer.json()["usage"]
    assert (first["prompt_tokens"], first["completion_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    assert first["latency_ms"] > 0 and first["ttft_ms"] is None
    assert first["trace_id"] is None and first["span_id"] is None
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert streamed["request_id"] == events[0]["id"]
    assert streamed["stream"] is True and streamed["completion_tokens"] > 0
    assert 0 < streamed["ttft_ms"] <= streamed["latency_ms"]
    assert (missing["status"], missing["error"], missing["model"]) == (
        404,
        "model_not_found",
        "nope",
    )
    assert missing["served_model"] == "" and missing["prompt_tokens"] is None
    # The first deployment failed, the second answered.
    assert (moved["deployment"], moved["backend"], moved["attempts"]) == ("m/1", "b", 2)


async def test_a_stream_cut_by_the_client_is_logged_as_499(start: Start, tmp_path: Path) -> None:
    log = tmp_path / "access.jsonl"
    async with start(with_log(log, "a")) as gw:
        gw.backend("a").script(Script(stall_after=2))
        async with gw.http.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True)
        ) as response:
            assert (await anext(response.aiter_lines())).startswith("data: ")
    [record] = lines(log)
    assert (record["status"], record["error"], record["stream"]) == (
        499,
        "client_closed_request",
        True,
    )
    # What was generated before the cut: one content chunk, no usage.
    assert (record["completion_tokens"], record["tokens_estimated"]) == (1, True)
    assert record["prompt_tokens"] is None


async def test_the_line_carries_the_current_trace(start: Start, tmp_path: Path) -> None:
    """Read through the OpenTelemetry API: a span current when the request
    arrives (here the test's own, as a tracing middleware's would be) names it."""
    log = tmp_path / "access.jsonl"
    tracer = TracerProvider().get_tracer("test")
    async with start(with_log(log, "a")) as gw:
        with tracer.start_as_current_span("POST /v1/chat/completions") as span:
            response = await gw.http.post("/v1/chat/completions", json=chat_body())
            assert response.status_code == 200
    [record] = lines(log)
    context = span.get_span_context()
    assert record["trace_id"] == format(context.trace_id, "032x")
    assert record["span_id"] == format(context.span_id, "016x")


async def test_the_access_log_is_off_unless_asked_for(start: Start, tmp_path: Path) -> None:
    log = tmp_path / "access.jsonl"
    config = pool("a") + f'\n[access_log]\npath = "{log}"\n'
    async with start(config) as gw:
        assert (await gw.http.post("/v1/chat/completions", json=chat_body())).status_code == 200
    assert not log.exists()
