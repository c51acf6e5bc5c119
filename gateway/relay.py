"""The cheap relay: an HTTP upstream's stream, re-framed with the least work.

When nothing needs typed chunks (no stream hook, no error hook, no stream
time limit, no trace content captured), each ``data:`` payload an
OpenAI-compatible upstream sends is turned straight into the event the client
gets, in one pass, and the events of one network read leave in one write.
What reaches the client is what the typed path (decode into
:mod:`gateway.wire_answers`, rewrite, encode) would send:

- the common chunk, its envelope as the stream's previous chunk had it
  (``{"id":...,"object":...,"created":...,"model":...,"choices":``, byte for
  byte) and one choice carrying text and nothing else
  (``[{"index":0,"delta":{"content":"..."},"logprobs":null,"finish_reason":null}]}``
  for chat, ``[{"index":0,"text":"...","logprobs":null,"finish_reason":null}]}``
  for completions, or with the null fields vLLM adds there, which the typed
  path drops too), is exactly how the gateway encodes such a chunk: its
  envelope is swapped for the gateway's (the request's ``id``, the route's
  ``model``) and the text kept as bytes, without decoding or encoding the
  chunk. The text must be one JSON string (checked by decoding it), so
  nothing can hide in it; its escapes stay as the upstream wrote them
  (``\u00e9`` for ``é``): the same JSON value, possibly other bytes than the
  typed path's;
- every other chunk (the first, a role chunk, tool calls, logprobs, a finish
  reason, several choices, usage, fields the gateway does not forward, an
  envelope that changed) takes the typed path, so unknown fields are still
  dropped and finish reasons still checked; it also tells the relay the
  envelope to expect next.

Usage is read from the final chunk (decoded once per stream) and shown only
when the client asked for it, as :func:`gateway.streams.shape_usage` does;
the first chunk with content is timed for the stats. What this saves is
measured in docs/benchmarks.md ("Streaming at scale").
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from typing import Protocol, TypeGuard, runtime_checkable

import msgspec

from gateway import wire
from gateway.contract import RequestContext, Target
from gateway.sse import event
from gateway.streams import has_content

# The one choice the fast path keeps, and the chunk's end: its text is
# between them. The first tail is how the gateway writes it; the others are
# vLLM's (0.32), with fields the typed path drops (null token ids, a null
# stop reason): the gateway's tail replaces them.
_CHAT_HEAD = b'[{"index":0,"delta":{"content":'
_CHAT_TAILS = (
    b'},"logprobs":null,"finish_reason":null}]}',
    b'},"logprobs":null,"finish_reason":null,"token_ids":null}]}',
)
_COMPLETION_HEAD = b'[{"index":0,"text":'
_COMPLETION_TAILS = (
    b',"logprobs":null,"finish_reason":null}]}',
    b',"logprobs":null,"finish_reason":null,"stop_reason":null,'
    b'"prompt_token_ids":null,"token_ids":null}]}',
)
_EMPTY_TEXT = b'""'

_text_decoder = msgspec.json.Decoder(str)
_chat_decoder = msgspec.json.Decoder(wire.ChatCompletionChunk)
_completion_decoder = msgspec.json.Decoder(wire.Completion)
_encode = msgspec.json.Encoder().encode

AnyChunk = wire.ChatCompletionChunk | wire.Completion


def _envelope(chunk_id: str, kind: bytes, created: int, model: str) -> bytes:
    """A chunk's bytes up to its choices, as msgspec (and vLLM) write them
    (one formatting, not nine concatenations: twice a stream)."""
    return b'{"id":%b,"object":"%b","created":%d,"model":%b,"choices":' % (
        _encode(chunk_id),
        kind,
        created,
        _encode(model),
    )


class ChunkRelay:
    """One stream's re-framing, chunk by chunk: what the upstream sent in, the
    client's events out. One per stream.

    ``feed`` raises :class:`msgspec.DecodeError` (or ``ValidationError``) for
    a payload that is not a chunk (an upstream's error event), which the
    caller turns into an upstream error."""

    __slots__ = (
        "_chat",
        "_content_at",
        "_count",
        "_end",
        "_envelope",
        "_head",
        "_id",
        "_include_usage",
        "_kind",
        "_late_usage",
        "_model",
        "_out_head",
        "_out_tail",
        "_prefix",
        "_start",
        "_tail",
        "_tails",
        "first_content",
        "reasons",
        "started",
        "upstream_model",
        "usage",
    )

    def __init__(
        self, request_id: str, model: str, *, chat: bool, include_usage: bool, started: float
    ) -> None:
        self._id = request_id
        self._model = model
        self._chat = chat
        if chat:
            self._kind, self._head, self._tails = b"chat.completion.chunk", _CHAT_HEAD, _CHAT_TAILS
        else:
            self._kind, self._head, self._tails = (
                b"text_completion",
                _COMPLETION_HEAD,
                _COMPLETION_TAILS,
            )
        # The gateway's own tail, without the chunk's closing brace.
        self._tail = self._tails[0][:-1]
        self._include_usage = include_usage
        # "usage": null on every chat chunk but the last, if usage was asked for.
        self._end = b',"usage":null}' if include_usage and chat else b"}"
        # What follows a kept chunk's text in the client's event.
        self._out_tail = self._tail + self._end + b"\n\n"
        # The upstream's envelope and the choice's head, as the next chunk is
        # expected to start (b"\0": nothing expected until a chunk took the
        # typed path), where its text starts, and the client's event up to it.
        self._prefix = b"\0"
        # The upstream's id, created and model the prefix was made of.
        self._envelope: tuple[str, int, str] | None = None
        self._start = 0
        self._out_head = b""
        self.started = started
        # A usage chunk to send at the end (an upstream that puts usage on
        # chunks with choices, as xAI does: a running total on each).
        self._late_usage: AnyChunk | None = None
        # Seconds from ``started`` to the first chunk with content.
        self.first_content: float | None = None
        self.usage: wire.Usage | None = None
        # For the telemetry, as gateway.streams.observed and the attempt's
        # span read typed chunks: payloads fed, and the one with the first
        # content (see chunks_since_content), each choice's finish reason,
        # the model the upstream named.
        self._count = 0
        self._content_at = 0
        self.reasons: dict[int, str] = {}
        self.upstream_model: str | None = None

    @property
    def request_id(self) -> str:
        return self._id

    @property
    def model(self) -> str:
        return self._model

    @property
    def chunks_since_content(self) -> int:
        """Chunks from the first with content on: the tokens generated, within
        one, when the stream was cut before its usage came."""
        return 0 if self.first_content is None else self._count - self._content_at + 1

    def feed(self, payload: bytes) -> bytes:
        """The event (``data: ...`` and a blank line) for one upstream
        payload, or nothing (a usage chunk the client did not ask for).

        The hot path of the relay (once a chunk): every step here is counted
        in docs/benchmarks.md, hence the unrolled tails and no helper calls."""
        self._count += 1
        if payload.startswith(self._prefix):
            tails = self._tails
            if payload.endswith(tails[0]):
                text = payload[self._start : len(payload) - len(tails[0])]
            elif payload.endswith(tails[1]):
                text = payload[self._start : len(payload) - len(tails[1])]
            else:
                return self._typed(payload)
            try:
                # Exactly one JSON string (so nothing else hides in it).
                _text_decoder.decode(text)
            except msgspec.DecodeError:
                return self._typed(payload)
            if self.first_content is None and text != _EMPTY_TEXT:
                self._content(time.monotonic())
            return self._out_head + text + self._out_tail
        return self._typed(payload)

    def _content(self, now: float) -> None:
        """This payload is the first with content."""
        self.first_content = now - self.started
        self._content_at = self._count

    def finish(self) -> bytes:
        """The events still owed when the upstream's stream ended well."""
        late, self._late_usage = self._late_usage, None
        if late is None or not self._include_usage:
            return b""
        return event(late)

    def _typed(self, payload: bytes) -> bytes:
        """A chunk the fast path does not keep: decoded, rewritten and encoded
        as the typed path does (unknown fields dropped, values checked)."""
        chunk: AnyChunk = (_chat_decoder if self._chat else _completion_decoder).decode(payload)
        envelope = (chunk.id, chunk.created, chunk.model)
        if envelope != self._envelope:
            # (Unchanged on most streams' typed chunks: built once.)
            self._envelope = envelope
            self._prefix = _envelope(chunk.id, self._kind, chunk.created, chunk.model) + self._head
            self._start = len(self._prefix)
            ours = _envelope(self._id, self._kind, chunk.created, self._model)
            self._out_head = b"data: " + ours + self._head
        if self.upstream_model is None:
            self.upstream_model = chunk.model
        chunk.id, chunk.model = self._id, self._model
        if self.first_content is None and has_content(chunk):
            self._content(time.monotonic())
        for choice in chunk.choices:
            if choice.finish_reason:
                self.reasons[choice.index] = choice.finish_reason
        if isinstance(chunk.usage, wire.Usage):
            self.usage = chunk.usage
            if chunk.choices:
                self._late_usage = msgspec.structs.replace(chunk, choices=[])
                chunk.usage = msgspec.UNSET
            else:
                self._late_usage = None
                return event(chunk) if self._include_usage else b""
        if self._include_usage and self._chat:
            chunk.usage = None
        return event(chunk)


@runtime_checkable
class SupportsRelay(Protocol):
    """A backend that streams its upstream's chunks through a
    :class:`ChunkRelay` (OpenAI-compatible HTTP upstreams)."""

    def chat_relay(
        self,
        request: wire.ChatCompletionRequest,
        target: Target,
        ctx: RequestContext,
        relay: ChunkRelay,
    ) -> AsyncIterator[bytes]: ...

    def completion_relay(
        self,
        request: wire.CompletionRequest,
        target: Target,
        ctx: RequestContext,
        relay: ChunkRelay,
    ) -> AsyncIterator[bytes]: ...


_RELAYS: dict[type, bool] = {}


def supports_relay(backend: object) -> TypeGuard[SupportsRelay]:
    """Resolved once per backend class (a Protocol check is slow)."""
    known = _RELAYS.get(type(backend))
    if known is None:
        known = _RELAYS[type(backend)] = isinstance(backend, SupportsRelay)
    return known


RelayEnd = Callable[[ChunkRelay, BaseException | None], None]


class Relayed:
    """A relayed stream whose first events arrived: the client's events
    (already framed), as an async iterator: the first ones, then the rest as
    they come. A failure is raised as a typed stream's is
    (:func:`gateway.sse.sse_events` makes it the last event and adds
    ``data: [DONE]`` after a good end). Each of ``on_end`` hears once, in
    order, how it ended (the failure, or None: the end, or the client
    leaving), however it ended. :class:`gateway.relay_response.RelayedEvents`
    sends it to the client without the iterator's own frame per read."""

    __slots__ = ("_closed", "first", "on_end", "relay", "rest")

    def __init__(self, first: bytes, rest: AsyncIterator[bytes], relay: ChunkRelay) -> None:
        self.first: bytes | None = first
        self.rest = rest
        self.relay = relay
        self.on_end: list[RelayEnd] = []
        self._closed = False

    def __aiter__(self) -> Relayed:
        return self

    async def __anext__(self) -> bytes:
        first = self.first
        if first is not None:
            self.first = None
            return first
        try:
            return await anext(self.rest)
        except StopAsyncIteration:
            await self.aclose()
            raise
        except Exception as error:
            await self.aclose(error)
            raise

    async def aclose(self, failure: BaseException | None = None) -> None:
        """Close the upstream's stream (if still open) and tell ``on_end``."""
        if self._closed:
            return
        self._closed = True
        try:
            close = getattr(self.rest, "aclose", None)
            if close is not None:
                await close()
        finally:
            for heard in self.on_end:
                heard(self.relay, failure)


async def opened(events: AsyncIterator[bytes], relay: ChunkRelay) -> Relayed:
    """Wait for the first events now, as :func:`gateway.streams.primed` does:
    a failure before them can still become a status or move on."""
    try:
        first = await anext(events)
    except BaseException:
        close = getattr(events, "aclose", None)
        if close is not None:
            await close()
        raise
    return Relayed(first, events, relay)
