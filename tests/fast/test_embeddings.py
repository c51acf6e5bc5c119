"""Embeddings without an engine: the input forms, the encodings, Matryoshka
truncation, input-only admission, and which models route where."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from gateway import wire
from gateway.accounting.admission import request_bounds
from gateway.auth import hash_api_key
from gateway.catalog import Catalog, ModelEntry
from gateway.contract import (
    Candidate,
    EmbeddingList,
    EmbeddingRequest,
    RequestContext,
    Target,
)
from gateway.embeddings.inputs import Inputs, decode_embeddings, from_view, inputs_of, routing_view
from gateway.embeddings.vectors import embedding_list, encoded, shaped
from gateway.engine.embedding import EmbeddingEngine, EngineFullError, KeyFullError
from gateway.errors import InvalidRequestError, UpstreamError
from gateway.policies import OrderedPolicy
from gateway.registry import Registry
from gateway.routing import Router
from gateway.settings import LimitSettings
from gateway.telemetry import semconv as names
from gateway.testing import Script
from gateway.testing.inprocess import in_process_gateway

from .conftest import Start
from .plugins import ErrorRecorder
from .support import MODEL, chat_body, config, error_of, pool
from .test_traces import Traced

LIMITS = LimitSettings()


def request(body: bytes) -> wire.EmbeddingRequest:
    return decode_embeddings(body, LIMITS)


def refusal(body: bytes) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as refused:
        request(body)
    return refused.value


def test_every_input_form_and_what_is_refused() -> None:
    forms = {
        b'"one"': Inputs(texts=("one",)),
        b'["one", "two"]': Inputs(texts=("one", "two")),
        b"[1, 2, 3]": Inputs(tokens=((1, 2, 3),)),
        b"[[1, 2], [3]]": Inputs(tokens=((1, 2), (3,))),
    }
    for given, expected in forms.items():
        decoded = request(b'{"model": "m", "input": ' + given + b"}")
        assert inputs_of(decoded) == expected
    for bad in (b"[]", b'["a", 1]', b"[[1], 2]", b"[[1], []]", b'[["a"]]'):
        assert refusal(b'{"model": "m", "input": ' + bad + b"}").param is not None
    assert refusal(b'{"model": "m", "input": ["a", 1]}').param == "input"
    # Embeddings never stream: `stream` is an unknown argument, as at OpenAI.
    assert refusal(b'{"model": "m", "input": "a", "stream": true}').param == "stream"
    assert refusal(b'{"model": "m", "input": "a", "encoding_format": "hex"}').param == (
        "encoding_format"
    )
    assert refusal(b'{"model": "m", "input": "a", "dimensions": 0}').param == "dimensions"
    many = b'{"model": "m", "input": [' + b",".join([b'"x"'] * 2049) + b"]}"
    assert refusal(many).param == "input"


def test_base64_is_little_endian_float32_as_the_sdk_decodes_it() -> None:
    vector = np.array([1.0, -2.5, 0.125], dtype=np.float32)
    packed = encoded(vector, "base64")
    assert isinstance(packed, str)
    assert base64.b64decode(packed)[:4] == b"\x00\x00\x80\x3f"  # 1.0f, little-endian
    # What openai-python does with it (resources/embeddings.py).
    assert np.frombuffer(base64.b64decode(packed), dtype="float32").tolist() == [1.0, -2.5, 0.125]
    assert encoded(vector, "float") == encoded(vector, None) == [1.0, -2.5, 0.125]


def test_dimensions_truncate_and_renormalise_only_where_declared() -> None:
    full = [np.array([3.0, 4.0, 12.0], dtype=np.float32) / 13.0, np.ones(3, np.float32)]
    engine = embedding_list(full[::-1], EmbeddingRequest(model="m", input=""), "m", 7)
    # An engine may list its vectors in any order: index decides.
    engine.data = [engine.data[1], engine.data[0]]
    asked = EmbeddingRequest(model="m", input="", dimensions=2, encoding_format="float")
    answer = shaped(engine, asked, matryoshka=True)
    assert [item.index for item in answer.data] == [0, 1]
    assert np.allclose(answer.data[1].embedding, [0.6, 0.8])
    assert answer.usage == wire.EmbeddingUsage(prompt_tokens=7, total_tokens=7)
    for matryoshka, dimensions in ((False, 2), (True, 4)):
        too = EmbeddingRequest(model="m", input="", dimensions=dimensions)
        with pytest.raises(InvalidRequestError) as refused:
            shaped(engine, too, matryoshka=matryoshka)
        assert refused.value.param == "dimensions"
    # A number of 4,000 digits is not echoed back (found by the fuzz suite).
    huge = EmbeddingRequest(model="m", input="", dimensions=10**4000)
    with pytest.raises(InvalidRequestError) as refused:
        shaped(engine, huge, matryoshka=True)
    assert len(refused.value.message) < 300


def test_admission_reserves_the_input_only() -> None:
    embeddings = request(b'{"model": "m", "input": ["a", "b", "c"], "user": "u"}')
    view = routing_view(embeddings)
    assert (view.model, view.prompt, view.user) == ("m", ["a", "b", "c"], "u")
    assert request_bounds(view, 120, ceiling=4096).completion_tokens == 0
    assert request_bounds(view, 120, ceiling=4096).prompt_tokens == 120
    chat = wire.ChatCompletionRequest(model="m", messages=[wire.UserMessage(content="hi")])
    assert request_bounds(chat, 120, ceiling=4096).completion_tokens == 4096
    # What a request hook changes in the view, the request takes.
    assert from_view(embeddings, view) is embeddings
    moved = from_view(embeddings, wire.CompletionRequest(model="other", prompt=["[redacted]"]))
    assert (moved.model, moved.input, moved.user) == ("other", ["[redacted]"], "u")


class _Embeds:
    """Just enough of a backend for the router: which engine models embed."""

    def __init__(self, name: str, embeds: bool) -> None:
        self.name = name
        self._embeds = embeds

    def embeds(self, engine_model: str) -> bool:
        return self._embeds

    async def embed(
        self, request: EmbeddingRequest, target: Target, ctx: RequestContext
    ) -> EmbeddingList:
        raise AssertionError("not called")


def _model(name: str, backends: list[str], capabilities: set[str], *fallbacks: str) -> ModelEntry:
    candidates = tuple(
        Candidate(Target(name, name, f"{name}/{i}"), backend) for i, backend in enumerate(backends)
    )
    return ModelEntry(
        name,
        candidates,
        OrderedPolicy(),
        "nomoat",
        fallbacks=fallbacks,
        capabilities=frozenset(capabilities),
    )


def test_models_route_only_what_they_serve_to_backends_that_can() -> None:
    backends: Mapping[str, object] = {
        "chat": _Embeds("chat", False),
        "vectors": _Embeds("vectors", True),
        "other": _Embeds("other", True),
    }
    catalog = Catalog(
        {
            "talker": _model("talker", ["chat"], {"chat"}, "vectors"),
            "vectors": _model("vectors", ["chat", "vectors"], {"embeddings"}),
            "both": _model("both", ["chat", "other"], {"chat", "embeddings"}, "talker"),
            "nowhere": _model("nowhere", ["chat"], {"embeddings"}),
        }
    )
    router = Router(catalog, backends)  # type: ignore[arg-type]
    ctx = RequestContext("embd-1", 0)

    def eligible(model: str, *, embeddings: bool) -> list[list[str]]:
        view = routing_view(EmbeddingRequest(model=model, input="x"))
        route = router.resolve(view, embeddings=embeddings)
        pools = [router.eligible(route, entry, view, ctx) for entry in route.chain]
        return [[c.backend for c in pool] for pool in pools]

    # Only the deployments whose backend embeds; a chat-only fallback is skipped.
    assert eligible("vectors", embeddings=True) == [["vectors"]]
    assert eligible("both", embeddings=True) == [["other"], []]
    assert eligible("both", embeddings=False) == [["chat", "other"], ["chat"]]
    refusals = {
        ("talker", True): "is a chat model",
        ("vectors", False): "is an embedding model",
        ("nowhere", True): "no deployment of nowhere can make embeddings",
    }
    for (model, embeddings), says in refusals.items():
        with pytest.raises(InvalidRequestError) as refused:
            eligible(model, embeddings=embeddings)
        assert says in refused.value.message and f"`{model}`" in refused.value.message
        assert refused.value.param == "model"


EMBEDDING = {"capabilities": ["embeddings"], "retry_backoff_seconds": 0.01}
FAKES = {name: {"embedding_models": [MODEL]} for name in ("a", "b")}


@pytest.mark.anyio
async def test_an_attempt_that_fails_moves_on_and_every_attempt_is_traced(
    registry: Registry,
) -> None:
    """Pipeline.embed takes chat's path: the next deployment after an upstream
    failure, an attempt span each (the GenAI operation "embeddings"), the
    client's encoding and dimensions applied after the engine answered."""
    traced = Traced()
    text = pool("a", "b", fakes=FAKES, matryoshka=True, **EMBEDDING)
    async with in_process_gateway(text, registry=registry, tracing=traced.tracing) as gw:
        gw.backend("a").script(Script(error=UpstreamError("a is down")))
        body = {"model": MODEL, "input": ["x", "y"], "dimensions": 4, "encoding_format": "base64"}
        response = await gw.http.post("/v1/embeddings", json=body)
        assert response.status_code == 200, response.text
        chat = await gw.http.post("/v1/chat/completions", json=chat_body())
        assert error_of(chat, 400)["param"] == "model"
        [call] = gw.backend("b").calls
    answer = response.json()
    assert answer["model"] == MODEL and answer["usage"] == {"prompt_tokens": 10, "total_tokens": 10}
    found = [np.frombuffer(base64.b64decode(item["embedding"]), "<f4") for item in answer["data"]]
    assert [v.shape for v in found] == [(4,), (4,)]
    assert np.allclose([np.linalg.norm(v) for v in found], 1.0, atol=1e-6)
    assert call.kind == "embed" and call.request.prompt == ["x", "y"]
    spans = await traced.wait_for(4)
    attempts = [s for s in spans if s.name == f"embeddings {MODEL}"]
    assert len(attempts) == 2
    failed, answered = sorted(attempts, key=lambda s: s.start_time or 0)
    assert failed.attributes is not None and answered.attributes is not None
    assert failed.attributes[names.ERROR_TYPE]
    assert answered.attributes[names.OPERATION_NAME] == "embeddings"
    assert answered.attributes[names.USAGE_INPUT_TOKENS] == 10


