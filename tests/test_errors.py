"""Errors: every failure is ``{"error": {"message", "type", "param", "code"}}``
with the right status, and the official SDK raises the matching class."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import MODEL, Server

# Starts an engine or a server: not part of the fast layer.
pytestmark = pytest.mark.e2e

HI: Any = [{"role": "user", "content": "Say hi."}]
# ~20,000 tokens: far beyond SmolLM2's 8192-token context.
TOO_LONG: Any = [{"role": "user", "content": "x " * 20_000}]
OVER_LIMIT_BYTES = 5 * 1024 * 1024  # the default limit is 4 MiB
IMAGE: Any = [
    {
        "role": "user",
        "content": [
            {"type": "text", "text": "What is in this picture?"},
            # A data: URL: limits.media_urls allows it, the model has no vision.
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
        ],
    }
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def error_of(response: httpx.Response, status: int) -> dict[str, Any]:
    """The error object of an OpenAI-shaped error response, shape checked."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    return dict(error)


class _FixedBody(httpx.BaseTransport):
    """Sends every request with this exact body: how to make the SDK send
    bytes that are not JSON."""

    def __init__(self, body: bytes) -> None:
        self._body = body
        self._inner = httpx.HTTPTransport()

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        headers = [
            (k, v) for k, v in request.headers.multi_items() if k.lower() != "content-length"
        ]
        raw = httpx.Request(request.method, request.url, headers=headers, content=self._body)
        return self._inner.handle_request(raw)

    def close(self) -> None:
        self._inner.close()


def _without_authorization(request: httpx.Request) -> None:
    request.headers.pop("Authorization", None)


@pytest.fixture
def keyless_client(server: Server) -> Iterator[openai.OpenAI]:
    """An SDK client whose requests carry no Authorization header at all."""
    with httpx.Client(event_hooks={"request": [_without_authorization]}) as raw:
        yield openai.OpenAI(
            base_url=server.base_url, api_key="unused", max_retries=0, http_client=raw
        )


# ---------------------------------------------------------------- raw HTTP


CHAT_400: list[tuple[str, Any, str | None]] = [
    # (case, body, expected param)
    ("wrong type n", {"model": MODEL, "messages": HI, "n": "x"}, "n"),
    (
        "wrong type temperature",
        {"model": MODEL, "messages": HI, "temperature": "hot"},
        "temperature",
    ),
    ("wrong type messages", {"model": MODEL, "messages": "hi"}, "messages"),
    ("temperature > 2", {"model": MODEL, "messages": HI, "temperature": 3}, "temperature"),
    ("temperature < 0", {"model": MODEL, "messages": HI, "temperature": -0.5}, "temperature"),
    ("top_p > 1", {"model": MODEL, "messages": HI, "top_p": 2}, "top_p"),
    ("n = 0", {"model": MODEL, "messages": HI, "n": 0}, "n"),
    (
        "top_logprobs > 20",
        {"model": MODEL, "messages": HI, "logprobs": True, "top_logprobs": 50},
        "top_logprobs",
    ),
    (
        "presence_penalty > 2",
        {"model": MODEL, "messages": HI, "presence_penalty": 3},
        "presence_penalty",
    ),
    (
        "frequency_penalty < -2",
        {"model": MODEL, "messages": HI, "frequency_penalty": -3},
        "frequency_penalty",
    ),
    ("max_tokens = 0", {"model": MODEL, "messages": HI, "max_tokens": 0}, "max_tokens"),
    ("missing messages", {"model": MODEL}, "messages"),
    ("missing model", {"messages": HI}, "model"),
    ("n over the limit", {"model": MODEL, "messages": HI, "n": 9}, "n"),
    ("empty messages", {"model": MODEL, "messages": []}, "messages"),
    (
        "unknown role",
        {"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]},
        "messages[0].role",
    ),
    (
        "message without content",
        {"model": MODEL, "messages": [{"role": "user"}]},
        "messages[0].content",
    ),
    ("too many stops", {"model": MODEL, "messages": HI, "stop": list("abcde")}, "stop"),
    (
        "top_logprobs without logprobs",
        {"model": MODEL, "messages": HI, "top_logprobs": 2},
        "top_logprobs",
    ),
    (
        "stream_options without stream",
        {"model": MODEL, "messages": HI, "stream_options": {"include_usage": True}},
        "stream_options",
    ),
    (
        "unknown response_format",
        {"model": MODEL, "messages": HI, "response_format": {"type": "xml"}},
        "response_format.type",
    ),
    (
        "logit_bias not a token",
        {"model": MODEL, "messages": HI, "logit_bias": {"abc": 1}},
        "logit_bias",
    ),
    (
        "tool_choice names a missing tool",
        {
            "model": MODEL,
            "messages": HI,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "g"}},
        },
        "tool_choice",
    ),
    ("body is a JSON array", [1, 2], None),
]


