"""Every answer and chunk shape the embedded llama.cpp engine sends, checked
against OpenAI's published OpenAPI description (tests/openai_schema.py), not
only against what the SDK tolerates: whole answers and streams, with and
without usage, logprobs, several choices, a tool call, text completions;
Responses (whole, streamed, with a function call, deleted) and embeddings
(floats and base64), which are checked against nomoat's own description
(gateway/openapi/openai_endpoints.json, what the fuzz suite holds answers
to) too."""

from __future__ import annotations

import base64
import json
from functools import cache
from typing import Any

import httpx
import jsonschema
import numpy as np
import pytest
from conftest import MODEL

from gateway.app import OPENAPI_FILE
from tests.openai_schema import EMBEDDINGS, RESPONSE, RESPONSE_EVENT, assert_answer, assert_valid

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
        # Greedy: sampled, the model once wrote a city past 60 tokens (CI), a
        # call cut short, which comes back as text without tool_calls.
        "temperature": 0,
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


# ------------------------------------------------ Responses and embeddings


# What a streamed Response's event holds (its `data`), by nomoat's description.
EVENT_DATA = "ResponseStreamEvent/properties/data/contentSchema"


@cache
def _nomoat_validator(name: str) -> jsonschema.Draft202012Validator:
    document = json.loads(OPENAPI_FILE.read_text())
    schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
    return jsonschema.Draft202012Validator(schema)


def assert_described(instance: Any, name: str) -> None:
    """``instance`` is what nomoat's own description says of ``name`` (a
    component, or a path below one)."""
    found = [
        f"{'/'.join(map(str, error.absolute_path)) or '(root)'}: {error.message}"
        for error in _nomoat_validator(name).iter_errors(instance)
    ]
    assert not found, f"not a {name} by nomoat's description:\n" + "\n".join(found)


RESPONSE_VARIANTS: dict[str, dict[str, Any]] = {
    "plain": {},
    "items-and-instructions": {
        "instructions": "Answer briefly.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Say hi."}]},
            {"role": "assistant", "content": "Hi!"},
            {"type": "message", "role": "user", "content": "Again."},
        ],
        "metadata": {"case": "items"},
    },
    "function-call": {
        "max_output_tokens": 60,
        # Greedy, as chat's tool-call variant: sampled, a call written past
        # its 60 tokens is cut, and a cut call comes back as text.
        "temperature": 0,
        "tools": [{"type": "function", **TOOL["function"]}],
        "tool_choice": {"type": "function", "name": "get_weather"},
    },
    "json-schema": {
        "text": {
            "format": {
                "type": "json_schema",
                "name": "greeting",
                "schema": TOOL["function"]["parameters"],
            }
        }
    },
}


def response_events(response: httpx.Response) -> list[dict[str, Any]]:
    """A streamed Response's events, each ``event:`` line its data's type."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = []
    for raw in response.text.split("\n\n")[:-1]:
        kind, data = raw.split("\n")
        assert kind.startswith("event: ") and data.startswith("data: "), raw
        event = json.loads(data[len("data: ") :])
        assert event["type"] == kind[len("event: ") :]
        events.append(event)
    return events


@pytest.mark.parametrize("variant", RESPONSE_VARIANTS)
def test_response_answers(http: httpx.Client, variant: str) -> None:
    body = {"model": MODEL, "input": "Say hi.", "max_output_tokens": 12, "store": False}
    sent = answer(http.post("/v1/responses", json={**body, **RESPONSE_VARIANTS[variant]}))
    assert_valid(sent, RESPONSE)
    assert_described(sent, "Response")
    if variant == "function-call":
        assert sent["output"][-1]["type"] == "function_call"


@pytest.mark.parametrize("variant", ["plain", "function-call"])
def test_response_events(http: httpx.Client, variant: str) -> None:
    body = {"model": MODEL, "input": "Say hi.", "max_output_tokens": 8, "stream": True}
    events = response_events(
        http.post("/v1/responses", json={**body, **RESPONSE_VARIANTS[variant]})
    )
    for event in events:
        assert_valid(event, RESPONSE_EVENT)
        assert_described(event, EVENT_DATA)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    kinds = {event["type"] for event in events}
    wanted = (
        "response.function_call_arguments.done"
        if variant != "plain"
        else "response.output_text.delta"
    )
    assert wanted in kinds, kinds


def test_a_stored_response_retrieved_and_deleted(http: httpx.Client) -> None:
    body = {"model": MODEL, "input": "Say hi.", "max_output_tokens": 4}
    created = answer(http.post("/v1/responses", json=body))
    retrieved = answer(http.get(f"/v1/responses/{created['id']}"))
    assert retrieved == created
    assert_valid(retrieved, RESPONSE)
    assert_described(retrieved, "Response")
    deleted = answer(http.delete(f"/v1/responses/{created['id']}"))
    assert deleted == {"id": created["id"], "object": "response", "deleted": True}
    # OpenAI's description gives the deleted object no schema (200 "OK"); nomoat's does.
    assert_described(deleted, "ResponseDeleted")
    gone = http.get(f"/v1/responses/{created['id']}")
    assert gone.status_code == 404
    assert_described(gone.json(), "Error")


@pytest.mark.parametrize("encoding", ["float", "base64"])
def test_embeddings_answers(http: httpx.Client, encoding: str) -> None:
    body = {"model": MODEL, "input": ["Say hi.", "Bonjour"], "encoding_format": encoding}
    sent = answer(http.post("/v1/embeddings", json=body))
    assert_described(sent, "EmbeddingList")
    vectors = [item["embedding"] for item in sent["data"]]
    if encoding == "base64":
        assert all(isinstance(vector, str) for vector in vectors)
        # OpenAI's description types the vector as numbers only, though its API
        # (and its SDK's default) sends base64 text: checked as decoded.
        for item in sent["data"]:
            packed = base64.b64decode(item["embedding"])
            item["embedding"] = np.frombuffer(packed, dtype="<f4").tolist()
    assert_valid(sent, EMBEDDINGS)
    sizes = {len(item["embedding"]) for item in sent["data"]}
    assert len(sizes) == 1 and sizes.pop() > 0
