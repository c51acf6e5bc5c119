"""What issue 12 records of a stream holds for the cheap relay too
(:mod:`gateway.relay`, which yields framed bytes, not typed chunks): the
exchange's usage, time to first token and tokens counted on a cut stream
(metrics, access log), the attempt span's usage, finish reasons, time to
first chunk and the upstream's model, error events, and a client leaving.

The upstream is the real OpenAI-compatible backend on a scripted transport
(no socket), registered as a backend type of its own."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.backends.openai_compat import OpenAICompatibleBackend, OpenAICompatibleConfig
from gateway.contract import Backend, BackendType, PluginManifest
from gateway.registry import Registry
from gateway.relay import ChunkRelay
from gateway.telemetry import semconv as names
from gateway.testing.inprocess import InProcessGateway, in_process_gateway, registry_with
from tests.scripted_transport import Reply, ScriptedTransport, json_reply, sse_reply

from .support import MODEL, chat_body, sse_json
from .test_traces import SERVER_NAME, Traced, attrs, hex_ids, log_records, one

pytestmark = pytest.mark.anyio
__all__ = ["log_records"]  # a fixture, used by name

ENGINE_MODEL = "upstream-model"
CHAT = "/v1/chat/completions"
Open = Callable[..., AbstractAsyncContextManager[InProcessGateway]]


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "cmpl-upstream",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": ENGINE_MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def stream(texts: list[str], *, usage: bool = True) -> list[dict[str, Any]]:
    """A role chunk, one chunk per text, the finish, the usage."""
    chunks = [chunk({"role": "assistant", "content": ""})]
    chunks += [chunk({"content": text}) for text in texts]
    chunks.append(chunk({}, "stop"))
    if usage:
        last = chunk({})
        last["choices"] = []
        last["usage"] = {"prompt_tokens": 7, "completion_tokens": 11, "total_tokens": 18}
        chunks.append(last)
    return chunks


def config(log: Path) -> str:
    return f"""
[backends.up]
type = "scripted"
base_url = "http://upstream.test/v1"
models = ["{ENGINE_MODEL}"]
probe_interval = 3600

[models.{MODEL}]
deployments = [{{ backend = "up", model = "{ENGINE_MODEL}" }}]

[access_log]
enabled = true
path = "{log}"
"""


@pytest.fixture
def relayed(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """Every payload the relay was fed (so a test knows the relay ran)."""
    seen: list[bytes] = []
    feed = ChunkRelay.feed

    def recording(self: ChunkRelay, payload: bytes) -> bytes:
        seen.append(payload)
        return feed(self, payload)

    monkeypatch.setattr(ChunkRelay, "feed", recording)
    return seen


@pytest.fixture
def open_gateway(registry: Registry, tmp_path: Path) -> Open:
    """``async with open_gateway(reply, traced) as gw``: a gateway whose one
    upstream answers the probe, then ``reply``."""

    @asynccontextmanager
    async def run(reply: Reply, traced: Traced | None = None) -> AsyncIterator[InProcessGateway]:
        transport = ScriptedTransport(
            json_reply({"object": "list", "data": [{"id": ENGINE_MODEL}]}), reply
        )

        async def make(name: str, options: OpenAICompatibleConfig) -> Backend:
            made = OpenAICompatibleBackend(name, "openai", options, transport=transport)
            await made.start()
            return made

        manifest = PluginManifest(
            "scripted-upstream",
            backends={"scripted": BackendType(OpenAICompatibleConfig, make)},
        )
        async with in_process_gateway(
            config(tmp_path / "access.jsonl"),
            registry=registry_with([manifest], registry),
            tracing=traced.tracing if traced is not None else None,
        ) as gw:
            yield gw

    return run


def samples(text: str) -> dict[str, float]:
    """Every sample's value summed over its labels, by name."""
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name] = found.get(sample.name, 0.0) + sample.value
    return found


def access_log(tmp_path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (tmp_path / "access.jsonl").read_text().splitlines()]


async def test_a_relayed_stream_counts_its_usage_and_time_to_first_token(
    open_gateway: Open, relayed: list[bytes], tmp_path: Path
) -> None:
    async with open_gateway(sse_reply(stream(["a", "b", "c"]))) as gw:
        response = await gw.http.post(CHAT, json=chat_body(stream=True))
        events, done = sse_json(response.content)
        assert done and "usage" not in events[-1]
        found = samples((await gw.http.get("/metrics")).text)
    assert len(relayed) == 6
    assert found["gen_ai_server_time_to_first_token_seconds_count"] == 1
    assert found["gen_ai_client_token_usage_sum"] == 18
    [record] = access_log(tmp_path)
    assert (record["status"], record["stream"], record["tokens_estimated"]) == (200, True, False)
    assert (record["prompt_tokens"], record["completion_tokens"]) == (7, 11)
    assert 0 < record["ttft_ms"] <= record["latency_ms"]