@pytest.mark.parametrize(("body", "param"), [c[1:] for c in CHAT_400], ids=[c[0] for c in CHAT_400])
def test_chat_400(http: httpx.Client, body: dict[str, Any], param: str | None) -> None:
    error = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


@pytest.mark.parametrize("field", ["foo", "messages[0].bogus"], ids=["top level", "nested"])
def test_unknown_field(http: httpx.Client, field: str) -> None:
    body: dict[str, Any] = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    if field == "foo":
        body["foo"] = 1
    else:
        body["messages"][0]["bogus"] = 1
    error = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert "Unrecognized request argument" in error["message"]
    assert error["param"] == field


@pytest.mark.parametrize(
    "body", [b"{not json", b'{"model": "x",', b""], ids=["garbage", "cut", "empty"]
)
def test_malformed_json(http: httpx.Client, body: bytes) -> None:
    response = http.post(
        "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    error = error_of(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] is None


COMPLETION_400: list[tuple[str, dict[str, Any], str | None]] = [
    ("missing prompt", {"model": MODEL}, "prompt"),
    ("logprobs > 5", {"model": MODEL, "prompt": "x", "logprobs": 6}, "logprobs"),
    ("n over the limit", {"model": MODEL, "prompt": "x", "n": 9}, "n"),
    ("empty prompt list", {"model": MODEL, "prompt": []}, "prompt"),
    ("token id out of range", {"model": MODEL, "prompt": [10**7]}, "prompt"),
    ("suffix", {"model": MODEL, "prompt": "x", "suffix": "y"}, "suffix"),
    ("unknown field", {"model": MODEL, "prompt": "x", "messages": []}, "messages"),
]


@pytest.mark.parametrize(
    ("body", "param"), [c[1:] for c in COMPLETION_400], ids=[c[0] for c in COMPLETION_400]
)
def test_completion_400(http: httpx.Client, body: dict[str, Any], param: str | None) -> None:
    error = error_of(http.post("/v1/completions", json=body), 400)
    assert error["param"] == param


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_unknown_model_404(http: httpx.Client, path: str) -> None:
    body = {"model": "no-such-model", "messages": HI, "prompt": "x"}
    body.pop("prompt" if "chat" in path else "messages")
    error = error_of(http.post(path, json=body), 404)
    assert error["code"] == "model_not_found"
    assert error["param"] == "model"
    assert "no-such-model" in error["message"]


def test_context_length_exceeded(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": TOO_LONG, "max_tokens": 4}
    error = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "messages"
    assert "8192" in error["message"]


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
def test_completion_budget_beyond_context(http: httpx.Client, param: str) -> None:
    body = {"model": MODEL, "messages": HI, param: 9000}
    error = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == param


def test_body_too_large(http: httpx.Client) -> None:
    big = [{"role": "user", "content": "x" * OVER_LIMIT_BYTES}]
    error = error_of(http.post("/v1/chat/completions", json={"model": MODEL, "messages": big}), 413)
    assert error["code"] == "request_too_large"


def test_image_part_refused(http: httpx.Client) -> None:
    body = {"model": MODEL, "messages": IMAGE}
    error = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert MODEL in error["message"]
    assert error["param"] == "messages[0].content"


def test_missing_api_key(server: Server) -> None:
    body = {"model": MODEL, "messages": HI}
    response = httpx.post(f"{server.base_url}/chat/completions", json=body, timeout=30)
    error = error_of(response, 401)
    assert error["type"] == "invalid_request_error"
    assert error["code"] is None  # as OpenAI: no key is not an invalid key


@pytest.mark.parametrize(
    "authorization",
    ["Bearer sk-wrong", f"Basic {'x' * 20}", "Bearer", "sk-nomoat-test-0123456789abcdef"],
)
def test_bad_authorization_header(server: Server, authorization: str) -> None:
    response = httpx.get(
        f"{server.base_url}/models", headers={"Authorization": authorization}, timeout=30
    )
    error_of(response, 401)


def test_wrong_api_key_code(server: Server) -> None:
    response = httpx.get(
        f"{server.base_url}/models", headers={"Authorization": "Bearer sk-wrong"}, timeout=30
    )
    assert error_of(response, 401)["code"] == "invalid_api_key"


def test_unknown_path(http: httpx.Client) -> None:
    error = error_of(http.get("/v1/nope"), 404)
    assert "/v1/nope" in error["message"]
    error_of(http.post("/v1/chat/completion", json={}), 404)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/chat/completions"), ("GET", "/v1/completions"), ("DELETE", "/v1/models")],
)
def test_method_not_allowed(http: httpx.Client, method: str, path: str) -> None:
    error = error_of(http.request(method, path), 405)
    assert error["code"] == "method_not_allowed"


# --------------------------------------------------------------------- SDK


def test_sdk_malformed_json(server: Server) -> None:
    with httpx.Client(transport=_FixedBody(b"{not json")) as raw:
        client = openai.OpenAI(
            base_url=server.base_url, api_key=server.api_key, max_retries=0, http_client=raw
        )
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model=MODEL, messages=HI)
    assert caught.value.status_code == 400
    assert caught.value.type == "invalid_request_error"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": "x"}, "n"),
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 3}, "temperature"),
        ({"top_p": 2}, "top_p"),
        ({"n": 0}, "n"),
        ({"n": 9}, "n"),
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ({"messages": []}, "messages"),
        ({"frobnicate": True}, "frobnicate"),
    ],
)
def test_sdk_bad_request(client: openai.OpenAI, extra: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HI, extra_body=extra)
    assert caught.value.status_code == 400
    assert caught.value.param == param
    if param == "frobnicate":
        assert "Unrecognized request argument" in caught.value.message


