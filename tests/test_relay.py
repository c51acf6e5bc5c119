"""The cheap relay (gateway/relay.py) sends what the typed path sends.

Every documented upstream stream shape (tests/data/upstream) goes through
both paths of one pipeline, with and without ``include_usage``: the client's
events must be the same JSON, event for event. vLLM-shaped streams, whose
content chunks take the fast path, must be the same bytes. Failures (an error
event, no ``[DONE]``, a cut connection) end the stream as on the typed path,
and a client that leaves closes the upstream's connection.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest

from gateway.endpoints import CHAT, COMPLETIONS
from gateway.relay import ChunkRelay
from gateway.sse import sse_events
from tests.scripted_transport import Reply, ScriptedTransport, sse_reply
from tests.upstream_kit import (
    MODEL,
    backend,
    chat_request,
    completion_request,
    context,
    pipeline,
    reply_of,
    shape,
    shapes,
)
from tests.wired_streams import SPLITS, wire

STREAMS = [path for path in shapes() if shape(path)["stream"]]
DONE = b"data: [DONE]\n\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def fed(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The payloads the relay was fed (so a test knows it took the relay)."""
    seen: list[bytes] = []
    feed = ChunkRelay.feed

    def recording(self: ChunkRelay, payload: bytes) -> bytes:
        seen.append(payload)
        return feed(self, payload)

    monkeypatch.setattr(ChunkRelay, "feed", recording)
    return seen


async def body(events: AsyncIterator[bytes]) -> bytes:
    return b"".join([data async for data in events])


# The relay's upstream client: aiohttp, or the gateway's own
# (gateway/backends/stream_client.py), the upstream's bytes read as written
# (a read per chunk; other splits: test_any_split_of_the_upstreams_bytes...).
CLIENTS = ["aiohttp", "own-piece"]


@pytest.fixture(params=CLIENTS)
def client(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


async def both(
    reply: Reply, *, chat: bool = True, include_usage: bool, client: str = "aiohttp"
) -> tuple[bytes, bytes]:
    """The client's bytes through the typed path, then through the relay
    (on ``client``)."""
    options: dict[str, Any] = {"stream": True}
    if include_usage:
        options["stream_options"] = {"include_usage": True}
    bodies = []
    for relayed in (False, True):
        scripted = ScriptedTransport(reply)
        made = backend(scripted)
        if relayed and client != "aiohttp":
            wire(made, scripted, SPLITS[client.removeprefix("own-")])
        gateway = pipeline([made])
        try:
            if chat:
                request = chat_request(**options)
                if relayed:
                    bodies.append(
                        await body(sse_events(await gateway.events(CHAT, request, context())))
                    )
                else:
                    chunks = await gateway.stream(CHAT, request, context())
                    bodies.append(await body(sse_events(chunks)))
            else:
                request = completion_request(**options)
                if relayed:
                    events = await gateway.events(COMPLETIONS, request, context())
                    bodies.append(await body(sse_events(events)))
                else:
                    chunks = await gateway.stream(COMPLETIONS, request, context())
                    bodies.append(await body(sse_events(chunks)))
        finally:
            await made.aclose()
    return bodies[0], bodies[1]


def parsed(raw: bytes) -> list[Any]:
    """Each event's JSON ([DONE] as the string)."""
    out: list[Any] = []
    for event in raw.split(b"\n\n")[:-1]:
        assert event.startswith(b"data: "), raw
        data = event[len(b"data: ") :]
        out.append("[DONE]" if data == b"[DONE]" else json.loads(data))
    return out


@pytest.mark.anyio
@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("path", STREAMS, ids=lambda path: path.stem)
async def test_a_documented_stream_is_relayed_as_the_typed_path_sends_it(
    path: Path, include_usage: bool, fed: list[bytes], client: str
) -> None:
    data = shape(path)
    typed, relayed = await both(
        reply_of(data), chat=data["endpoint"] == "chat", include_usage=include_usage, client=client
    )
    assert fed, "the relay was not used"
    assert relayed.endswith(DONE)
    assert parsed(relayed) == parsed(typed)


@pytest.mark.anyio
async def test_any_split_of_the_upstreams_bytes_is_relayed_as_the_typed_path_sends_it(
    fed: list[bytes],
) -> None:
    """The own client, every documented stream read byte by byte (boundaries
    inside events, chunk sizes and CRLFs) and all in one read."""
    for path in STREAMS:
        data = shape(path)
        for split in ("byte", "once"):
            typed, relayed = await both(
                reply_of(data),
                chat=data["endpoint"] == "chat",
                include_usage=True,
                client=f"own-{split}",
            )
            assert relayed.endswith(DONE), (path.stem, split)
            assert parsed(relayed) == parsed(typed), (path.stem, split)
    assert fed


def vllm_chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "chatcmpl-upstream",
        "object": "chat.completion.chunk",
        "created": 1700000123,
        "model": "upstream-model",
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }


