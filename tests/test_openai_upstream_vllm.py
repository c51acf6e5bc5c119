"""The real vLLM of the test run behind the gateway, twice: as a hosted API
(the `openai` backend type) and as a vLLM pool (the `vllm` type). vLLM's
answers carry fields OpenAI's do not (stop_reason, prompt_logprobs,
kv_transfer_params, reasoning_content, null system_fingerprint): every answer
and chunk the client gets must still be in OpenAI's exact shape, checked
against OpenAI's published OpenAPI description."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from typing import Any

import httpx
import msgspec
import openai
import pytest

from gateway import wire
from gateway.backends.stream_client import RelayHandlers, StreamConnection
from gateway.backends.upstream import Timeouts, Upstream
from gateway.relay import ChunkRelay
from tests.conftest import Server, config_with_key, running_server
from tests.openai_schema import CHAT, assert_answer, problems
from tests.vllm_server import VllmServer

# The first test also pays for vLLM (install on a clean machine, start-up).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

HI: Any = [{"role": "user", "content": "Say hi."}]
MODELS = ["via-openai-type", "via-vllm-type"]


@pytest.fixture(scope="module")
def gateway(vllm: VllmServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    extra = f"""
        [backends.hosted]
        type = "openai"
        base_url = "{vllm.base_url}"
        models = ["{vllm.model}"]

        [backends.pool]
        type = "vllm"
        base_url = "{vllm.base_url}"

        [models.via-openai-type]
        deployments = [{{ backend = "hosted", model = "{vllm.model}" }}]

        [models.via-vllm-type]
        deployments = [{{ backend = "pool", model = "{vllm.model}" }}]
        """
    with running_server(tmp_path_factory.mktemp("vllm-hosted"), config_with_key(extra)) as live:
        yield live


@pytest.fixture
def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=gateway.api_key, max_retries=0)


@pytest.fixture
def raw(gateway: Server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {gateway.api_key}"}
    with httpx.Client(base_url=gateway.base_url, headers=headers, timeout=300) as http:
        yield http


def events(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    body = response.content
    assert body.endswith(b"data: [DONE]\n\n"), body[-500:]
    raw_events = body[: -len(b"data: [DONE]\n\n")].split(b"\n\n")[:-1]
    assert all(event.startswith(b"data: ") for event in raw_events)
    return [json.loads(event[len(b"data: ") :]) for event in raw_events]


def test_vllm_itself_answers_in_a_shape_openai_does_not(vllm: VllmServer) -> None:
    """Why the relay matters: vLLM's own answer fails OpenAI's description."""
    body = {"model": vllm.model, "messages": HI, "max_tokens": 4}
    answer = httpx.post(f"{vllm.base_url}/chat/completions", json=body, timeout=300).json()
    assert problems(answer, CHAT)


@pytest.mark.parametrize("model", MODELS)
def test_chat_answers(client: openai.OpenAI, model: str) -> None:
    raw_reply = client.chat.completions.with_raw_response.create(
        model=model, messages=HI, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    assert_answer(raw_reply.http_response.json(), stream=False, chat=True)
    reply = raw_reply.parse()
    assert reply.model == model and reply.choices[0].message.content
    assert reply.choices[0].logprobs is not None and reply.choices[0].logprobs.content
    assert reply.usage is not None and 0 < reply.usage.completion_tokens <= 6


@pytest.mark.parametrize("model", MODELS)
def test_streams(client: openai.OpenAI, raw: httpx.Client, model: str) -> None:
    stream = client.chat.completions.create(
        model=model,
        messages=HI,
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    for usage in (False, True):
        body: dict[str, Any] = {"model": model, "messages": HI, "max_tokens": 6, "stream": True}
        if usage:
            body["stream_options"] = {"include_usage": True}
        sent = events(raw.post("/chat/completions", json=body))
        for chunk in sent:
            assert_answer(chunk, stream=True, chat=True)
        assert any(chunk.get("usage") for chunk in sent) == usage


@pytest.mark.parametrize("model", MODELS)
def test_text_completions(raw: httpx.Client, model: str) -> None:
    body: dict[str, Any] = {"model": model, "prompt": "The capital of France is", "max_tokens": 5}
    whole = raw.post("/completions", json={**body, "logprobs": 2})
    assert whole.status_code == 200, whole.text
    assert_answer(whole.json(), stream=False, chat=False)
    stream = {**body, "stream": True, "stream_options": {"include_usage": True}}
    for chunk in events(raw.post("/completions", json=stream)):
        assert_answer(chunk, stream=True, chat=False)


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_vllms_content_chunks_take_the_relays_fast_path(
    vllm: VllmServer, chat: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's own stream through the cheap relay (gateway/relay.py): its
    content chunks keep their bytes (only the first chunk, the finish and the
    usage are decoded), and each event is what the typed path sends."""
    decoded: list[bytes] = []
    typed = ChunkRelay._typed

    def recording(self: ChunkRelay, payload: bytes) -> bytes:
        decoded.append(payload)
        return typed(self, payload)

    monkeypatch.setattr(ChunkRelay, "_typed", recording)
    body: dict[str, Any] = {
        "model": vllm.model,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if chat:
        body["messages"] = HI
    else:
        body["prompt"] = "The capital of France is"
    path = "/chat/completions" if chat else "/completions"
    reply = httpx.post(f"{vllm.base_url}{path}", json=body, timeout=300)
    payloads = [
        line.removeprefix(b"data: ")
        for line in reply.content.split(b"\n\n")
        if line.startswith(b"data: ") and line != b"data: [DONE]"
    ]
    relay = ChunkRelay("chatcmpl-gw", "m", chat=chat, include_usage=True, started=0.0)
    relayed = [relay.feed(payload) for payload in payloads]
    decoder = wire.ChatCompletionChunk if chat else wire.Completion
    for payload, event in zip(payloads, relayed, strict=True):
        chunk = msgspec.json.decode(payload, type=decoder)
        chunk.id, chunk.model = "chatcmpl-gw", "m"
        if chat and not isinstance(chunk.usage, wire.Usage):
            chunk.usage = None
        assert json.loads(event[len(b"data: ") :]) == json.loads(wire.encoder.encode(chunk))
    assert len(payloads) >= 5
    # The role chunk (chat) or first chunk, the finish chunk, the usage chunk.
    assert len(decoded) <= 3, [p[-80:] for p in decoded]


def test_the_own_stream_client_reads_vllms_streams_and_keeps_its_connection(
    vllm: VllmServer,
) -> None:
    """gateway/backends/stream_client.py on vLLM's own wire (uvicorn's
    chunked framing and keep-alive): the payloads it feeds the relay are the
    ones a plain HTTP client reads, [DONE] ends the stream, and the second
    stream goes on the first one's connection."""
    body = {
        "model": vllm.model,
        "max_tokens": 8,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": HI,
    }
    reply = httpx.post(f"{vllm.base_url}/chat/completions", json=body, timeout=300)
    expected = [
        line.removeprefix(b"data: ")
        for line in reply.content.split(b"\n\n")
        if line.startswith(b"data: ") and line != b"data: [DONE]"
    ]

    async def streamed() -> tuple[list[list[bytes]], int]:
        upstream = Upstream("vllm", vllm.base_url, timeouts=Timeouts(5.0, 300.0))
        connects = 0
        assert upstream._streams is not None
        connect = upstream._streams.connect

        async def counted() -> StreamConnection:
            nonlocal connects
            connects += 1
            return await connect()

        upstream._streams.connect = counted  # type: ignore[method-assign]
        runs = []
        try:
            for _ in range(2):
                fed: list[bytes] = []

                def feed(payload: bytes, fed: list[bytes] = fed) -> bytes:
                    fed.append(payload)
                    return b"x"

                handlers = RelayHandlers(feed, lambda: b"end")
                events = upstream.relay(
                    "/chat/completions", msgspec.json.encode(body), None, handlers
                )
                async with contextlib.aclosing(events):
                    received = b"".join([data async for data in events])
                assert received.endswith(b"end") and received.count(b"x") == len(fed)
                runs.append(fed)
                await asyncio.sleep(0.05)  # (the last chunk may follow [DONE])
        finally:
            await upstream.aclose()
        return runs, connects

    runs, connects = asyncio.run(streamed())

    def deltas(payloads: list[bytes]) -> list[Any]:
        # The same tokens (temperature 0); ids and times differ per request.
        return [[c.get("delta") for c in json.loads(p)["choices"]] for p in payloads]

    assert deltas(runs[0]) == deltas(runs[1]) == deltas(expected)
    assert connects == 1