class _SlowModel:
    """An embedding model whose first input waits for the test's go."""

    n_vocab = 100

    def __init__(self) -> None:
        self.go = threading.Event()
        self.started = threading.Event()
        self.embedded = 0

    def tokenize(self, text: str) -> list[int]:
        return [1] * len(text)

    def embed(self, tokens: list[int]) -> np.ndarray:
        self.started.set()
        self.go.wait(5)
        self.embedded += 1
        return np.ones(2, np.float32) / np.sqrt(2)

    def close(self) -> None:
        pass


@pytest.mark.anyio
async def test_the_embedding_queue_is_bounded_and_a_cancelled_request_stops() -> None:
    model = _SlowModel()
    engine = EmbeddingEngine(model, max_waiting=1)  # type: ignore[arg-type]
    try:
        running = asyncio.create_task(engine.embed(["a"] * 50))
        await asyncio.to_thread(model.started.wait, 5)
        waiting = asyncio.create_task(engine.embed(["b"]))
        await asyncio.sleep(0)
        with pytest.raises(EngineFullError):
            await engine.embed(["c"])
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
        model.go.set()
        done = await waiting
        # The cancelled request stopped after the input it was on.
        assert model.embedded == 2 and done.prompt_tokens == 1
        assert engine.pending == 0
    finally:
        model.go.set()
        engine.close()


