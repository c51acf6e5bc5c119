"""Every answer and chunk shape the embedded llama.cpp engine sends, checked
against OpenAI's published OpenAPI description (tests/openai_schema.py), not
only against what the SDK tolerates: whole answers and streams, with and
without usage, logprobs, several choices, a tool call, text completions."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from conftest import MODEL

from tests.openai_schema import assert_answer

pytestmark = pytest.mark.e2e

HI: Any = [{"role": "user", "content": "Say hi."}]
TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CHAT_VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "logprobs": {"logprobs": True, "top_logprobs": 2},
    "two-choices": {"n": 2, "temperature": 0.8, "seed": 7},
    "json-object": {"response_format": {"type": "json_object"}},
    "tool-call": {
        "max_tokens": 60,  # room for the whole call
        "tools": [TOOL],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    },
}
STREAM_VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "usage": {"stream_options": {"include_usage": True}},
    "logprobs-and-usage": {
        "logprobs": True,
        "top_logprobs": 2,
        "stream_options": {"include_usage": True},
    },
    "two-choices": {"n": 2, "temperature": 0.8, "seed": 7},
}
COMPLETION_VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "logprobs": {"logprobs": 2},
    "echo": {"echo": True},
}


def events(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    body = response.content
    assert body.endswith(b"data: [DONE]\n\n")
    raw = body[: -len(b"data: [DONE]\n\n")].split(b"\n\n")[:-1]
    assert all(event.startswith(b"data: ") for event in raw)
    return [json.loads(event[len(b"data: ") :]) for event in raw]


def answer(response: httpx.Response) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize("variant", CHAT_VARIANTS)
def test_chat_answers(http: httpx.Client, variant: str) -> None:
    body = {"model": MODEL, "messages": HI, "max_tokens": 12, **CHAT_VARIANTS[variant]}
    sent = answer(http.post("/v1/chat/completions", json=body))
    assert_answer(sent, stream=False, chat=True)
    if variant == "tool-call":
        assert sent["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("variant", STREAM_VARIANTS)
def test_chat_chunks(http: httpx.Client, variant: str) -> None:
    body = {"model": MODEL, "messages": HI, "max_tokens": 8, "stream": True}
    chunks = events(http.post("/v1/chat/completions", json={**body, **STREAM_VARIANTS[variant]}))
    for chunk in chunks:
        assert_answer(chunk, stream=True, chat=True)
    assert any(chunk.get("usage") for chunk in chunks) == ("usage" in variant)


@pytest.mark.parametrize("variant", COMPLETION_VARIANTS)
def test_completion_answers(http: httpx.Client, variant: str) -> None:
    body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6}
    sent = answer(http.post("/v1/completions", json={**body, **COMPLETION_VARIANTS[variant]}))
    assert_answer(sent, stream=False, chat=False)


@pytest.mark.parametrize("usage", [False, True])
def test_completion_chunks(http: httpx.Client, usage: bool) -> None:
    body: dict[str, Any] = {"model": MODEL, "prompt": "Once upon", "max_tokens": 6, "stream": True}
    if usage:
        body["stream_options"] = {"include_usage": True}
    chunks = events(http.post("/v1/completions", json=body))
    for chunk in chunks:
        assert_answer(chunk, stream=True, chat=False)
    assert any(chunk.get("usage") for chunk in chunks) == usage
