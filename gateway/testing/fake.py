"""A fake backend: answers in OpenAI's exact shape, from a script, with no engine.

For the fast test layer and for plugin authors: :data:`manifest` offers the
backend type ``"fake"``, so a config can name it like any engine::

    [backends.a]
    type = "fake"
    tools = true            # capabilities, from the config
    reply = "Hello there."  # what it answers by default

Each call takes the next :class:`Script` queued with :meth:`FakeBackend.script`
(or :attr:`FakeBackend.default` when none is queued): answer, stream N chunks
with a delay between them, stall (before the first chunk or after k chunks)
until released, fail before the first byte or after k chunks. Every call is
recorded as a :class:`FakeCall` (target, request, what happened and when), so
a test can assert where a request went and whether its generation was
cancelled or closed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import zlib
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

from gateway import wire
from gateway.contract import (
    AdapterCounters,
    AnyRequest,
    BackendHealth,
    BackendType,
    EngineLoad,
    ModelCapabilities,
    PluginManifest,
    RequestContext,
    Target,
)
from gateway.embeddings.inputs import inputs_of, routing_view
from gateway.embeddings.vectors import embedding_list

__all__ = [
    "FAKE_TYPE",
    "CallKind",
    "FakeBackend",
    "FakeBackendConfig",
    "FakeCall",
    "Outcome",
    "Script",
    "manifest",
]

FAKE_TYPE = "fake"
ChunkT = TypeVar("ChunkT", wire.ChatCompletionChunk, wire.Completion)
CallKind = Literal["chat", "chat_stream", "completion", "completion_stream", "embed"]
# "running" until the call ends; "answered": a JSON answer returned; "streamed":
# a stream sent its last chunk; "failed": it raised its scripted error;
# "cancelled": the task awaiting it was cancelled; "closed": its iterator was
# closed before the end (the client went away, or the gateway gave up on it).
Outcome = Literal["running", "answered", "streamed", "failed", "cancelled", "closed"]


class FakeBackendConfig(BaseModel):
    """``[backends.NAME]`` with ``type = "fake"``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The engine's model names (``GET /v1/models`` of the engine).
    models: tuple[str, ...] = ("fake-model",)
    # The answer's text, split into ``chunks`` content chunks when streamed.
    reply: str = "Hello from the fake backend, one chunk at a time."
    chunks: Annotated[int, Field(ge=1)] = 3
    # Seconds between two chunks of a stream.
    chunk_delay_seconds: Annotated[float, Field(ge=0)] = 0.0
    # Capabilities (ModelCapabilities), the same for every model it serves.
    context_length: Annotated[int, Field(ge=1)] = 8192
    tools: bool = False
    json_schema: bool = False
    logprobs: bool = False
    max_n: Annotated[int, Field(ge=1)] = 1
    # Health, as the active probe would report it.
    ready: bool = True
    detail: str = ""
    # Requests the engine says wait in its queue (running: its live calls).
    waiting: Annotated[int, Field(ge=0)] = 0
    kv_cache_usage: Annotated[float, Field(ge=0, le=1)] | None = None
    # LoRA: whether it takes adapter requests, stacks, and how many it holds.
    lora: bool = False
    can_stack: bool = False
    adapter_slots: Annotated[int, Field(ge=1)] | None = None
    # Engine models it makes embeddings of (SupportsEmbeddings), and their size.
    embedding_models: tuple[str, ...] = ()
    embedding_dimensions: Annotated[int, Field(ge=1)] = 8


@dataclass(frozen=True, slots=True)
class Script:
    """What the fake does for one call. Unset fields take the config's values.

    ``error`` alone fails the call before anything is sent; with
    ``error_after=k`` a stream sends ``k`` chunks first, then fails (a JSON
    call fails either way). ``stall_after=k`` makes a stream wait after ``k``
    chunks (0: before the first) and a JSON call wait before answering, until
    :meth:`FakeCall.release` (or the gateway cancels it). A chat stream's
    chunks are: the role chunk, the content chunks, the finish chunk, the
    usage chunk (no choices); a completion stream has no role chunk.
    """

    text: str | None = None
    chunks: int | None = None
    chunk_delay: float | None = None
    # Seconds before the answer, or before a stream's first chunk.
    delay: float = 0.0
    error: BaseException | None = None
    error_after: int | None = None
    stall_after: int | None = None
    finish_reason: str | None = None
    prompt_tokens: int = 5