@pytest.mark.anyio
async def test_keys_take_turns_in_the_embedding_queue_and_each_holds_its_share() -> None:
    """A key flooding the queue: another key's request runs next, not after
    the flood; past max_per_key the flooding key is refused (429 upstream),
    the other is not."""
    model = _SlowModel()
    engine = EmbeddingEngine(model, max_waiting=8, max_per_key=4)  # type: ignore[arg-type]
    finished: list[str] = []

    async def request(name: str, owner: str) -> None:
        await engine.embed([name], owner)
        finished.append(name)

    try:
        flood = [asyncio.create_task(request(f"a{i}", "key-a")) for i in range(4)]
        await asyncio.to_thread(model.started.wait, 5)
        with pytest.raises(KeyFullError):
            await engine.embed(["a5"], "key-a")
        other = asyncio.create_task(request("b", "key-b"))
        await asyncio.sleep(0)
        model.go.set()
        await asyncio.gather(*flood, other)
        # key-a's next turn was queued before key-b came: b waits for one
        # more of key-a's requests, not for all three.
        assert finished == ["a0", "a1", "b", "a2", "a3"]
        assert engine.pending == 0
    finally:
        model.go.set()
        engine.close()


@pytest.mark.anyio
async def test_embeddings_reserve_and_spend_input_tokens_only(
    registry: Registry, tmp_path: Path
) -> None:
    """Against a key's 2000 tokens a minute: an embedding request fits (its
    bound is its body), where chat with no max_tokens (the 16384 ceiling)
    does not; it is settled to its input tokens, and costed at the input price."""
    key, ledger = "sk-embeddings-test-0123456789ab", tmp_path / "ledger.db"
    prices = {"input_usd_per_million": 1000.0, "output_usd_per_million": 5000.0}
    text = (
        pool(
            "a",
            fakes=FAKES,
            server={"api_key_hashes": [hash_api_key(key)]},
            deployments=[{"backend": "a", **prices}],
            capabilities=["chat", "embeddings"],
        )
        + f'\n[accounting]\ndatabase = "sqlite:///{ledger}"\ncost_header = true\n'
        + f'static_keys = [{{ key_hash = "{hash_api_key(key)}", name = "ci", tpm = 2000 }}]\n'
    )
    async with in_process_gateway(text, registry=registry) as gw:
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": MODEL, "input": ["one", "two", "three"]}
        answer = await gw.http.post("/v1/embeddings", json=body, headers=headers)
        assert answer.status_code == 200, answer.text
        assert answer.json()["usage"]["prompt_tokens"] == 15  # the fake: 5 an input
        refused = await gw.http.post("/v1/chat/completions", json=chat_body(), headers=headers)
        assert error_of(refused, 429)["code"] == "rate_limit_exceeded"
        again = await gw.http.post("/v1/embeddings", json=body, headers=headers)
        size = len(answer.request.content)
        # Admitted: its body's bytes reserved. Then settled: of the first,
        # only its 15 input tokens stay taken (the header rounds down).
        assert int(answer.headers["x-ratelimit-remaining-tokens"]) <= 2000 - size
        assert int(again.headers["x-ratelimit-remaining-tokens"]) >= 2000 - 15 - size - 1
        # 15 input tokens at 1000 USD a million: 0.015 USD.
        assert float(answer.headers["x-nomoat-cost-usd"]) == pytest.approx(0.015)


