"""The bytes on the wire, checked with raw HTTP: SSE framing, chunk and response
objects exactly as OpenAI sends them (keys present, ``null`` where OpenAI sends
``null``)."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from conftest import MODEL

# Starts an engine or a server: not part of the fast layer.
pytestmark = pytest.mark.e2e

COUNT: Any = [{"role": "user", "content": "Count from 1 to 10, separated by commas."}]
DONE = b"data: [DONE]\n\n"


def sse_events(response: httpx.Response) -> list[dict[str, Any]]:
    """Parse a whole SSE body strictly: ``data: <json>\\n\\n`` events, then
    ``data: [DONE]\\n\\n`` and nothing after it."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    body = response.content
    assert body.endswith(DONE)
    assert body.count(b"[DONE]") == 1
    raw_events = body[: -len(DONE)].split(b"\n\n")
    assert raw_events[-1] == b""  # the last JSON event ended with a blank line too
    events = []
    for raw in raw_events[:-1]:
        assert raw.startswith(b"data: "), raw
        assert b"\n" not in raw  # one line per event
        payload = json.loads(raw[len(b"data: ") :])
        assert isinstance(payload, dict)
        events.append(payload)
    assert events
    return events


def chat_body(**extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": COUNT, "temperature": 0, "max_tokens": 8, **extra}


def test_sse_framing(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json=chat_body(stream=True))
    assert response.headers["cache-control"] == "no-cache"
    events = sse_events(response)
    assert len(events) >= 3


def test_sse_framing_line_by_line(http: httpx.Client) -> None:
    """Read as a client reads a live stream: data line, blank line, ..."""
    with http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as response:
        assert response.status_code == 200
        lines = list(response.iter_lines())
    assert lines[-2:] == ["data: [DONE]", ""]
    assert all(line.startswith("data: ") for line in lines[0::2])
    assert all(line == "" for line in lines[1::2])


def test_chunk_objects(http: httpx.Client) -> None:
    events = sse_events(http.post("/v1/chat/completions", json=chat_body(stream=True)))
    ids = {event["id"] for event in events}
    assert len(ids) == 1
    assert next(iter(ids)).startswith("chatcmpl-")
    for event in events:
        assert event["object"] == "chat.completion.chunk"
        assert event["model"] == MODEL
        assert isinstance(event["created"], int)
        # Without include_usage, no usage key at all.
        assert "usage" not in event
        [choice] = event["choices"]
        assert choice["index"] == 0
        assert "logprobs" in choice and choice["logprobs"] is None
        assert "finish_reason" in choice
    assert len({event["created"] for event in events}) == 1
    first = events[0]["choices"][0]
    assert first["delta"]["role"] == "assistant"
    assert first["finish_reason"] is None
    assert all("role" not in event["choices"][0]["delta"] for event in events[1:])
    assert [e["choices"][0]["finish_reason"] for e in events[:-1]] == [None] * (len(events) - 1)
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    text = "".join(event["choices"][0]["delta"].get("content") or "" for event in events)
    assert text.startswith("1, 2")


def test_include_usage_chunks(http: httpx.Client) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True})
    events = sse_events(http.post("/v1/chat/completions", json=body))
    *rest, last = events
    for event in rest:
        assert "usage" in event and event["usage"] is None
        assert len(event["choices"]) == 1
    assert last["choices"] == []
    usage = last["usage"]
    assert set(usage) >= {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert usage["completion_tokens"] == 8
    assert usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"]
    assert last["id"] == rest[0]["id"]


def test_include_usage_false(http: httpx.Client) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": False})
    events = sse_events(http.post("/v1/chat/completions", json=body))
    assert all("usage" not in event and event["choices"] for event in events)


def test_non_stream_response(http: httpx.Client) -> None:
    response = http.post("/v1/chat/completions", json=chat_body())
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    data = response.json()
    assert data["object"] == "chat.completion"
    assert data["id"].startswith("chatcmpl-")
    assert data["model"] == MODEL
    assert isinstance(data["created"], int)
    # A string or absent in OpenAI's description, never null; this engine has none.
    assert "system_fingerprint" not in data
    [choice] = data["choices"]
    assert choice["index"] == 0
    assert choice["finish_reason"] == "length"
    assert "logprobs" in choice and choice["logprobs"] is None
    message = choice["message"]
    assert message["role"] == "assistant"
    assert isinstance(message["content"], str) and message["content"]
    assert "refusal" in message and message["refusal"] is None
    assert "tool_calls" not in message
    usage = data["usage"]
    assert usage["completion_tokens"] == 8
    assert usage["prompt_tokens"] + usage["completion_tokens"] == usage["total_tokens"]


def test_logprobs_wire_shape(http: httpx.Client) -> None:
    data = http.post("/v1/chat/completions", json=chat_body(logprobs=True, top_logprobs=2)).json()
    logprobs = data["choices"][0]["logprobs"]
    assert logprobs["refusal"] is None
    [first, *_] = logprobs["content"]
    assert set(first) == {"token", "logprob", "bytes", "top_logprobs"}
    assert bytes(first["bytes"]).decode() == first["token"]
    assert [set(alt) for alt in first["top_logprobs"]] == [{"token", "logprob", "bytes"}] * 2


def test_tool_call_wire_shape(http: httpx.Client) -> None:
    tool = {
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
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What's the weather in Paris?"}],
        "temperature": 0,
        "max_tokens": 32,
        "tools": [tool],
        "tool_choice": "required",
    }
    data = http.post("/v1/chat/completions", json=body).json()
    message = data["choices"][0]["message"]
    assert data["choices"][0]["finish_reason"] == "tool_calls"
    assert message["content"] is None
    [call] = message["tool_calls"]
    assert call["type"] == "function"
    assert call["id"].startswith("call_")
    assert call["function"]["name"] == "get_weather"
    assert isinstance(call["function"]["arguments"], str)
    assert isinstance(json.loads(call["function"]["arguments"])["city"], str)

    events = sse_events(http.post("/v1/chat/completions", json={**body, "stream": True}))
    deltas = [d for e in events for c in e["choices"] for d in c["delta"].get("tool_calls", [])]
    assert deltas[0]["index"] == 0
    assert deltas[0]["type"] == "function"
    assert deltas[0]["function"]["name"] == "get_weather"
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_completion_sse(http: httpx.Client) -> None:
    body = {
        "model": MODEL,
        "prompt": "The sky is",
        "max_tokens": 5,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events(http.post("/v1/completions", json=body))
    assert len({event["id"] for event in events}) == 1
    assert events[0]["id"].startswith("cmpl-")
    *rest, last = events
    for event in rest:
        assert event["object"] == "text_completion"
        # A text completion's usage is an object or absent (OpenAI's description).
        assert "usage" not in event
        [choice] = event["choices"]
        assert isinstance(choice["text"], str)
    assert last["choices"] == []
    assert last["usage"]["completion_tokens"] == 5


def test_completion_response(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": "The sky is", "max_tokens": 5, "temperature": 0}
    data = http.post("/v1/completions", json=body).json()
    assert data["object"] == "text_completion"
    assert data["id"].startswith("cmpl-")
    [choice] = data["choices"]
    assert set(choice) == {"index", "text", "logprobs", "finish_reason"}
    assert choice["logprobs"] is None
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + 5


def test_models_wire(http: httpx.Client) -> None:
    data = http.get("/v1/models").json()
    assert data["object"] == "list"
    [model] = [m for m in data["data"] if m["id"] == MODEL]
    assert model["object"] == "model"
    assert isinstance(model["created"], int)
    assert isinstance(model["owned_by"], str)
    assert http.get(f"/v1/models/{MODEL}").json() == model


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 20_000}]}),
        ("/v1/chat/completions", {"messages": COUNT, "temperature": 5}),
        ("/v1/completions", {"prompt": "x " * 20_000}),
    ],
)
def test_stream_fails_before_first_byte(
    http: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    """A streamed request refused up front gets a real status and a JSON error,
    not a 200 event stream."""
    response = http.post(path, json={"model": MODEL, "stream": True, **body})
    assert response.status_code == 400
    assert response.headers["content-type"].startswith("application/json")
    assert set(response.json()) == {"error"}