@dataclass(eq=False)
class FakeCall:
    """One call the fake received, and what became of it (monotonic times)."""

    kind: CallKind
    target: Target
    request: AnyRequest
    ctx: RequestContext
    script: Script
    started_at: float = field(default_factory=time.monotonic)
    chunks_sent: int = 0
    outcome: Outcome = "running"
    ended_at: float | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def stopped_early(self) -> bool:
        """The gateway stopped the generation: cancelled or closed."""
        return self.outcome in ("cancelled", "closed")

    def release(self) -> None:
        """Let a stalled call carry on."""
        self._released.set()

    async def wait_ended(self, within: float = 5.0) -> Outcome:
        """Wait (``within`` seconds at most) for the call to end; its outcome."""
        async with asyncio.timeout(within):
            await self.ended.wait()
        return self.outcome

    def _end(self, outcome: Outcome) -> None:
        if self.outcome == "running":
            self.outcome = outcome
            self.ended_at = time.monotonic()
            self.ended.set()


class FakeBackend:
    """Implements :class:`~gateway.contract.Backend`, ``ReportsLoad``,
    ``SupportsLoRA`` and ``ReportsAdapterSlots`` (adapters only if configured),
    and ``SupportsEmbeddings`` (for its ``embedding_models``)."""

    def __init__(self, name: str, config: FakeBackendConfig | None = None) -> None:
        self.name = name
        self.config = config or FakeBackendConfig()
        self.default = Script()
        self.calls: list[FakeCall] = []
        # What health() answers; a test may change it.
        self.health_now = BackendHealth(self.config.ready, self.config.detail)
        self.waiting = self.config.waiting
        self.closed = False
        self._scripts: deque[Script] = deque()
        self._new_call = asyncio.Condition()
        self._adapters: dict[str, None] = {}  # insertion order: least recently used first
        self._counters: dict[str, AdapterCounters] = {}

    # ------------------------------------------------------------ scripting

    def script(self, *scripts: Script) -> None:
        """Queue scripts: the next calls take them in order, then ``default``."""
        self._scripts.extend(scripts)

    async def wait_for_calls(self, count: int, within: float = 5.0) -> list[FakeCall]:
        """Wait (``within`` seconds at most) until ``count`` calls arrived; all calls."""
        async with asyncio.timeout(within), self._new_call:
            await self._new_call.wait_for(lambda: len(self.calls) >= count)
        return list(self.calls)

    # ------------------------------------------------------------- Backend

    def capabilities(self, engine_model: str) -> ModelCapabilities:
        config = self.config
        offered: dict[str, Any] = {
            "context_length": config.context_length,
            "tools": config.tools,
            "json_schema": config.json_schema,
            "logprobs": config.logprobs,
            "max_n": config.max_n,
        }
        # Only the fields this version of the contract has (max_n is newer).
        known = {f.name for f in dataclasses.fields(ModelCapabilities)}
        return ModelCapabilities(**{k: v for k, v in offered.items() if k in known})

    async def chat(
        self, request: wire.ChatCompletionRequest, target: Target, ctx: RequestContext
    ) -> wire.ChatCompletion:
        call = await self._begin("chat", request, target, ctx)
        with _recorded(call):
            pieces, reasons = await self._answer(call)
            choices = [
                wire.ChatChoice(
                    index=index,
                    message=wire.ResponseMessage(
                        role="assistant", content="".join(pieces), refusal=None
                    ),
                    logprobs=None,
                    finish_reason=reason,
                )
                for index, reason in enumerate(reasons)
            ]
            answer = wire.ChatCompletion(
                id=ctx.request_id,
                object="chat.completion",
                created=ctx.created,
                model=target.model,
                choices=choices,
                usage=_usage(call, len(pieces) * len(reasons)),
            )
            call._end("answered")
            return answer

    def chat_stream(
        self, request: wire.ChatCompletionRequest, target: Target, ctx: RequestContext
    ) -> AsyncIterator[wire.ChatCompletionChunk]:
        return self._play("chat_stream", request, target, ctx, self._chat_chunks)

    async def completion(
        self, request: wire.CompletionRequest, target: Target, ctx: RequestContext
    ) -> wire.Completion:
        call = await self._begin("completion", request, target, ctx)
        with _recorded(call):
            pieces, reasons = await self._answer(call)
            choices = [
                wire.CompletionChoice(
                    index=index, text="".join(pieces), logprobs=None, finish_reason=reason
                )
                for index, reason in enumerate(reasons)
            ]
            answer = wire.Completion(
                id=ctx.request_id,
                object="text_completion",
                created=ctx.created,
                model=target.model,
                choices=choices,
                usage=_usage(call, len(pieces) * len(reasons)),
            )
            call._end("answered")
            return answer

    def completion_stream(
        self, request: wire.CompletionRequest, target: Target, ctx: RequestContext
    ) -> AsyncIterator[wire.Completion]:
        return self._play("completion_stream", request, target, ctx, self._completion_chunks)

    async def models(self) -> Sequence[str]:
        return list(self.config.models)

    async def health(self) -> BackendHealth:
        return self.health_now

    async def aclose(self) -> None:
        self.closed = True

    # ----------------------------------------------------------- ReportsLoad

    def load(self) -> EngineLoad:
        running = sum(1 for call in self.calls if call.outcome == "running")
        return EngineLoad(
            running=running, waiting=self.waiting, kv_cache_usage=self.config.kv_cache_usage
        )

    # ---------------------------------------------------------- SupportsLoRA

    def serves_adapters(self) -> bool:
        return self.config.lora

    def can_stack(self) -> bool:
        return self.config.can_stack

    def adapters_loaded(self) -> frozenset[str]:
        return frozenset(self._adapters)

    def adapter_slots(self) -> int | None:
        return self.config.adapter_slots

    async def unload_adapter(self, name: str) -> None:
        if name in self._adapters:
            del self._adapters[name]
            self._counters.setdefault(name, AdapterCounters()).evictions += 1

    def adapter_counters(self) -> Mapping[str, AdapterCounters]:
        return dict(self._counters)

    # -------------------------------------------------------------- internals

    async def _begin(
        self, kind: CallKind, request: AnyRequest, target: Target, ctx: RequestContext
    ) -> FakeCall:
        script = self._scripts.popleft() if self._scripts else self.default
        call = FakeCall(kind, target, request, ctx, script)
        self._hold(target)
        self.calls.append(call)
        async with self._new_call:
            self._new_call.notify_all()
        return call

    def _hold(self, target: Target) -> None:
        """Load the target's adapters, evicting the least recently used."""
        for use in target.adapters:
            name = use.adapter.name
            if name in self._adapters:
                self._adapters[name] = self._adapters.pop(name)
                continue
            slots = self.config.adapter_slots
            if slots is not None and len(self._adapters) >= slots:
                evicted = next(iter(self._adapters))
                del self._adapters[evicted]
                self._counters.setdefault(evicted, AdapterCounters()).evictions += 1
            self._adapters[name] = None
            self._counters.setdefault(name, AdapterCounters()).loads += 1

    def _pieces(self, call: FakeCall) -> tuple[list[str], list[str]]:
        """The content pieces (a token each) and each choice's finish reason."""
        script = call.script
        text = self.config.reply if script.text is None else script.text
        count = script.chunks or self.config.chunks
        size = len(text)
        pieces = [text[i * size // count : (i + 1) * size // count] for i in range(count)]
        limit = _max_tokens(call.request)
        reason = script.finish_reason or "stop"
        if limit is not None and limit < len(pieces):
            pieces = pieces[:limit]
            reason = script.finish_reason or "length"
        return pieces, [reason] * (call.request.n or 1)

    # ----------------------------------------------------------- embeddings

    def embeds(self, engine_model: str) -> bool:
        return engine_model in self.config.embedding_models

    async def embed(
        self, request: wire.EmbeddingRequest, target: Target, ctx: RequestContext
    ) -> wire.EmbeddingList:
        """One unit vector per input, the same for the same input; the call
        is recorded with the request's completion-shaped view (its
        ``prompt`` is the input), and takes its script (delay, error, stall;
        ``prompt_tokens`` per input)."""
        call = await self._begin("embed", routing_view(request), target, ctx)
        with _recorded(call):
            await self._answer(call)
            inputs = inputs_of(request)
            items = [*inputs.texts, *inputs.tokens]
            size = self.config.embedding_dimensions
            vectors = [_unit_vector(repr(item), size) for item in items]
            tokens = call.script.prompt_tokens * len(items)
            answer = embedding_list(vectors, request, target.model, tokens)
            call._end("answered")
            return answer

    async def _answer(self, call: FakeCall) -> tuple[list[str], list[str]]:
        """A JSON answer's pieces and reasons, after the scripted delay, error or stall."""
        script = call.script
        if script.delay:
            await asyncio.sleep(script.delay)
        if script.error is not None:
            raise script.error
        if script.stall_after is not None:
            await call._released.wait()
        return self._pieces(call)

    async def _play(
        self,
        kind: CallKind,
        request: AnyRequest,
        target: Target,
        ctx: RequestContext,
        chunks_of: Callable[[FakeCall], list[ChunkT]],
    ) -> AsyncIterator[ChunkT]:
        """A stream as scripted: delays, and a failure or a stall after k chunks."""
        call = await self._begin(kind, request, target, ctx)
        with _recorded(call):
            script = call.script
            if script.delay:
                await asyncio.sleep(script.delay)
            await self._checkpoint(call)
            chunks = chunks_of(call)
            delay = self.config.chunk_delay_seconds
            delay = delay if script.chunk_delay is None else script.chunk_delay
            for position, chunk in enumerate(chunks):
                if position and delay:
                    await asyncio.sleep(delay)
                call.chunks_sent += 1
                if position == len(chunks) - 1:
                    # Complete once the last chunk is handed over.
                    call._end("streamed")
                yield chunk
                await self._checkpoint(call)

    async def _checkpoint(self, call: FakeCall) -> None:
        """After ``chunks_sent`` chunks: fail or stall, if the script says so."""
        script = call.script
        if script.error is not None and (script.error_after or 0) == call.chunks_sent:
            raise script.error
        if script.stall_after == call.chunks_sent:
            await call._released.wait()

    def _chat_chunks(self, call: FakeCall) -> list[wire.ChatCompletionChunk]:
        """Per choice: the role, the content pieces, the finish; then the usage."""
        ctx, target = call.ctx, call.target

        def chunk(
            index: int, delta: wire.ChunkDelta, reason: str | None = None
        ) -> wire.ChatCompletionChunk:
            choice = wire.ChunkChoice(index=index, delta=delta, logprobs=None, finish_reason=reason)
            return _chat_chunk(ctx, target, [choice])

        pieces, reasons = self._pieces(call)
        chunks = []
        for index, reason in enumerate(reasons):
            chunks.append(chunk(index, wire.ChunkDelta(role="assistant", content="")))
            chunks += [chunk(index, wire.ChunkDelta(content=piece)) for piece in pieces]
            chunks.append(chunk(index, wire.ChunkDelta(), reason))
        last = _chat_chunk(ctx, target, [])
        last.usage = _usage(call, len(pieces) * len(reasons))
        return [*chunks, last]

    def _completion_chunks(self, call: FakeCall) -> list[wire.Completion]:
        """Per choice: the text pieces, the finish; then the usage."""
        ctx, target = call.ctx, call.target

        def chunk(index: int, text: str, reason: str | None = None) -> wire.Completion:
            choice = wire.CompletionChoice(
                index=index, text=text, logprobs=None, finish_reason=reason
            )
            return _completion(ctx, target, [choice])

        pieces, reasons = self._pieces(call)
        chunks = []
        for index, reason in enumerate(reasons):
            chunks += [chunk(index, piece) for piece in pieces]
            chunks.append(chunk(index, "", reason))
        last = _completion(ctx, target, [])
        last.usage = _usage(call, len(pieces) * len(reasons))
        return [*chunks, last]


class _Recorded:
    """Ends a call's record however its code ends: an error, a cancellation,
    or (for a stream) the iterator closed at a ``yield``."""

    __slots__ = ("_call",)

    def __init__(self, call: FakeCall) -> None:
        self._call = call

    def __enter__(self) -> FakeCall:
        return self._call

    def __exit__(self, kind: type[BaseException] | None, error: object, tb: object) -> None:
        if kind is None:
            return
        if issubclass(kind, asyncio.CancelledError):
            self._call._end("cancelled")
        elif issubclass(kind, GeneratorExit):
            self._call._end("closed")
        else:
            self._call._end("failed")


def _recorded(call: FakeCall) -> _Recorded:
    return _Recorded(call)


def _unit_vector(seed: str, size: int) -> npt.NDArray[np.float32]:
    values = np.random.default_rng(zlib.crc32(seed.encode())).standard_normal(size)
    return (values / np.linalg.norm(values)).astype(np.float32)


def _chat_chunk(
    ctx: RequestContext, target: Target, choices: list[wire.ChunkChoice]
) -> wire.ChatCompletionChunk:
    return wire.ChatCompletionChunk(
        id=ctx.request_id,
        object="chat.completion.chunk",
        created=ctx.created,
        model=target.model,
        choices=choices,
    )


def _completion(
    ctx: RequestContext, target: Target, choices: list[wire.CompletionChoice]
) -> wire.Completion:
    return wire.Completion(
        id=ctx.request_id,
        object="text_completion",
        created=ctx.created,
        model=target.model,
        choices=choices,
    )


def _max_tokens(request: AnyRequest) -> int | None:
    if isinstance(request, wire.ChatCompletionRequest):
        return request.max_completion_tokens or request.max_tokens
    return request.max_tokens


def _usage(call: FakeCall, tokens: int) -> wire.Usage:
    """One token per content piece, for every choice."""
    prompt = call.script.prompt_tokens
    return wire.Usage(prompt_tokens=prompt, completion_tokens=tokens, total_tokens=prompt + tokens)


async def create_backend(name: str, config: FakeBackendConfig) -> FakeBackend:
    return FakeBackend(name, config)


manifest = PluginManifest(
    name="nomoat-fake",
    backends={FAKE_TYPE: BackendType(FakeBackendConfig, create_backend)},
)
