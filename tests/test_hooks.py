"""Hook chain semantics: order, early answers, and failure behaviour."""

from __future__ import annotations

from collections.abc import AsyncIterator

import msgspec
import pytest

from gateway import wire
from gateway.contract import (
    AnyChunk,
    AnyRequest,
    AnyResponse,
    PermissionDeniedError,
    RequestContext,
)
from gateway.hooks import BoundHook, HookChain, HookFailedError

CTX = RequestContext("chatcmpl-test", 0, "key1")


def chat(content: str = "hello", model: str = "m") -> wire.ChatCompletionRequest:
    return wire.ChatCompletionRequest(model=model, messages=[wire.UserMessage(content=content)])


def answer(text: str) -> wire.ChatCompletion:
    message = wire.ResponseMessage(role="assistant", content=text, refusal=None)
    choice = wire.ChatChoice(index=0, message=message, logprobs=None, finish_reason="stop")
    usage = wire.Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2)
    return wire.ChatCompletion(
        id="x", object="chat.completion", created=0, model="m", choices=[choice], usage=usage
    )


class Rename:
    def __init__(self, model: str) -> None:
        self.model = model
        self.seen: list[str] = []

    async def on_request(self, request: AnyRequest, ctx: RequestContext) -> AnyRequest:
        self.seen.append(request.model)
        return msgspec.structs.replace(request, model=self.model)


class Answer:
    async def on_request(self, request: AnyRequest, ctx: RequestContext) -> AnyResponse:
        return answer("cached")


class Broken:
    async def on_request(self, request: AnyRequest, ctx: RequestContext) -> AnyRequest:
        raise RuntimeError("secret internal detail")


class Refuse:
    async def on_request(self, request: AnyRequest, ctx: RequestContext) -> AnyRequest:
        raise PermissionDeniedError("not for you")


class Upper:
    def on_stream(
        self, request: AnyRequest, chunks: AsyncIterator[AnyChunk], ctx: RequestContext
    ) -> AsyncIterator[AnyChunk]:
        return self._run(chunks)

    async def _run(self, chunks: AsyncIterator[AnyChunk]) -> AsyncIterator[AnyChunk]:
        async for chunk in chunks:
            raise ValueError(f"boom {chunk}")
            yield chunk


def bound(hook: object, label: str = "h", fail_open: bool = False) -> BoundHook:
    return BoundHook(label, fail_open, hook)


@pytest.mark.anyio
async def test_request_hooks_run_in_config_order() -> None:
    first, second = Rename("a"), Rename("b")
    result = await HookChain([bound(first), bound(second)]).on_request(chat(model="m"), CTX)
    assert first.seen == ["m"] and second.seen == ["a"]
    assert isinstance(result, wire.ChatCompletionRequest) and result.model == "b"


@pytest.mark.anyio
async def test_an_early_answer_skips_later_hooks() -> None:
    later = Rename("never")
    result = await HookChain([bound(Answer()), bound(later)]).on_request(chat(), CTX)
    assert isinstance(result, wire.ChatCompletion)
    assert later.seen == []


@pytest.mark.anyio
async def test_a_gateway_error_passes_through_unchanged() -> None:
    chain = HookChain([bound(Refuse(), "policy-check")])
    with pytest.raises(PermissionDeniedError, match="not for you"):
        await chain.on_request(chat(), CTX)
    assert chain.failures["policy-check"] == 0


@pytest.mark.anyio
async def test_a_failing_hook_rejects_naming_it_without_internals() -> None:
    chain = HookChain([bound(Broken(), "redact")])
    with pytest.raises(HookFailedError) as caught:
        await chain.on_request(chat(), CTX)
    body = caught.value.body().error
    assert "redact" in body.message and "secret" not in body.message
    assert body.code == "hook_failed" and caught.value.status_code == 500
    assert chain.failures["redact"] == 1


@pytest.mark.anyio
async def test_a_fail_open_hook_is_skipped_and_counted() -> None:
    after = Rename("next")
    chain = HookChain([bound(Broken(), "flaky", fail_open=True), bound(after)])
    result = await chain.on_request(chat(model="m"), CTX)
    assert isinstance(result, wire.ChatCompletionRequest) and result.model == "next"
    assert after.seen == ["m"]
    assert chain.failures["flaky"] == 1


@pytest.mark.anyio
async def test_a_failing_stream_hook_ends_the_stream_with_an_error() -> None:
    async def chunks() -> AsyncIterator[AnyChunk]:
        yield wire.ChatCompletionChunk(
            id="x", object="chat.completion.chunk", created=0, model="m", choices=[]
        )

    chain = HookChain([bound(Upper(), "upper", fail_open=True)])
    with pytest.raises(HookFailedError, match="upper"):
        async for _ in chain.on_stream(chat(), chunks(), CTX):
            pass
    assert chain.failures["upper"] == 1


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
