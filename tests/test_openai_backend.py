"""The `openai` backend type on a scripted transport: what it sends upstream,
what it refuses (malformed answers, errors in place of answers, answers that
did not finish), and, through the pipeline, what a client gets when a hosted
upstream refuses the key or rate-limits (another deployment, Retry-After)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
import pytest

from gateway import wire
from gateway.endpoints import CHAT
from gateway.errors import GatewayError, UpstreamError, UpstreamRateLimitedError
from tests.scripted_transport import Reply, ScriptedTransport, json_reply, sse_reply
from tests.upstream_kit import (
    ENGINE_MODEL,
    MODEL,
    backend,
    chat_request,
    completion_request,
    context,
    encoded,
    pipeline,
    started,
    target,
)

HELLO: dict[str, Any] = {
    "id": "chatcmpl-up",
    "object": "chat.completion",
    "created": 1,
    "model": ENGINE_MODEL,
    "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Hi!"}, "finish_reason": "stop"}
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}


def chunk(content: str | None = None, finish: str | None = None, **extra: Any) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "id": "chatcmpl-up",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": ENGINE_MODEL,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        **extra,
    }


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def chat(reply: Reply) -> wire.ChatCompletion:
    return await backend(ScriptedTransport(reply)).chat(chat_request(), target(), context())


async def stream(reply: Reply) -> list[wire.ChatCompletionChunk]:
    made = backend(ScriptedTransport(reply))
    return [c async for c in made.chat_stream(chat_request(stream=True), target(), context())]


# ------------------------------------------------------------ what goes up


@pytest.mark.anyio
async def test_the_answer_names_the_gateway_request_and_model() -> None:
    answer = await chat(json_reply(HELLO))
    assert (answer.id, answer.model) == (context().request_id, MODEL)
    assert encoded(answer)["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hi!",
        "refusal": None,
    }


@pytest.mark.anyio
async def test_a_request_goes_up_as_the_engine_model_unstreamed() -> None:
    transport = ScriptedTransport(json_reply(HELLO))
    made = backend(transport)
    await made.chat(chat_request(temperature=0.5, max_tokens=9), target(), context())
    sent = transport.sent[0]
    assert str(sent.url) == "http://upstream.test/v1/chat/completions"
    assert sent.json() == {
        "model": ENGINE_MODEL,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 9,
        "stream": False,
        "temperature": 0.5,
    }


@pytest.mark.anyio
async def test_a_stream_always_asks_for_usage() -> None:
    text = {"index": 0, "text": "Hi", "finish_reason": "stop"}
    piece = {"id": "c", "object": "text_completion", "created": 1, "model": "m", "choices": [text]}
    transport = ScriptedTransport(sse_reply([piece]))
    made = backend(transport)
    request = completion_request(stream=True)
    [c async for c in made.completion_stream(request, target(), context())]
    sent = transport.sent[0]
    assert str(sent.url).endswith("/v1/completions")
    assert sent.json()["stream"] is True
    assert sent.json()["stream_options"] == {"include_usage": True}


def test_the_key_is_read_from_api_key_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOSTED_KEY", "sk-from-env")
    transport = ScriptedTransport()
    backend(transport, api_key_env="HOSTED_KEY")
    assert transport.options is not None
    assert transport.options.headers["Authorization"] == "Bearer sk-from-env"


def test_a_missing_key_variable_is_refused_at_start_up(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HOSTED_KEY", raising=False)
    with pytest.raises(ValueError, match="HOSTED_KEY"):
        backend(ScriptedTransport(), api_key_env="HOSTED_KEY")


# ------------------------------------------------------ what is refused


@pytest.mark.anyio
@pytest.mark.parametrize(
    "body",
    [
        b"<html>502 Bad Gateway</html>",
        b'{"id": "chatcmpl-up", "object": "chat.completion", "cho',
        b'{"id": "x", "object": "chat.completion", "created": 1, "model": "m"}',
        b'{"id": "x", "object": "text_completion", "created": 1, "model": "m", "choices": []}',
        b"",
    ],
    ids=["html", "truncated", "no-choices", "wrong-object", "empty"],
)
async def test_an_answer_not_in_openais_format_is_refused(
    body: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="gateway.upstream"),
        pytest.raises(UpstreamError, match="not in OpenAI's format"),
    ):
        await chat(Reply(200, [body]))
    assert "hosted" in caplog.text


@pytest.mark.anyio
async def test_an_error_body_with_status_200_is_an_error(caplog: pytest.LogCaptureFixture) -> None:
    body = {"error": {"message": "upstream exploded near sk-proj-AbCd", "type": "server_error"}}
    with (
        caplog.at_level(logging.ERROR, logger="gateway.upstream"),
        pytest.raises(UpstreamError) as caught,
    ):
        await chat(json_reply(body))
    assert "reported an error" in caught.value.message and "sk-" not in caught.value.message
    assert "sk-proj-AbCd" in caplog.text


@pytest.mark.anyio
@pytest.mark.parametrize("reason", ["abort", "error", "insufficient_system_resource"])
async def test_an_answer_that_did_not_finish_is_refused(reason: str) -> None:
    body = {**HELLO, "choices": [{**HELLO["choices"][0], "finish_reason": reason}]}
    with pytest.raises(UpstreamError, match="not in OpenAI's format"):
        await chat(json_reply(body))


@pytest.mark.anyio
async def test_an_error_event_mid_stream_ends_the_stream_with_an_error() -> None:
    error = {"error": {"message": "engine died: sk-proj-AbCd", "type": "server_error"}}
    made = backend(ScriptedTransport(sse_reply([chunk("Hi"), error])))
    chunks = made.chat_stream(chat_request(stream=True), target(), context())
    first = await anext(chunks)
    assert first.choices[0].delta.content == "Hi"
    with pytest.raises(UpstreamError, match="reported an error") as caught:
        await anext(chunks)
    assert "sk-" not in caught.value.message


@pytest.mark.anyio
async def test_a_chunk_that_did_not_finish_is_refused() -> None:
    with pytest.raises(UpstreamError):
        await stream(sse_reply([chunk("Hi"), chunk(finish="abort")]))


@pytest.mark.anyio
async def test_usage_sent_beside_choices_is_moved_to_one_last_chunk() -> None:
    usage = {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
    got = await stream(sse_reply([chunk("Hi", usage=usage), chunk(finish="stop", usage=usage)]))
    assert [c.usage for c in got[:-1]] == [wire.UNSET, wire.UNSET]
    assert got[-1].choices == [] and got[-1].usage == wire.Usage(**usage)


@pytest.mark.anyio
async def test_a_usage_chunk_after_usage_beside_choices_is_sent_once() -> None:
    usage = {"prompt_tokens": 4, "completion_tokens": 1, "total_tokens": 5}
    final = {**chunk(), "choices": [], "usage": usage}
    got = await stream(sse_reply([chunk("Hi", "stop", usage=usage), final]))
    assert [bool(c.choices) for c in got] == [True, False]
    assert isinstance(got[-1].usage, wire.Usage)


# ------------------------------------------------------- through the pipeline


@pytest.mark.anyio
async def test_a_refused_key_gives_the_client_a_502() -> None:
    transport = ScriptedTransport()
    made = await started(transport)
    transport.add(json_reply({"error": {"message": "Incorrect API key: sk-proj-AbCd"}}, 401))
    try:
        with pytest.raises(UpstreamError) as caught:
            await pipeline([made]).answer(CHAT, chat_request(), context())
    finally:
        await made.aclose()
    assert caught.value.status_code == 502 and "sk-" not in caught.value.message
    assert caught.value.body().error.code == "upstream_error"


@pytest.mark.anyio
async def test_a_rate_limited_deployment_is_passed_over_for_the_next() -> None:
    limited, healthy = ScriptedTransport(), ScriptedTransport()
    first, second = await started(limited, "first"), await started(healthy, "second")
    limited.add(json_reply({"error": {"message": "slow down"}}, 429, {"retry-after": "20"}))
    healthy.add(json_reply(HELLO))
    try:
        answer = await pipeline([first, second]).answer(CHAT, chat_request(), context())
    finally:
        await first.aclose()
        await second.aclose()
    assert answer.choices[0].message.content == "Hi!"
    assert [s.method for s in limited.sent] == ["GET", "POST"]
    assert [s.method for s in healthy.sent] == ["GET", "POST"]


@pytest.mark.anyio
async def test_a_stream_rate_limited_before_its_first_byte_moves_on() -> None:
    limited, healthy = ScriptedTransport(), ScriptedTransport()
    first, second = await started(limited, "first"), await started(healthy, "second")
    limited.add(json_reply({"error": {"message": "slow down"}}, 429))
    healthy.add(sse_reply([chunk("Hi"), chunk(finish="stop")]))
    try:
        chunks = await pipeline([first, second]).stream(CHAT, chat_request(stream=True), context())
        got = [c async for c in chunks]
    finally:
        await first.aclose()
        await second.aclose()
    assert "".join(c.choices[0].delta.content or "" for c in got if c.choices) == "Hi"


@pytest.mark.anyio
async def test_when_every_deployment_is_rate_limited_the_client_learns_when_to_retry() -> None:
    transport = ScriptedTransport(
        json_reply({"error": {"message": "x"}}, 429, {"retry-after": "9"})
    )
    made = backend(transport)
    with pytest.raises(UpstreamRateLimitedError) as caught:
        await pipeline([made]).answer(CHAT, chat_request(), context())
    assert caught.value.status_code == 503 and caught.value.headers == {"Retry-After": "9"}


@pytest.mark.anyio
async def test_the_next_round_waits_as_long_as_retry_after_asked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    transport = ScriptedTransport(
        json_reply({"error": {"message": "x"}}, 429, {"retry-after": "3"}), json_reply(HELLO)
    )
    pauses: list[float] = []
    real_sleep = asyncio.sleep

    async def recorded(seconds: float) -> None:
        pauses.append(seconds)
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", recorded)
    answer = await pipeline([backend(transport)], rounds=1).answer(CHAT, chat_request(), context())
    assert answer.choices[0].message.content == "Hi!"
    assert pauses == [3.0]


@pytest.mark.anyio
async def test_a_stream_cut_after_its_first_byte_reaches_the_client_as_an_error() -> None:
    pieces = [
        b'data: {"id":"x","object":"chat.completion.chunk","created":1,"model":"m",'
        b'"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\ndata: {"id"'
    ]
    reply = Reply(200, pieces, cut=aiohttp.ClientPayloadError("reset"))
    made = backend(ScriptedTransport(reply))
    chunks = await pipeline([made]).stream(CHAT, chat_request(stream=True), context())
    first = await anext(chunks)
    assert first.choices[0].delta.content == "Hi"
    with pytest.raises(GatewayError, match="unreachable or timed out"):
        await anext(chunks)
