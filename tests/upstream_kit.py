"""Builders for fast tests of the OpenAI-compatible backends: a backend on a
scripted transport, a pipeline in front of some, and the relay of an answer
to the client as the gateway encodes it (JSON, or server-sent events)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from gateway import testing, wire
from gateway.backends.openai_compat import EngineKind, OpenAICompatibleBackend
from gateway.backends.openai_compat import OpenAICompatibleConfig as Config
from gateway.catalog import Catalog, ModelEntry, Retry
from gateway.contract import Candidate, RequestContext, Target
from gateway.pipeline import Pipeline
from gateway.policies import OrderedPolicy
from gateway.settings import LimitSettings
from gateway.sse import sse_events
from tests.scripted_transport import Reply, ScriptedTransport, json_reply, sse_reply

DATA = Path(__file__).parent / "data" / "upstream"
MODEL = "hosted-model"
ENGINE_MODEL = "upstream-model"
BASE_URL = "http://upstream.test/v1"


def shapes() -> list[Path]:
    return sorted(DATA.glob("*.json"))


def shape(path: Path) -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def backend(
    transport: ScriptedTransport,
    name: str = "hosted",
    kind: EngineKind = "openai",
    **options: Any,
) -> OpenAICompatibleBackend:
    """Not started: no probe runs, it is never marked ready."""
    config = Config(base_url=BASE_URL, models=(ENGINE_MODEL,), **options)
    return OpenAICompatibleBackend(name, kind, config, transport=transport)


async def started(transport: ScriptedTransport, name: str = "hosted") -> OpenAICompatibleBackend:
    """Started: its first probe (GET /models) answered 200, so it is ready."""
    transport.add(json_reply({"object": "list", "data": [{"id": ENGINE_MODEL}]}))
    made = backend(transport, name)
    await made.start()
    return made


def target(deployment: str = f"{MODEL}/0") -> Target:
    return Target(MODEL, ENGINE_MODEL, deployment)


def context() -> RequestContext:
    return testing.context(request_id="chatcmpl-gateway", created=1700000000)


def chat_request(**fields: Any) -> wire.ChatCompletionRequest:
    return testing.chat_request("Hello", model=MODEL, **fields)


def completion_request(**fields: Any) -> wire.CompletionRequest:
    return testing.completion_request("Hello", model=MODEL, **fields)


def pipeline(backends: Sequence[OpenAICompatibleBackend], rounds: int = 0) -> Pipeline:
    """One model served by ``backends`` in order (the ordered policy)."""
    candidates = tuple(
        Candidate(Target(MODEL, ENGINE_MODEL, f"{MODEL}/{index}"), made.name)
        for index, made in enumerate(backends)
    )
    entry = ModelEntry(
        MODEL, candidates, OrderedPolicy(), "test", "ordered", retry=Retry(rounds=rounds)
    )
    return Pipeline(
        LimitSettings(), Catalog({MODEL: entry}), {made.name: made for made in backends}
    )


def encoded(answer: Any) -> dict[str, Any]:
    decoded: dict[str, Any] = json.loads(wire.encoder.encode(answer))
    return decoded


async def events(chunks: AsyncIterator[Any]) -> list[dict[str, Any]]:
    """A stream as the client reads it: the SSE body, parsed strictly."""
    body = b"".join([event async for event in sse_events(chunks)])
    assert body.endswith(b"data: [DONE]\n\n"), body[-300:]
    parsed = []
    for raw in body[: -len(b"data: [DONE]\n\n")].split(b"\n\n")[:-1]:
        assert raw.startswith(b"data: ")
        parsed.append(json.loads(raw[len(b"data: ") :]))
    return parsed


def reply_of(data: dict[str, Any]) -> Reply:
    """A test-data shape as its upstream sends it."""
    return sse_reply(data["chunks"]) if data["stream"] else json_reply(data["answer"])