def vllm_stream(texts: list[str]) -> list[dict[str, Any]]:
    usage = vllm_chunk({})
    usage["choices"] = []
    usage["usage"] = {"prompt_tokens": 5, "completion_tokens": len(texts), "total_tokens": 9}
    return [
        vllm_chunk({"role": "assistant", "content": ""}),
        *(vllm_chunk({"content": text}) for text in texts),
        vllm_chunk({}, "stop"),
        usage,
    ]


@pytest.mark.anyio
@pytest.mark.parametrize("include_usage", [True, False])
async def test_content_chunks_take_the_fast_path_and_keep_their_bytes(
    include_usage: bool, fed: list[bytes], client: str
) -> None:
    texts = ["Hello", ' "quoted"', "\nnew line", "", "back\\slash", "}]},{"]
    typed, relayed = await both(
        sse_reply(vllm_stream(texts)), include_usage=include_usage, client=client
    )
    assert len(fed) == len(texts) + 3
    assert relayed == typed
    assert b"chatcmpl-upstream" not in relayed and b"upstream-model" not in relayed


@pytest.mark.anyio
async def test_text_completion_chunks_keep_their_bytes(fed: list[bytes], client: str) -> None:
    def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
        return {
            "id": "cmpl-upstream",
            "object": "text_completion",
            "created": 1700000123,
            "model": "upstream-model",
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
        }

    usage = chunk("")
    usage["choices"], usage["usage"] = (
        [],
        {
            "prompt_tokens": 1,
            "completion_tokens": 2,
            "total_tokens": 3,
        },
    )
    reply = sse_reply([chunk("a"), chunk("b"), chunk("", "stop"), usage])
    typed, relayed = await both(reply, chat=False, include_usage=True, client=client)
    assert fed
    assert relayed == typed


@pytest.mark.anyio
async def test_what_the_gateway_does_not_forward_is_dropped_on_the_relay_too(
    fed: list[bytes], client: str
) -> None:
    # vLLM's stop_reason, a reasoning field, a field of the envelope the
    # gateway does not know, and text that is not one string: typed path.
    odd = vllm_chunk({"content": "a", "reasoning_content": "secret"})
    odd["choices"][0]["stop_reason"] = None
    odd["x_upstream"] = {"trace": "internal"}
    raw_odd = (
        b'{"id":"chatcmpl-upstream","object":"chat.completion.chunk","created":1700000123,'
        b'"model":"upstream-model","choices":[{"index":0,"delta":{"content":"a","refusal":"b"},'
        b'"logprobs":null,"finish_reason":null}]}'
    )
    stream = vllm_stream(["x"])
    reply = sse_reply([stream[0], stream[1], odd, raw_odd, *stream[2:]])
    typed, relayed = await both(reply, include_usage=True, client=client)
    assert parsed(relayed) == parsed(typed)
    assert b"secret" not in relayed and b"stop_reason" not in relayed
    assert b"x_upstream" not in relayed
    assert b'"refusal":"b"' in relayed


