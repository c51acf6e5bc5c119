"""The `openai` backend type (a hosted OpenAI-compatible API) against real
OpenAI-compatible servers standing in for one, each requiring a key the
gateway reads from ``api_key_env``: llama.cpp's own ``llama-server`` (built
once from the llama-cpp-python sdist, cached) and another ``nomoat serve``
(the session's gateway). Through the official SDK: answers and streams, in
OpenAI's exact shape; a wrong upstream key is a 502 for the client, without
the upstream's text, and a log line for the operator."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import Server, config_with_key, free_port, running_server
from tests.llama_server import LlamaServer, running_llama_server
from tests.openai_schema import assert_answer

# The first run on a clean machine builds llama-server (a few minutes).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(3600)]

UPSTREAM_KEY = "sk-llama-server-upstream-0123456789"
WRONG_KEY = "sk-wrong-upstream-key-ABCDEFGHIJKLMNOP"
HI: Any = [{"role": "user", "content": "Say hi."}]
# Each model is served by the backend of the same name.
UPSTREAMS = ["via-llama-server", "via-nomoat"]
WRONG = ["llama-wrong-key", "nomoat-wrong-key"]
# What the upstreams say when they refuse a key (it must stay in the log).
REFUSALS = {"llama-wrong-key": "Invalid API Key"}


@pytest.fixture(scope="module")
def llama_server() -> Iterator[LlamaServer]:
    with running_llama_server(free_port(), UPSTREAM_KEY) as started:
        yield started


def _backend(name: str, base_url: str, key_env: str, model: str) -> str:
    """A hosted backend, and a model of the same name served by it."""
    return f"""
        [backends.{name}]
        type = "openai"
        base_url = "{base_url}"
        api_key_env = "{key_env}"
        models = ["{model}"]
        probe_interval = 1

        [models.{name}]
        deployments = [{{ backend = "{name}", model = "{model}" }}]
        """


@pytest.fixture(scope="module")
def gateway(
    llama_server: LlamaServer, server: Server, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    embedded = "smollm2-135m-instruct"
    extra = "".join(
        [
            _backend(
                "via-llama-server", llama_server.base_url, "HOSTED_LLAMA_KEY", llama_server.model
            ),
            _backend("via-nomoat", server.base_url, "HOSTED_NOMOAT_KEY", embedded),
            _backend(
                "llama-wrong-key", llama_server.base_url, "HOSTED_WRONG_KEY", llama_server.model
            ),
            _backend("nomoat-wrong-key", server.base_url, "HOSTED_WRONG_KEY", embedded),
        ]
    )
    with pytest.MonkeyPatch.context() as env:
        # The gateway process inherits these; its config names them only.
        env.setenv("HOSTED_LLAMA_KEY", llama_server.api_key)
        env.setenv("HOSTED_NOMOAT_KEY", server.api_key)
        env.setenv("HOSTED_WRONG_KEY", WRONG_KEY)
        with running_server(tmp_path_factory.mktemp("hosted"), config_with_key(extra)) as live:
            yield live


@pytest.fixture
def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=gateway.api_key, max_retries=0)


@pytest.fixture
def raw(gateway: Server) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {gateway.api_key}"}
    with httpx.Client(base_url=gateway.base_url, headers=headers, timeout=120) as http:
        yield http


def events(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    body = response.content
    assert body.endswith(b"data: [DONE]\n\n"), body[-500:]
    raw_events = body[: -len(b"data: [DONE]\n\n")].split(b"\n\n")[:-1]
    assert all(event.startswith(b"data: ") for event in raw_events)
    return [json.loads(event[len(b"data: ") :]) for event in raw_events]


@pytest.mark.parametrize("model", UPSTREAMS)
def test_chat_through_a_hosted_upstream(client: openai.OpenAI, model: str) -> None:
    raw_reply = client.chat.completions.with_raw_response.create(
        model=model, messages=HI, max_tokens=8, temperature=0
    )
    assert_answer(raw_reply.http_response.json(), stream=False, chat=True)
    reply = raw_reply.parse()
    assert reply.model == model and reply.id.startswith("chatcmpl-")
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage is not None and 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


@pytest.mark.parametrize("model", UPSTREAMS)
def test_a_stream_through_a_hosted_upstream(client: openai.OpenAI, model: str) -> None:
    stream = client.chat.completions.create(
        model=model,
        messages=HI,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    whole = client.chat.completions.create(model=model, messages=HI, max_tokens=8, temperature=0)
    assert text and text == whole.choices[0].message.content
    assert {c.model for c in chunks} == {model}
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


@pytest.mark.parametrize("model", UPSTREAMS)
@pytest.mark.parametrize("include_usage", [False, True])
def test_every_chunk_is_in_openais_shape(
    raw: httpx.Client, model: str, include_usage: bool
) -> None:
    body: dict[str, Any] = {"model": model, "messages": HI, "max_tokens": 6, "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    chunks = events(raw.post("/chat/completions", json=body))
    for chunk in chunks:
        assert_answer(chunk, stream=True, chat=True)
    assert any(chunk.get("usage") for chunk in chunks) == include_usage


@pytest.mark.parametrize("model", UPSTREAMS)
def test_text_completions_through_a_hosted_upstream(raw: httpx.Client, model: str) -> None:
    body: dict[str, Any] = {"model": model, "prompt": "The capital of France is"}
    body.update(max_tokens=5, temperature=0)
    whole = raw.post("/completions", json=body)
    assert whole.status_code == 200, whole.text
    assert_answer(whole.json(), stream=False, chat=False)
    chunks = events(raw.post("/completions", json={**body, "stream": True}))
    for chunk in chunks:
        assert_answer(chunk, stream=True, chat=False)
    assert (
        "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        == (whole.json()["choices"][0]["text"])
    )


@pytest.mark.parametrize("model", WRONG)
@pytest.mark.parametrize("stream", [False, True])
def test_a_wrong_upstream_key_is_a_502_without_the_upstreams_words(
    client: openai.OpenAI, gateway: Server, model: str, stream: bool
) -> None:
    with pytest.raises(openai.InternalServerError) as caught:
        reply = client.chat.completions.create(
            model=model, messages=HI, max_tokens=4, stream=stream
        )
        if stream:
            list(reply)  # type: ignore[arg-type]
    error = caught.value
    assert error.status_code == 502
    assert isinstance(error.body, dict)
    assert error.body == {
        "message": f"backend {model} could not authenticate with its upstream (status 401)",
        "type": "server_error",
        "param": None,
        "code": "upstream_error",
    }
    # The gateway never writes the key it sends.
    assert WRONG_KEY not in gateway.log()
    if model in REFUSALS:
        # The operator reads the upstream's own words in the gateway's log.
        assert REFUSALS[model] in gateway.log()