@pytest.mark.anyio
async def test_request_hooks_see_the_view_and_error_hooks_hear_failures(start: Start) -> None:
    """A request hook that renames the model (here to an embedding model)
    moves the embeddings request; errors reach the error hooks, with no request;
    with the SDK, its default base64 decoded into floats."""
    text = config(
        {"a": {"embedding_models": ["n"]}},
        {
            MODEL: {"deployments": [{"backend": "a"}]},
            "n": {"deployments": [{"backend": "a"}], "capabilities": ["embeddings"]},
        },
        hooks=[{"type": "rename", "options": {"model": "n"}}, {"type": "errors"}],
    )
    async with start(text) as gw:
        answer = await gw.sdk.embeddings.create(model=MODEL, input=["x", "y"])
        assert answer.model == "n" and len(answer.data[1].embedding) == 8
        [call] = gw.backend("a").calls
        assert call.target.deployment == "n/0" and call.request.prompt == ["x", "y"]
        refused = await gw.http.post("/v1/embeddings", json={"model": MODEL, "input": []})
        assert error_of(refused, 400)["param"] == "input"
        [(request, error)] = next(
            b.hook for b in gw.runtime.plan.hooks if isinstance(b.hook, ErrorRecorder)
        ).errors
        assert request is None and error.status_code == 400
