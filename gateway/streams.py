"""Chunk iterators: closed promptly, and the adapters streams pass through.

When a client goes away, the server closes the outermost iterator of its
stream; each wrapper must close the one it wraps at once, so the close reaches
the backend (which then stops its generation) now rather than whenever the
garbage collector gets to it. ``contextlib.aclosing`` wants ``aclose``, which
``AsyncIterator`` does not promise: async generators have it, and any other
iterator has nothing to close.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, TypeVar

import msgspec

from gateway import wire
from gateway.errors import HookFailedError, StreamTimeoutError
from gateway.exchange import finish_reason

T = TypeVar("T")


class _Closing(Generic[T]):
    # A class, not @asynccontextmanager: every stream passes through several
    # of these, and a generator-based context manager costs more per use.
    __slots__ = ("_chunks",)

    def __init__(self, chunks: AsyncIterator[T]) -> None:
        self._chunks = chunks

    async def __aenter__(self) -> AsyncIterator[T]:
        return self._chunks

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        close = getattr(self._chunks, "aclose", None)
        if close is not None:
            await close()


def closing(chunks: AsyncIterator[T]) -> _Closing[T]:
    """``async with closing(chunks):`` closes ``chunks`` when the block ends,
    however it ends."""
    return _Closing(chunks)


# ------------------------------------------------------------ stream adapters
# Each wraps a chunk iterator and closes the one it wraps when it ends.

AnswerT = TypeVar("AnswerT", wire.ChatCompletion, wire.Completion)
ChunkT = TypeVar("ChunkT", wire.ChatCompletionChunk, wire.Completion)
AnyChunk = wire.ChatCompletionChunk | wire.Completion


async def primed(chunks: AsyncIterator[T]) -> AsyncIterator[T]:
    """Wait for the first chunk now (so a failure before the first byte can
    still become a status, or move on to another deployment); return an
    iterator that replays it."""
    first = await anext(chunks)

    async def replay() -> AsyncIterator[T]:
        async with closing(chunks):
            yield first
            async for chunk in chunks:
                yield chunk

    return replay()


async def until(chunks: AsyncIterator[T], seconds_left: float, limit: float) -> AsyncIterator[T]:
    """End the stream with :class:`StreamTimeoutError` once ``seconds_left``
    have passed (of its whole ``limit``), closing the stream it wraps, which
    stops the generation.

    The timeout covers only the wait for the next chunk: a timeout around a
    ``yield`` would fire in whatever the consumer is awaiting."""
    deadline = asyncio.get_running_loop().time() + seconds_left
    async with closing(chunks):
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise StreamTimeoutError(
                    f"The stream ran longer than its limit of {limit:g} s; the answer is "
                    "incomplete."
                ) from None
            yield chunk


@dataclass(slots=True)
class StreamRecord:
    """What a stream did, for the stats and the accounting."""

    first_content: float | None = None
    usage: wire.Usage | None = None
    failed: bool = False
    # Chunks from the first with content on: the tokens generated, within
    # one, when the stream was cut before its usage came (one token a chunk
    # from the engines nomoat relays).
    chunks_since_content: int = 0
    # The first choice's finish reason, once a chunk carried one.
    finish_reason: str | None = None


async def observed(
    chunks: AsyncIterator[ChunkT], started: float, done: Callable[[StreamRecord], None]
) -> AsyncIterator[ChunkT]:
    """Pass a stream through, noting when its first content came (seconds
    after ``started``, a ``time.monotonic()``) and its usage; ``done`` hears
    of it when the stream ends, however it ends: its last chunk, an error, or
    the client going away."""
    record = StreamRecord()
    try:
        async with closing(chunks):
            async for chunk in chunks:
                if record.first_content is not None:
                    record.chunks_since_content += 1
                elif has_content(chunk):
                    record.first_content = time.monotonic() - started
                    record.chunks_since_content = 1
                if isinstance(chunk.usage, wire.Usage):
                    record.usage = chunk.usage
                if record.finish_reason is None:
                    record.finish_reason = finish_reason(chunk)
                yield chunk
    except Exception:
        record.failed = True
        raise
    finally:
        done(record)


def has_content(chunk: AnyChunk) -> bool:
    if isinstance(chunk, wire.Completion):
        return any(choice.text for choice in chunk.choices)
    return any(
        isinstance(choice.delta.content, str) and choice.delta.content for choice in chunk.choices
    )


async def checked(chunks: AsyncIterator[object], kind: type[T]) -> AsyncIterator[T]:
    """Chunks from stream hooks, which may hand back anything, type-checked."""
    async with closing(chunks):
        async for chunk in chunks:
            if not isinstance(chunk, kind):
                raise HookFailedError(
                    f"A hook returned {type(chunk).__name__} where {kind.__name__} was expected."
                )
            yield chunk


async def shape_usage(chunks: AsyncIterator[ChunkT], include_usage: bool) -> AsyncIterator[ChunkT]:
    """Backends always end with a usage chunk; show it only if asked, and
    then, as OpenAI does, put ``"usage": null`` on every other chat chunk (a
    text completion's usage is an object or absent in OpenAI's description)."""
    async with closing(chunks):
        async for chunk in chunks:
            if isinstance(chunk.usage, wire.Usage) and not chunk.choices:
                if include_usage:
                    yield chunk
                continue
            if include_usage and isinstance(chunk, wire.ChatCompletionChunk):
                chunk.usage = None
            yield chunk


async def chat_as_chunks(
    response: wire.ChatCompletion,
) -> AsyncIterator[wire.ChatCompletionChunk]:
    """A whole answer from a hook (a cache hit), as the chunks of a stream."""

    def chunk(choices: list[wire.ChunkChoice]) -> wire.ChatCompletionChunk:
        return wire.ChatCompletionChunk(
            id=response.id,
            object="chat.completion.chunk",
            created=response.created,
            model=response.model,
            choices=choices,
        )

    for choice in response.choices:
        message = choice.message
        delta = wire.ChunkDelta(role="assistant", content=message.content)
        if message.tool_calls:
            delta.tool_calls = [
                wire.whole_call_delta(i, c) for i, c in enumerate(message.tool_calls)
            ]
        yield chunk(
            [wire.ChunkChoice(index=choice.index, delta=delta, logprobs=None, finish_reason=None)]
        )
        end = wire.ChunkChoice(
            index=choice.index,
            delta=wire.ChunkDelta(),
            logprobs=None,
            finish_reason=choice.finish_reason,
        )
        yield chunk([end])
    last = chunk([])
    last.usage = response.usage
    yield last


async def completion_as_chunks(response: wire.Completion) -> AsyncIterator[wire.Completion]:
    """A whole completion from a hook, as a stream: the answer, then its usage."""
    # A copy: the hook may have handed out an object it keeps (a cache entry).
    yield msgspec.structs.replace(response, usage=msgspec.UNSET)
    yield wire.Completion(
        id=response.id,
        object="text_completion",
        created=response.created,
        model=response.model,
        choices=[],
        usage=response.usage,
    )
