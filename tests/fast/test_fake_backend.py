"""The fake backend itself: the contract, OpenAI's shapes, its scripts."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest
from pydantic import ValidationError

from gateway import wire
from gateway.contract import (
    Adapter,
    AdapterUse,
    Backend,
    EngineOverloadedError,
    ModelCapabilities,
    ReportsAdapterSlots,
    ReportsLoad,
    SupportsLoRA,
    Target,
    UpstreamError,
)
from gateway.testing import (
    FakeBackend,
    FakeBackendConfig,
    Script,
    chat_request,
    completion_request,
    context,
    fake_manifest,
)

pytestmark = pytest.mark.anyio

TARGET = Target("m", "fake-model", "m/0")
CTX = context("chatcmpl-fake")


def fake(**options: object) -> FakeBackend:
    return FakeBackend("a", FakeBackendConfig.model_validate(options))


async def collect(chunks: AsyncIterator[msgspec.Struct]) -> list[msgspec.Struct]:
    return [chunk async for chunk in chunks]


# ------------------------------------------------------------------ contract


def test_it_is_a_backend_with_every_optional_capability() -> None:
    backend = fake()
    for protocol in (Backend, ReportsLoad, SupportsLoRA, ReportsAdapterSlots):
        assert isinstance(backend, protocol), protocol.__name__


@pytest.mark.parametrize(
    "method",
    [
        "capabilities",
        "chat",
        "chat_stream",
        "completion",
        "completion_stream",
        "models",
        "health",
        "aclose",
    ],
)
def test_methods_take_exactly_the_protocols_parameters(method: str) -> None:
    expected = inspect.signature(getattr(Backend, method)).parameters
    actual = inspect.signature(getattr(FakeBackend, method)).parameters
    assert list(actual) == list(expected)
    coroutine = inspect.iscoroutinefunction
    assert coroutine(getattr(FakeBackend, method)) == coroutine(getattr(Backend, method))


def test_the_manifest_offers_type_fake_with_a_strict_config() -> None:
    backend_type = fake_manifest.backends["fake"]
    assert backend_type.config_model is FakeBackendConfig
    with pytest.raises(ValidationError, match="colour"):
        FakeBackendConfig.model_validate({"colour": "red"})


async def test_capabilities_come_from_the_config() -> None:
    capabilities = fake(tools=True, logprobs=True, context_length=512).capabilities("x")
    assert capabilities.tools and capabilities.logprobs and not capabilities.json_schema
    assert capabilities.context_length == 512
    assert isinstance(capabilities, ModelCapabilities)
    assert await fake(models=["x", "y"]).models() == ["x", "y"]


# -------------------------------------------------------------------- shapes


async def test_a_chat_answer_is_openais_shape() -> None:
    answer = await fake(reply="Hi there").chat(chat_request(), TARGET, CTX)
    body = msgspec.json.decode(wire.encoder.encode(answer))
    assert body == {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "created": CTX.created,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi there", "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
    }


async def test_a_chat_stream_has_role_content_finish_then_usage_without_choices() -> None:
    chunks = await collect(fake(reply="abcdef", chunks=3).chat_stream(chat_request(), TARGET, CTX))
    assert all(isinstance(c, wire.ChatCompletionChunk) for c in chunks)
    typed = [c for c in chunks if isinstance(c, wire.ChatCompletionChunk)]
    assert {c.id for c in typed} == {"chatcmpl-fake"}
    assert typed[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in typed[1:4]] == ["ab", "cd", "ef"]
    assert typed[4].choices[0].finish_reason == "stop"
    assert typed[-1].choices == [] and typed[-1].usage == wire.Usage(
        prompt_tokens=5, completion_tokens=3, total_tokens=8
    )
    assert all(isinstance(c.usage, msgspec.UnsetType) for c in typed[:-1])


async def test_a_completion_stream_has_text_chunks_then_usage() -> None:
    backend = fake(reply="abcd", chunks=2)
    chunks = await collect(backend.completion_stream(completion_request(), TARGET, CTX))
    typed = [c for c in chunks if isinstance(c, wire.Completion)]
    assert [c.choices[0].text for c in typed[:3]] == ["ab", "cd", ""]
    assert typed[2].choices[0].finish_reason == "stop"
    assert typed[-1].choices == [] and isinstance(typed[-1].usage, wire.Usage)
    answer = await backend.completion(completion_request(), TARGET, CTX)
    assert answer.object == "text_completion" and answer.choices[0].text == "abcd"


async def test_max_tokens_cuts_the_answer_with_finish_reason_length() -> None:
    answer = await fake(reply="abcdef", chunks=3).chat(chat_request(max_tokens=2), TARGET, CTX)
    assert answer.choices[0].message.content == "abcd"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 2


async def test_n_gives_n_choices() -> None:
    answer = await fake().chat(chat_request(n=3), TARGET, CTX)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert answer.usage.completion_tokens == 9


# ------------------------------------------------------------------- scripts


async def test_scripts_are_taken_in_order_then_the_default() -> None:
    backend = fake()
    backend.script(Script(text="one"), Script(text="two"))
    texts = [(await backend.chat(chat_request(), TARGET, CTX)).choices[0].message.content]
    texts.append((await backend.chat(chat_request(), TARGET, CTX)).choices[0].message.content)
    texts.append((await backend.chat(chat_request(), TARGET, CTX)).choices[0].message.content)
    assert texts == ["one", "two", backend.config.reply]
    assert [call.outcome for call in backend.calls] == ["answered"] * 3
    assert backend.calls[0].request.messages[0].content == "Hello"  # type: ignore[union-attr]
    assert backend.calls[0].target is TARGET


@pytest.mark.parametrize(
    "error", [UpstreamError("down"), EngineOverloadedError("full"), RuntimeError("bug")]
)
async def test_an_error_before_the_first_byte(error: BaseException) -> None:
    backend = fake()
    backend.script(Script(error=error), Script(error=error))
    with pytest.raises(type(error)):
        await backend.chat(chat_request(), TARGET, CTX)
    stream = backend.chat_stream(chat_request(), TARGET, CTX)
    with pytest.raises(type(error)):
        await anext(stream)
    assert [(c.outcome, c.chunks_sent) for c in backend.calls] == [("failed", 0)] * 2


async def test_an_error_after_k_chunks() -> None:
    backend = fake()
    backend.script(Script(error=UpstreamError("cut"), error_after=2))
    received = []
    with pytest.raises(UpstreamError, match="cut"):
        async for chunk in backend.chat_stream(chat_request(), TARGET, CTX):
            received.append(chunk)
    assert len(received) == 2
    assert (backend.calls[0].outcome, backend.calls[0].chunks_sent) == ("failed", 2)


async def test_a_stall_waits_for_release() -> None:
    backend = fake()
    backend.script(Script(stall_after=1))
    stream = backend.chat_stream(chat_request(), TARGET, CTX)
    await anext(stream)
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)
    assert not pending.done() and backend.calls[0].outcome == "running"
    backend.calls[0].release()
    await pending
    rest = await collect(stream)
    assert rest and backend.calls[0].outcome == "streamed"


async def test_cancelling_a_stalled_answer_is_recorded() -> None:
    backend = fake()
    backend.script(Script(stall_after=0))
    task = asyncio.ensure_future(backend.chat(chat_request(), TARGET, CTX))
    [call] = await backend.wait_for_calls(1)
    task.cancel()
    assert await call.wait_ended() == "cancelled"
    assert call.stopped_early and call.ended_at is not None


async def test_closing_a_stream_early_is_recorded() -> None:
    backend = fake()
    stream = backend.chat_stream(chat_request(), TARGET, CTX)
    await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    assert backend.calls[0].outcome == "closed"
    assert backend.calls[0].chunks_sent == 1


async def test_delays_between_chunks() -> None:
    backend = fake(chunks=3)
    backend.script(Script(chunk_delay=0.02))
    loop = asyncio.get_running_loop()
    started = loop.time()
    await collect(backend.chat_stream(chat_request(), TARGET, CTX))
    assert loop.time() - started >= 0.06


# ---------------------------------------------------------- load and adapters


async def test_load_reports_live_calls_and_the_configured_queue() -> None:
    backend = fake(waiting=3)
    backend.script(Script(stall_after=0))
    task = asyncio.ensure_future(backend.chat(chat_request(), TARGET, CTX))
    await backend.wait_for_calls(1)
    assert (backend.load().running, backend.load().waiting) == (1, 3)
    backend.calls[0].release()
    await task
    assert backend.load().running == 0


def _use(name: str) -> AdapterUse:
    return AdapterUse(Adapter(name, "m", "0" * 64, "gguf", Path(f"/{name}"), name))


async def test_adapters_are_loaded_on_use_and_the_least_recent_evicted() -> None:
    backend = fake(lora=True, adapter_slots=2)
    assert backend.serves_adapters() and not backend.can_stack()
    for name in ("x", "y", "x", "z"):
        target = Target("m", "fake-model", "m/0", adapters=(_use(name),))
        await backend.chat(chat_request(), target, CTX)
    assert backend.adapters_loaded() == {"x", "z"}
    counters = backend.adapter_counters()
    assert (counters["x"].loads, counters["y"].evictions) == (1, 1)
    await backend.unload_adapter("x")
    assert backend.adapters_loaded() == {"z"} and backend.adapter_slots() == 2
    assert not fake().serves_adapters()
