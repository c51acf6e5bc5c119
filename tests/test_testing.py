"""gateway.testing, the fixtures and helpers offered to plugin authors."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import pytest

from gateway.contract import (
    AnyChunk,
    AnyRequest,
    AnyResponse,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    GatewayError,
    InvalidRequestError,
    RequestContext,
)
from gateway.testing import (
    HookRunner,
    bind,
    candidates,
    chat_completion,
    chat_request,
    completion,
    completion_request,
    context,
    rank,
)

Hooks = Callable[..., HookRunner]


class Renamer:
    async def on_request(self, request: AnyRequest, ctx: RequestContext) -> AnyRequest:
        assert isinstance(request, ChatCompletionRequest)
        return chat_request(model="renamed", messages=[{"role": "user", "content": "x"}])


class Broken:
    async def on_request(self, request: AnyRequest, ctx: RequestContext) -> AnyRequest:
        raise RuntimeError("bug")


class Answer:
    async def on_request(self, request: AnyRequest, ctx: RequestContext) -> AnyResponse:
        return chat_completion("early", id=ctx.request_id)


class Upper:
    async def on_stream(
        self, request: AnyRequest, chunks: AsyncIterator[AnyChunk], ctx: RequestContext
    ) -> AsyncIterator[AnyChunk]:
        async for chunk in chunks:
            assert isinstance(chunk, Completion)
            chunk.choices[0].text = chunk.choices[0].text.upper()
            yield chunk


class Recorder:
    def __init__(self) -> None:
        self.seen: list[str] = []

    async def on_error(
        self, request: AnyRequest | None, error: GatewayError, ctx: RequestContext
    ) -> None:
        self.seen.append(error.message)


def test_builders_make_valid_wire_objects() -> None:
    request = chat_request("Hi", temperature=0, stream=True)
    assert request.messages[0].content == "Hi" and request.temperature == 0
    assert completion_request(["a", "b"]).prompt == ["a", "b"]
    assert context("r", api_key_id=None).api_key_id is None
    assert chat_completion("x").choices[0].message.content == "x"
    assert completion("y").choices[0].text == "y"
    with pytest.raises(Exception, match="unknown field"):
        chat_request(colour="red")


def test_hooks_run_in_order_and_may_answer_early(nomoat_hooks: Hooks) -> None:
    result = nomoat_hooks(Renamer(), Answer(), Broken()).on_request(chat_request())
    assert isinstance(result, ChatCompletion)
    assert result.choices[0].message.content == "early"  # Broken never ran


def test_failures_are_hook_failed_or_skipped(nomoat_hooks: Hooks) -> None:
    with pytest.raises(GatewayError) as failed:
        nomoat_hooks(bind(Broken(), "audit")).on_request(chat_request())
    assert (failed.value.status_code, failed.value.code) == (500, "hook_failed")
    assert "'audit'" in failed.value.message
    request = chat_request()
    assert nomoat_hooks(Broken(), fail_open=True).on_request(request) is request


def test_stream_and_error_hooks(nomoat_hooks: Hooks) -> None:
    out = nomoat_hooks(Upper()).on_stream(completion_request(), [completion("ab"), completion("c")])
    assert [c.choices[0].text for c in out if isinstance(c, Completion)] == ["AB", "C"]
    recorder = Recorder()
    nomoat_hooks(recorder).on_error(None, InvalidRequestError("nope"))
    assert recorder.seen == ["nope"]


def test_rank_gives_every_candidate_fresh_stats() -> None:
    class Spy:
        def rank(self, request, ctx, pool, stats):  # type: ignore[no-untyped-def]
            assert set(stats) == {c.target.deployment for c in pool}
            return []

    assert rank(Spy(), candidates(3)) == []