@pytest.mark.anyio
@pytest.mark.parametrize(
    "reply",
    [
        sse_reply([vllm_chunk({"content": "a"}), {"error": {"message": "engine died"}}]),
        sse_reply([vllm_chunk({"content": "a"}), vllm_chunk({"content": "b"})], done=False),
        Reply(
            200,
            [b"data: " + msgspec.json.encode(vllm_chunk({"content": "a"})) + b"\n\n"],
            {"content-type": "text/event-stream"},
            cut=aiohttp.ClientPayloadError("cut"),
        ),
    ],
    ids=["error-event", "no-done", "cut"],
)
async def test_a_stream_that_fails_after_its_first_byte_ends_with_the_same_error_event(
    reply: Reply, fed: list[bytes], client: str
) -> None:
    typed, relayed = await both(reply, include_usage=False, client=client)
    assert fed
    assert not relayed.endswith(DONE)
    assert parsed(relayed) == parsed(typed)
    assert "error" in parsed(relayed)[-1]


@pytest.mark.anyio
async def test_a_client_that_leaves_closes_the_upstream_connection() -> None:
    transport = ScriptedTransport(sse_reply(vllm_stream(["a", "b", "c"])))
    made = backend(transport)
    gateway = pipeline([made])
    try:
        events = await gateway.events(CHAT, chat_request(stream=True), context())
        assert isinstance(events, AsyncIterator)
        first = await anext(events)
        assert isinstance(first, bytes) and first.startswith(b"data: ")
        await events.aclose()  # type: ignore[attr-defined]
        (response,) = transport.responses
        assert response.closed and not response.released
    finally:
        await made.aclose()


@pytest.mark.anyio
async def test_a_relayed_stream_leaves_the_in_flight_count_and_feeds_the_stats() -> None:
    transport = ScriptedTransport(sse_reply(vllm_stream(["a", "b"])))
    made = backend(transport)
    gateway = pipeline([made])
    try:
        events = await gateway.events(CHAT, chat_request(stream=True), context())
        deployment = f"{MODEL}/0"
        assert gateway.stats.in_flight(deployment) == 1
        assert (await body(sse_events(events))).endswith(DONE)
        assert gateway.stats.in_flight(deployment) == 0
        (response,) = transport.responses
        assert response.released and not response.closed
    finally:
        await made.aclose()


def test_usage_is_read_from_the_last_chunk_and_content_is_timed() -> None:
    relay = ChunkRelay("chatcmpl-1", "m", chat=True, include_usage=False, started=0.0)
    events = [relay.feed(msgspec.json.encode(c)) for c in vllm_stream(["a", "b"])]
    assert relay.usage is not None and relay.usage.completion_tokens == 2
    assert relay.first_content is not None
    assert events[-1] == b""  # the usage chunk, not asked for
    assert relay.finish() == b""


