"""The request path's small parts, without a server: capability matching and
the stream adapters (deadline, observation, usage shaping)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest

from gateway import wire
from gateway.contract import ModelCapabilities
from gateway.errors import StreamTimeoutError
from gateway.streams import StreamRecord, observed, shape_usage, until
from gateway.validation import missing_feature, needs_capabilities


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


ALL = ModelCapabilities(context_length=1, tools=True, json_schema=True, logprobs=True, max_n=8)
NONE = ModelCapabilities(context_length=1)


def chat(**fields: object) -> wire.ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    return msgspec.json.decode(msgspec.json.encode(body), type=wire.ChatCompletionRequest)


def completion(**fields: object) -> wire.CompletionRequest:
    body = {"model": "m", "prompt": "hi", **fields}
    return msgspec.json.decode(msgspec.json.encode(body), type=wire.CompletionRequest)


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize(
    ("request_", "feature"),
    [
        (chat(), None),
        (chat(tools=[TOOL]), "tools"),
        (chat(tools=[]), None),
        (chat(response_format={"type": "json_object"}), "response_format"),
        (
            chat(response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
            "response_format",
        ),
        (chat(response_format={"type": "text"}), None),
        (chat(logprobs=True), "logprobs"),
        (chat(logprobs=False), None),
        (chat(top_logprobs=2), "logprobs"),
        (chat(n=2), "n"),
        (chat(n=1), None),
        (completion(), None),
        (completion(logprobs=0), "logprobs"),
        (completion(n=3), "n"),
    ],
)
def test_each_feature_is_named_when_an_engine_lacks_it(
    request_: wire.ChatCompletionRequest | wire.CompletionRequest, feature: str | None
) -> None:
    assert missing_feature(request_, NONE) == feature
    assert missing_feature(request_, ALL) is None
    assert needs_capabilities(request_) is (feature is not None)


def test_n_is_checked_against_the_engines_ceiling() -> None:
    four = ModelCapabilities(context_length=1, max_n=4)
    assert missing_feature(chat(n=4), four) is None
    assert missing_feature(chat(n=5), four) == "n"


class Source:
    """A chunk source that notes whether it was closed."""

    def __init__(self, count: int, gap: float) -> None:
        self.count, self.gap, self.closed = count, gap, False

    async def chunks(self) -> AsyncIterator[int]:
        try:
            for index in range(self.count):
                await asyncio.sleep(self.gap)
                yield index
        finally:
            self.closed = True


@pytest.mark.anyio
async def test_until_ends_a_long_stream_with_a_timeout_and_closes_it() -> None:
    source = Source(count=1000, gap=0.01)
    seen = []
    with pytest.raises(StreamTimeoutError) as caught:
        async for item in until(source.chunks(), 0.05, 0.05):
            seen.append(item)
    assert 0 < len(seen) < 10
    assert source.closed
    assert caught.value.status_code == 504 and caught.value.code == "timeout"


@pytest.mark.anyio
async def test_until_lets_a_short_stream_finish() -> None:
    source = Source(count=3, gap=0.0)
    assert [item async for item in until(source.chunks(), 5.0, 5.0)] == [0, 1, 2]


@pytest.mark.anyio
async def test_until_closes_its_stream_when_the_consumer_stops() -> None:
    source = Source(count=1000, gap=0.0)
    relay = until(source.chunks(), 5.0, 5.0)
    assert await anext(relay) == 0
    await relay.aclose()
    assert source.closed


def usage_chunk() -> wire.Completion:
    usage = wire.Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5)
    return wire.Completion(
        id="c", object="text_completion", created=0, model="m", choices=[], usage=usage
    )


def text_chunk(text: str) -> wire.Completion:
    choice = wire.CompletionChoice(index=0, text=text, logprobs=None, finish_reason=None)
    return wire.Completion(id="c", object="text_completion", created=0, model="m", choices=[choice])


async def stream_of(*chunks: wire.Completion, fail: bool = False) -> AsyncIterator[wire.Completion]:
    for chunk in chunks:
        yield chunk
    if fail:
        raise RuntimeError("broken")


@pytest.mark.anyio
async def test_observed_reports_first_content_and_usage_once_at_the_end() -> None:
    records: list[StreamRecord] = []
    chunks = observed(
        stream_of(text_chunk(""), text_chunk("a"), usage_chunk()), 0.0, records.append
    )
    async for _ in chunks:
        assert records == []
    [record] = records
    assert record.first_content is not None and not record.failed
    assert record.usage is not None and record.usage.completion_tokens == 3


@pytest.mark.anyio
async def test_observed_counts_the_chunks_from_the_first_content_on() -> None:
    """What a stream cut before its usage generated: one token a chunk."""
    records: list[StreamRecord] = []
    relay = observed(
        stream_of(text_chunk(""), text_chunk("a"), text_chunk("b"), text_chunk("c")),
        0.0,
        records.append,
    )
    for _ in range(3):
        await anext(relay)
    await relay.aclose()
    [record] = records
    assert record.usage is None and record.chunks_since_content == 2


@pytest.mark.anyio
async def test_observed_reports_a_failure_and_a_cancellation() -> None:
    records: list[StreamRecord] = []
    with pytest.raises(RuntimeError):
        async for _ in observed(stream_of(text_chunk("a"), fail=True), 0.0, records.append):
            pass
    relay = observed(stream_of(text_chunk("a"), text_chunk("b")), 0.0, records.append)
    await anext(relay)
    await relay.aclose()
    assert [r.failed for r in records] == [True, False]


@pytest.mark.anyio
@pytest.mark.parametrize("include_usage", [True, False])
async def test_usage_is_shown_only_when_asked(include_usage: bool) -> None:
    shaped = [
        c async for c in shape_usage(stream_of(text_chunk("a"), usage_chunk()), include_usage)
    ]
    if include_usage:
        # A text completion's chunks never carry "usage": null (OpenAI's
        # description allows an object or nothing); the totals come last.
        assert len(shaped) == 2 and shaped[0].usage is msgspec.UNSET
        assert shaped[1].usage is not None
    else:
        assert len(shaped) == 1 and shaped[0].usage is msgspec.UNSET