@pytest.mark.parametrize("missing", ["model", "messages"])
def test_sdk_missing_field(client: openai.OpenAI, missing: str) -> None:
    body = {"model": MODEL, "messages": HI}
    del body[missing]
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/chat/completions", body=body, cast_to=object)
    assert caught.value.param == missing


def test_sdk_unknown_model(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="no-such-model", messages=HI)
    assert caught.value.status_code == 404
    assert caught.value.code == "model_not_found"


def test_sdk_body_too_large(client: openai.OpenAI) -> None:
    big = [{"role": "user", "content": "x" * OVER_LIMIT_BYTES}]
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, messages=big)
    assert caught.value.status_code == 413
    assert not isinstance(caught.value, openai.BadRequestError)


def test_sdk_context_length_exceeded(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=TOO_LONG, max_tokens=4)
    assert caught.value.code == "context_length_exceeded"


def test_sdk_max_tokens_beyond_context(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=HI, max_tokens=9_000)
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.param == "max_tokens"


def test_sdk_image_part(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=IMAGE)
    assert MODEL in caught.value.message


def test_sdk_missing_api_key(keyless_client: openai.OpenAI) -> None:
    with pytest.raises(openai.AuthenticationError) as caught:
        keyless_client.chat.completions.create(model=MODEL, messages=HI)
    assert caught.value.status_code == 401


def test_sdk_wrong_api_key(server: Server) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.models.list()
    assert caught.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=HI, stream=True)


def test_sdk_unknown_path(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.get("/no/such/path", cast_to=object)


def test_sdk_method_not_allowed(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as caught:
        client.get("/chat/completions", cast_to=object)
    assert caught.value.status_code == 405


@pytest.mark.anyio
async def test_sdk_async_stream_error(async_client: openai.AsyncOpenAI) -> None:
    """A streamed request refused before its first byte raises at create()."""
    with pytest.raises(openai.BadRequestError) as caught:
        await async_client.chat.completions.create(
            model=MODEL, messages=TOO_LONG, max_tokens=4, stream=True
        )
    assert caught.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        await async_client.chat.completions.create(model="no-such-model", messages=HI, stream=True)
    with pytest.raises(openai.BadRequestError) as caught:
        await async_client.chat.completions.create(
            model=MODEL, messages=HI, stream=True, tools=[_TOOL], tool_choice="auto"
        )
    assert MODEL in caught.value.message


_TOOL: Any = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
}
