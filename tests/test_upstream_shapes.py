"""Answers and streams shaped as the main hosted APIs document them
(tests/data/upstream: OpenAI, Groq, Together, Mistral, DeepSeek, Fireworks,
xAI, vLLM; each file names its source), relayed by the `openai` backend type
through the pipeline: each must decode, keep what it says (text, refusals,
tool calls, finish reasons, usage), and reach the client in OpenAI's exact
shape, checked against OpenAI's published OpenAPI description."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from gateway import wire
from gateway.endpoints import CHAT, COMPLETIONS
from tests.openai_schema import assert_answer
from tests.scripted_transport import ScriptedTransport
from tests.upstream_kit import (
    MODEL,
    backend,
    chat_request,
    completion_request,
    context,
    encoded,
    events,
    pipeline,
    reply_of,
    shape,
    shapes,
)

STREAMS = [path for path in shapes() if shape(path)["stream"]]
# Usage details OpenAI's description names; others (DeepSeek's cache counters,
# Groq's timings) are dropped.
PROMPT_DETAILS = {"cached_tokens", "audio_tokens", "text_tokens", "image_tokens"}
COMPLETION_DETAILS = {
    "reasoning_tokens",
    "audio_tokens",
    "accepted_prediction_tokens",
    "rejected_prediction_tokens",
    "text_tokens",
}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_the_shapes_are_all_there() -> None:
    providers = {path.stem.split("_")[0] for path in shapes()}
    assert {"openai", "groq", "together", "mistral", "deepseek", "fireworks"} <= providers
    for path in shapes():
        data = shape(path)
        assert data["source"].startswith("https://"), path
        assert ("chunks" if data["stream"] else "answer") in data, path


async def relay(data: dict[str, Any], *, include_usage: bool = True) -> Any:
    """What the client receives: one answer as JSON, or a stream's events."""
    made = backend(ScriptedTransport(reply_of(data)))
    gateway = pipeline([made])
    chat = data["endpoint"] == "chat"
    try:
        if not data["stream"]:
            if chat:
                return encoded(await gateway.answer(CHAT, chat_request(), context()))
            return encoded(await gateway.answer(COMPLETIONS, completion_request(), context()))
        options: dict[str, Any] = {"stream": True}
        if include_usage:
            options["stream_options"] = {"include_usage": True}
        if chat:
            return await events(await gateway.stream(CHAT, chat_request(**options), context()))
        return await events(
            await gateway.stream(COMPLETIONS, completion_request(**options), context())
        )
    finally:
        await made.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("path", shapes(), ids=lambda path: path.stem)
async def test_a_documented_shape_reaches_the_client_in_openais_shape(path: Path) -> None:
    data = shape(path)
    chat = data["endpoint"] == "chat"
    sent = await relay(data)
    if data["stream"]:
        for chunk in sent:
            assert_answer(chunk, stream=True, chat=chat)
        same_stream(data["chunks"], sent, chat=chat)
    else:
        assert_answer(sent, stream=False, chat=chat)
        same_answer(data["answer"], sent, chat=chat)


@pytest.mark.anyio
@pytest.mark.parametrize("path", STREAMS, ids=lambda path: path.stem)
async def test_without_include_usage_no_chunk_carries_usage(path: Path) -> None:
    data = shape(path)
    sent = await relay(data, include_usage=False)
    assert all("usage" not in chunk for chunk in sent)
    assert all(chunk["choices"] for chunk in sent)
    for chunk in sent:
        assert_answer(chunk, stream=True, chat=data["endpoint"] == "chat")


def same_answer(source: dict[str, Any], sent: dict[str, Any], *, chat: bool) -> None:
    assert sent["id"] == context().request_id and sent["model"] == MODEL
    assert sent.get("system_fingerprint") == (source.get("system_fingerprint") or None)
    assert len(sent["choices"]) == len(source["choices"])
    for mine, theirs in zip(sent["choices"], source["choices"], strict=True):
        assert mine["finish_reason"] == wire.FINISH_REASONS[theirs["finish_reason"]]
        if not chat:
            assert mine["text"] == theirs["text"]
            assert mine["logprobs"] == theirs.get("logprobs")
            continue
        message, original = mine["message"], theirs["message"]
        assert message["content"] == original.get("content")
        assert message["refusal"] == original.get("refusal")
        assert calls(message.get("tool_calls")) == calls(original.get("tool_calls"))
        assert tokens(mine["logprobs"]) == tokens(theirs.get("logprobs"))
    same_usage(source.get("usage"), sent.get("usage"))


def same_stream(source: list[dict[str, Any]], sent: list[dict[str, Any]], *, chat: bool) -> None:
    assert {chunk["id"] for chunk in sent} == {context().request_id}
    assert {chunk["model"] for chunk in sent} == {MODEL}
    assert streamed(sent, chat) == streamed(source, chat)
    usages = [chunk for chunk in sent if chunk.get("usage")]
    last_usage = next((c["usage"] for c in reversed(source) if c.get("usage")), None)
    if last_usage is None:
        assert not usages
        return
    # One usage chunk, the last, without choices; "usage": null on the other
    # chat chunks, left out of the others in a text completion's stream.
    assert usages == [sent[-1]] and sent[-1]["choices"] == []
    assert all(("usage" in chunk) == chat for chunk in sent[:-1])
    same_usage(last_usage, sent[-1]["usage"])


def streamed(chunks: list[dict[str, Any]], chat: bool) -> dict[str, Any]:
    """What a client assembles from a stream: per choice its text, refusal,
    tool calls (id, name, arguments) and mapped finish reason."""
    text: dict[int, str] = defaultdict(str)
    refusal: dict[int, str] = defaultdict(str)
    tools: dict[tuple[int, int], list[str]] = defaultdict(lambda: ["", "", ""])
    finish: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            index = choice["index"]
            if choice.get("finish_reason"):
                finish[index] = wire.FINISH_REASONS[choice["finish_reason"]]
            if not chat:
                text[index] += choice["text"]
                continue
            delta = choice["delta"]
            text[index] += delta.get("content") or ""
            refusal[index] += delta.get("refusal") or ""
            for call in delta.get("tool_calls") or []:
                entry = tools[(index, call["index"])]
                function = call.get("function") or {}
                entry[0] += call.get("id") or ""
                entry[1] += function.get("name") or ""
                entry[2] += function.get("arguments") or ""
    return {"text": dict(text), "refusal": dict(refusal), "tools": dict(tools), "finish": finish}


def calls(tool_calls: list[dict[str, Any]] | None) -> list[tuple[str, str, str]]:
    return [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in tool_calls or []]


def tokens(logprobs: dict[str, Any] | None) -> list[tuple[str, float, list[str]]]:
    content = (logprobs or {}).get("content") or []
    return [(t["token"], t["logprob"], [a["token"] for a in t["top_logprobs"]]) for t in content]


def same_usage(source: dict[str, Any] | None, sent: dict[str, Any] | None) -> None:
    if source is None:
        assert sent is None
        return
    assert sent is not None
    for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert sent[key] == source[key]
    for details, known in (
        ("prompt_tokens_details", PROMPT_DETAILS),
        ("completion_tokens_details", COMPLETION_DETAILS),
    ):
        theirs = {k: v for k, v in (source.get(details) or {}).items() if k in known}
        assert sent.get(details, {}) == theirs