def test_usage_on_chunks_with_choices_is_moved_to_the_end() -> None:
    relay = ChunkRelay("chatcmpl-1", "m", chat=True, include_usage=True, started=0.0)
    chunk = vllm_chunk({"content": "a"})
    chunk["usage"] = {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    sent = json.loads(relay.feed(msgspec.json.encode(chunk))[len(b"data: ") :])
    assert sent["usage"] is None
    last = json.loads(relay.finish()[len(b"data: ") :])
    assert last["choices"] == [] and last["usage"]["total_tokens"] == 2


def test_a_payload_that_is_not_a_chunk_is_refused() -> None:
    relay = ChunkRelay("chatcmpl-1", "m", chat=True, include_usage=False, started=0.0)
    relay.feed(msgspec.json.encode(vllm_chunk({"role": "assistant", "content": ""})))
    with pytest.raises(msgspec.DecodeError):
        relay.feed(b'{"error":{"message":"overloaded"}}')
    with pytest.raises(msgspec.DecodeError):
        relay.feed(msgspec.json.encode(vllm_chunk({"content": "a"}))[:-3])


@pytest.fixture
def typed_chunks(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The payloads the relay decoded (the rest kept their bytes)."""
    seen: list[bytes] = []
    typed = ChunkRelay._typed

    def recording(self: ChunkRelay, payload: bytes) -> bytes:
        seen.append(payload)
        return typed(self, payload)

    monkeypatch.setattr(ChunkRelay, "_typed", recording)
    return seen


@pytest.mark.anyio
@pytest.mark.parametrize("include_usage", [True, False])
async def test_vllms_content_chunks_take_the_fast_path_without_its_extra_fields(
    include_usage: bool, typed_chunks: list[bytes], client: str
) -> None:
    # vLLM 0.32 writes "token_ids": null on every content chunk of a chat
    # stream (the typed path drops it), and stop_reason, prompt_token_ids and
    # token_ids on a completion's.
    stream = vllm_stream(["Hello", " world", ' "x"'])
    for chunk in stream[1:-2]:
        chunk["choices"][0]["token_ids"] = None
    typed, relayed = await both(sse_reply(stream), include_usage=include_usage, client=client)
    assert relayed == typed
    assert b"token_ids" not in relayed
    assert len(typed_chunks) == 3  # the role, finish and usage chunks only


@pytest.mark.anyio
async def test_vllms_completion_chunks_take_the_fast_path_without_its_extra_fields(
    typed_chunks: list[bytes], client: str
) -> None:
    def chunk(text: str, finish: str | None = None) -> dict[str, Any]:
        choice = {
            "index": 0,
            "text": text,
            "logprobs": None,
            "finish_reason": finish,
            "stop_reason": None,
            "prompt_token_ids": None,
            "token_ids": None,
        }
        return {
            "id": "cmpl-upstream",
            "object": "text_completion",
            "created": 1700000123,
            "model": "upstream-model",
            "choices": [choice],
        }

    usage = {
        **chunk(""),
        "choices": [],
        "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
    }
    reply = sse_reply([chunk("a"), chunk("b"), chunk("c"), chunk("", "stop"), usage])
    typed, relayed = await both(reply, chat=False, include_usage=True, client=client)
    assert relayed == typed
    assert b"token_ids" not in relayed and b"stop_reason" not in relayed
    # The first chunk teaches the envelope; b and c keep their bytes.
    assert len(typed_chunks) == 3


def vllm_events(texts: list[str]) -> list[bytes]:
    return [b"data: " + msgspec.json.encode(chunk) + b"\n\n" for chunk in vllm_stream(texts)]


@pytest.mark.anyio
@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("path", STREAMS, ids=lambda path: path.stem)
async def test_a_stream_read_in_one_piece_is_relayed_as_the_typed_path_sends_it(
    path: Path, include_usage: bool, fed: list[bytes], client: str
) -> None:
    """Every event, [DONE] included, in one network read (a busy upstream):
    the read is split once on its blank lines."""
    data = shape(path)
    reply = reply_of(data)
    whole = Reply(reply.status, [b"".join(reply.pieces)], reply.headers)
    typed, relayed = await both(
        whole, chat=data["endpoint"] == "chat", include_usage=include_usage, client=client
    )
    assert fed, "the relay was not used"
    assert relayed.endswith(DONE)
    assert parsed(relayed) == parsed(typed)


@pytest.mark.anyio
@pytest.mark.parametrize(
    "pieces",
    [
        # A comment line among the events: the read takes the line by line path.
        [b": ping\n\n" + b"".join(vllm_events(["a", "b"])) + b"data: [DONE]\n\n"],
        # Carriage returns, an event split across reads, a missing space.
        [
            b"".join(vllm_events(["a"])).replace(b"\n", b"\r\n"),
            b"".join(vllm_events(["b"]))[:9],
            b"".join(vllm_events(["b"]))[9:] + b"data:" + b"".join(vllm_events(["c"]))[5:],
            b"data: [DONE]\n\n",
        ],
    ],
    ids=["comment", "crlf-split-nospace"],
)
async def test_reads_the_fast_paths_refuse_are_read_line_by_line(
    pieces: list[bytes], fed: list[bytes], client: str
) -> None:
    reply = Reply(200, pieces, {"content-type": "text/event-stream"})
    typed, relayed = await both(reply, include_usage=False, client=client)
    assert fed
    assert relayed.endswith(DONE)
    assert parsed(relayed) == parsed(typed)
    texts = [e["choices"][0]["delta"].get("content") for e in parsed(relayed)[:-1]]
    assert "".join(t for t in texts if t) in ("ab", "abc")