async def test_a_relayed_stream_cut_by_the_upstream_ends_with_an_error_and_counts_tokens(
    open_gateway: Open, relayed: list[bytes], tmp_path: Path
) -> None:
    cut = sse_reply(stream(["a", "b", "c"], usage=False)[:4], done=False)
    cut.cut = aiohttp.ClientPayloadError("cut")
    async with open_gateway(cut) as gw:
        response = await gw.http.post(CHAT, json=chat_body(stream=True))
        events, done = sse_json(response.content)
        assert not done and events[-1]["error"]["code"] == "upstream_error"
        found = samples((await gw.http.get("/metrics")).text)
    assert relayed
    [record] = access_log(tmp_path)
    assert (record["status"], record["error"]) == (502, "upstream_error")
    # Three content chunks: three tokens, estimated.
    assert (record["completion_tokens"], record["tokens_estimated"]) == (3, True)
    assert record["ttft_ms"] > 0
    assert found["gen_ai_client_operation_duration_seconds_count"] == 1


async def test_a_client_leaving_a_relayed_stream_is_logged_as_499(
    open_gateway: Open, relayed: list[bytes], tmp_path: Path
) -> None:
    held = sse_reply(stream(["a", "b"], usage=False)[:3], done=False)
    held.hold = asyncio.Event()
    async with open_gateway(held) as gw:
        async with gw.http.stream("POST", CHAT, json=chat_body(stream=True)) as response:
            assert (await anext(response.aiter_lines())).startswith("data: ")
        deployment = f"{MODEL}/0"
        assert gw.runtime.serving().stats.in_flight(deployment) == 0
    assert relayed
    [record] = access_log(tmp_path)
    assert (record["status"], record["error"]) == (499, "client_closed_request")
    assert (record["completion_tokens"], record["tokens_estimated"]) == (2, True)


async def test_the_attempt_span_of_a_relayed_stream(
    open_gateway: Open, relayed: list[bytes]
) -> None:
    traced = Traced()
    async with open_gateway(sse_reply(stream(["a", "b"])), traced) as gw:
        response = await gw.http.post(
            CHAT, json=chat_body(stream=True, stream_options={"include_usage": True})
        )
        events, done = sse_json(response.content)
        assert done and events[-1]["usage"]["completion_tokens"] == 11
    spans = await traced.wait_for(2)
    assert relayed
    server = one(spans, SERVER_NAME)
    attempt = attrs(one(spans, f"chat {ENGINE_MODEL}"))
    assert attempt[names.USAGE_INPUT_TOKENS] == 7
    assert attempt[names.USAGE_OUTPUT_TOKENS] == 11
    assert names.USAGE_ESTIMATED not in attempt
    assert attempt[names.RESPONSE_FINISH_REASONS] == ["stop"]
    assert attempt[names.RESPONSE_ID] == events[0]["id"]
    assert attempt[names.RESPONSE_MODEL] == ENGINE_MODEL
    assert 0 < attempt[names.RESPONSE_TIME_TO_FIRST_CHUNK] < 5
    assert attrs(server)[names.HTTP_RESPONSE_STATUS_CODE] == 200


async def test_a_relayed_stream_that_fails_leaves_its_spans_in_error(
    open_gateway: Open, relayed: list[bytes]
) -> None:
    traced = Traced()
    cut = sse_reply(stream(["a", "b"], usage=False)[:3], done=False)
    async with open_gateway(cut, traced) as gw:
        response = await gw.http.post(CHAT, json=chat_body(stream=True))
        events, done = sse_json(response.content)
        assert not done and "error" in events[-1]
    spans = await traced.wait_for(2)
    assert relayed
    attempt = one(spans, f"chat {ENGINE_MODEL}")
    on_attempt = attrs(attempt)
    assert on_attempt[names.ERROR_TYPE] == "upstream_error"
    assert (on_attempt[names.USAGE_OUTPUT_TOKENS], on_attempt[names.USAGE_ESTIMATED]) == (2, True)
    assert attempt.status.status_code.name == "ERROR"
    assert attrs(one(spans, SERVER_NAME))[names.ERROR_TYPE] == "upstream_error"


async def test_a_failure_logged_mid_relay_carries_the_trace_ids(
    open_gateway: Open, relayed: list[bytes], log_records: list[logging.LogRecord]
) -> None:
    traced = Traced()
    broken = sse_reply(stream(["a"], usage=False)[:2], done=False)
    broken.cut = RuntimeError("not a transport error")
    async with open_gateway(broken, traced) as gw:
        response = await gw.http.post(CHAT, json=chat_body(stream=True))
        events, done = sse_json(response.content)
        assert not done and events[-1]["error"]["type"] == "server_error"
    spans = await traced.wait_for(2)
    assert relayed
    server = one(spans, SERVER_NAME)
    trace_id, span_id = hex_ids(server)
    [failure] = [r for r in log_records if "stream failed after its first byte" in r.getMessage()]
    assert failure.otelTraceID == trace_id  # type: ignore[attr-defined]
    assert failure.otelSpanID == span_id  # type: ignore[attr-defined]
    assert attrs(server)[names.ERROR_TYPE] == "RuntimeError"


async def test_with_content_captured_a_stream_takes_the_typed_path(
    open_gateway: Open, relayed: list[bytes]
) -> None:
    """The captured answer needs typed chunks: the relay stands aside."""
    traced = Traced()
    traced.tracing.capture_content = True
    async with open_gateway(sse_reply(stream(["a", "b"])), traced) as gw:
        response = await gw.http.post(CHAT, json=chat_body(stream=True))
        assert sse_json(response.content)[1]
    spans = await traced.wait_for(2)
    assert relayed == []
    attempt = attrs(one(spans, f"chat {ENGINE_MODEL}"))
    assert "ab" in str(attempt[names.OUTPUT_MESSAGES])
