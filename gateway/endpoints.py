"""The OpenAI endpoints the pipeline serves, described as data.

Chat and completions take the same path through the gateway; what differs
(the decoder, the backend method, the types, how a whole answer becomes a
stream) is written down once here, so neither the app nor the pipeline keeps
twin functions for them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from gateway import wire
from gateway.contract import Backend, RequestContext, Target
from gateway.embeddings.inputs import decode_embeddings
from gateway.relay import ChunkRelay, SupportsRelay
from gateway.settings import LimitSettings
from gateway.streams import chat_as_chunks, completion_as_chunks
from gateway.validation import decode_chat, decode_completion

RequestT = TypeVar("RequestT", wire.ChatCompletionRequest, wire.CompletionRequest)
AnswerT = TypeVar("AnswerT", wire.ChatCompletion, wire.Completion)
ChunkT = TypeVar("ChunkT", wire.ChatCompletionChunk, wire.Completion)


@dataclass(frozen=True, slots=True)
class Endpoint(Generic[RequestT, AnswerT, ChunkT]):
    # The endpoint as decision logs name it.
    name: str
    path: str
    # Answers' ids start with it ("chatcmpl-...").
    id_prefix: str
    request_type: type[RequestT]
    answer_type: type[AnswerT]
    chunk_type: type[ChunkT]
    decode: Callable[[bytes, LimitSettings], RequestT]
    answer: Callable[[Backend, RequestT, Target, RequestContext], Awaitable[AnswerT]]
    stream: Callable[[Backend, RequestT, Target, RequestContext], AsyncIterator[ChunkT]]
    # A whole answer (from a hook: a cache hit) as the chunks of a stream.
    as_chunks: Callable[[AnswerT], AsyncIterator[ChunkT]]
    # The cheap relay's events (gateway/relay.py), for backends that have it.
    relay: Callable[
        [SupportsRelay, RequestT, Target, RequestContext, ChunkRelay], AsyncIterator[bytes]
    ]


CHAT: Endpoint[wire.ChatCompletionRequest, wire.ChatCompletion, wire.ChatCompletionChunk] = (
    Endpoint(
        name="chat",
        path="/v1/chat/completions",
        id_prefix="chatcmpl",
        request_type=wire.ChatCompletionRequest,
        answer_type=wire.ChatCompletion,
        chunk_type=wire.ChatCompletionChunk,
        decode=decode_chat,
        answer=lambda backend, request, target, ctx: backend.chat(request, target, ctx),
        stream=lambda backend, request, target, ctx: backend.chat_stream(request, target, ctx),
        as_chunks=chat_as_chunks,
        relay=lambda backend, request, target, ctx, relay: backend.chat_relay(
            request, target, ctx, relay
        ),
    )
)

COMPLETIONS: Endpoint[wire.CompletionRequest, wire.Completion, wire.Completion] = Endpoint(
    name="completions",
    path="/v1/completions",
    id_prefix="cmpl",
    request_type=wire.CompletionRequest,
    answer_type=wire.Completion,
    chunk_type=wire.Completion,
    decode=decode_completion,
    answer=lambda backend, request, target, ctx: backend.completion(request, target, ctx),
    stream=lambda backend, request, target, ctx: backend.completion_stream(request, target, ctx),
    as_chunks=completion_as_chunks,
    relay=lambda backend, request, target, ctx, relay: backend.completion_relay(
        request, target, ctx, relay
    ),
)


@dataclass(frozen=True, slots=True)
class Embeddings:
    """``POST /v1/embeddings``: one JSON answer, never a stream, so not an
    :class:`Endpoint` (its hooks, streams and relays are chat's and
    completions'); :meth:`gateway.pipeline.Pipeline.embed` serves it."""

    name: str
    path: str
    id_prefix: str
    decode: Callable[[bytes, LimitSettings], wire.EmbeddingRequest]


EMBEDDINGS = Embeddings(
    name="embeddings", path="/v1/embeddings", id_prefix="embd", decode=decode_embeddings
)
