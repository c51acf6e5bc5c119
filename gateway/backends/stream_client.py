"""The gateway's own HTTP/1.1 client for relayed streams from plain-HTTP
upstreams (vLLM, edge nodes, OpenAI-compatible servers): one
``asyncio.Protocol`` per connection that sends the request, parses the status
line and headers, decodes the body (chunked, ``Content-Length`` or ended by
the close), splits it into SSE lines and turns each ``data:`` payload into the
client's event in ``data_received`` itself, with kept-alive connections
reused per upstream.

Why not aiohttp here: a relayed chunk went through aiohttp's parser, its
``StreamReader`` and a ``readany`` per read, which left the cheapest relay
possible on aiohttp at 51,300 instructions a chunk (docs/benchmarks.md,
"Streaming at scale"). Here a read that holds one HTTP chunk with one event
(the common read) is checked with a few byte comparisons and fed, and the
events wake the waiting sender once. aiohttp stays for everything else
(unstreamed answers, probes, admin calls, https).

The contract is :meth:`gateway.backends.upstream.Upstream.relay`'s: errors
before the first events are retryable ``GatewayError``s (an unreachable or
silent upstream, a status as an OpenAI-shaped error, a redirect refused),
after them an ``UpstreamError`` the response turns into the client's last
event; closing the stream early drops the connection (vLLM aborts the
request); a stream that ended well gives its connection back to the pool
once the upstream's message is complete.

This module is the connection (:class:`StreamConnection`: the request, the
HTTP/1.1 response parser, the SSE lines fed to the relay); the others are
:mod:`gateway.backends.stream_pump` (its events sent from
``data_received``), :mod:`gateway.backends.stream_pool` (kept-alive
connections per upstream, the request's fixed head) and
:mod:`gateway.backends.relay_stream` (a client's relayed stream on them).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final, NamedTuple, cast

import msgspec
from litestar.types import Send

from gateway.backends.stream_pump import Pump
from gateway.chunk_write import ChunkWriter
from gateway.errors import UpstreamError

Feed = Callable[[bytes], bytes]
Finish = Callable[[], bytes]
Comments = Callable[[bytes], None]


class RelayHandlers(NamedTuple):
    """What the reader of a relayed stream does with it
    (:meth:`gateway.backends.upstream.Upstream.relay`): ``feed`` turns each
    ``data:`` payload into the client's bytes, ``finish`` gives what is still
    owed at ``[DONE]``, ``comments`` hears each SSE comment line's text (an
    edge node's busy seconds; never the client's), ``closed`` is called once
    when the stream is closed, however it ended. A tuple: one is made per
    stream, cheaply."""

    feed: Feed
    finish: Finish
    comments: Comments | None = None
    closed: Callable[[], None] | None = None


# Bytes and byte sets the parser checks.
_CRLF: Final = b"\r\n"
_NEWLINE: Final = ord("\n")
_BRACKET: Final = ord("[")
_HEX: Final = b"0123456789abcdefABCDEF"
_DIGITS: Final = b"0123456789"
# A response's status line and headers at most; a chunk-size line at most.
MAX_HEAD_BYTES: Final = 64 * 1024
_MAX_SIZE_LINE: Final = 1024
# The most of an error answer's body kept (for the operator's log).
MAX_ERROR_BODY: Final = 64 * 1024
# Events buffered for a slow client before the upstream is not read.
_PAUSE_EVENTS: Final = 256
# After [DONE], how long the rest of the upstream's message (its last
# chunk) may take before the connection is dropped instead of reused.
_DRAIN_SECONDS: Final = 5.0

# Parser phases.
_IDLE: Final = 0
_HEAD: Final = 1
_BODY: Final = 2
_CLOSED: Final = 3
# Body framings.
_CHUNKED: Final = 0
_LENGTH: Final = 1
_UNTIL_CLOSE: Final = 2
# Chunked decoder states: a size line, a chunk's data, the CRLF after it,
# the trailer section.
_SIZE: Final = 0
_DATA: Final = 1
_DATA_END: Final = 2
_TRAILER: Final = 3


class ProtocolError(Exception):
    """The upstream's bytes are not HTTP/1.1 as this client reads it."""


class StaleConnectionError(Exception):
    """A reused connection closed before any byte of the answer: the upstream
    dropped it while idle, so the request is sent again on a new one."""


class StreamConnection(asyncio.Protocol):
    """One connection to an upstream, one request at a time.

    The per-read work is in :meth:`data_received` (the common read: one HTTP
    chunk holding one ``data:`` event) and deliberately flat: every attribute
    look-up there is counted per relayed chunk."""

    __slots__ = (
        "_body_mode",
        "_buffer",
        "_chunk_left",
        "_chunk_state",
        "_comments",
        "_drain_timer",
        "_error_body",
        "_failure",
        "_fast",
        "_feed",
        "_finish",
        "_head_waiter",
        "_keep_alive",
        "_left",
        "_loop",
        "_lost",
        "_message_done",
        "_name",
        "_on_idle",
        "_out",
        "_paused",
        "_pending",
        "_phase",
        "_pump",
        "_push",
        "_received",
        "_relaying",
        "_saw_done",
        "_time",
        "_waiter",
        "_write",
        "headers",
        "idle_since",
        "last",
        "owner_done",
        "reused",
        "status",
        "transport",
    )

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self._name = name
        self._loop = loop
        self._time = loop.time
        self.transport: asyncio.Transport | None = None
        self._phase = _IDLE
        self.reused = False
        self.idle_since = 0.0
        # Told when the connection becomes idle again (the pool takes it
        # back) or is lost.
        self._on_idle: Callable[[StreamConnection], None] | None = None
        self._reset()

    def _reset(self) -> None:
        self._buffer = b""
        self.status = 0
        self.headers: dict[str, str] = {}
        self._body_mode = _UNTIL_CLOSE
        self._left = 0
        self._chunk_state = _SIZE
        self._chunk_left = 0
        self._keep_alive = True
        self._received = False
        self._head_waiter: asyncio.Future[None] | None = None
        # The relay: feed, finish, comments; events out; the waiting reader.
        self._feed: Feed | None = None
        self._finish: Finish | None = None
        self._comments: Comments | None = None
        self._relaying = False
        self._pending = b""
        self._out: list[bytes] = []
        self._waiter: asyncio.Future[bytes] | None = None
        # Pumping (see pump()): the events go to the ASGI send from here.
        self._pump: Pump | None = None
        self._push: Callable[[bytes], None] | None = None
        # While pushing: the client connection's chunk writer, tried first
        # (gateway.chunk_write: False when it declines, then push).
        self._write: Callable[[bytes], bool] | None = None
        self._failure: BaseException | None = None
        self._saw_done = False
        self._message_done = False
        self.owner_done = False
        self._error_body = bytearray()
        self._paused = False
        self._drain_timer: asyncio.TimerHandle | None = None
        # The common read's path is open: a chunked body, no bytes held back.
        self._fast = False
        self._lost: tuple[Exception | None] | None = None
        self.last = 0.0

    # ------------------------------------------------------------ asyncio

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are not asyncio.Transport subclasses.)
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
        phase = self._phase
        if phase == _BODY and not self._relaying and 200 <= self.status < 300:
            # The reader has not started on the body yet: it hears of the
            # close once it has read what came before it (begin_relay).
            self._lost = (exc,)
            return
        self._phase = _CLOSED
        self._fast = False
        if phase in (_HEAD, _BODY):
            self._lost_mid_message(phase, exc)
        if self._on_idle is not None:
            self._on_idle(self)

    def _lost_mid_message(self, phase: int, exc: Exception | None) -> None:
        if phase == _BODY and self._body_mode == _UNTIL_CLOSE:
            # The close is the body's end.
            self._message_end()
            return
        if phase == _HEAD and not self._received and self.reused:
            self._fail(StaleConnectionError())
            return
        self._fail(self._cut(type(exc).__name__ if exc is not None else "closed mid-answer"))

    def eof_received(self) -> bool:
        # Close our side too: an upstream that half-closes is done.
        return False

    def pause_writing(self) -> None:
        pass

    def resume_writing(self) -> None:
        pass

    # --------------------------------------------------------- a request

    def start(
        self,
        request: bytes,
        feed: Feed,
        finish: Finish,
        comments: Comments | None,
        on_idle: Callable[[StreamConnection], None],
    ) -> asyncio.Future[None]:
        """Send ``request``; the future is done once the status line and
        headers are in (and, for a status that is not 2xx, the body)."""
        self._reset()
        self._feed, self._finish, self._comments = feed, finish, comments
        self._on_idle = on_idle
        self._phase = _HEAD
        waiter = self._head_waiter = self._loop.create_future()
        self.last = self._time()
        assert self.transport is not None
        self.transport.write(request)
        return waiter

    def idle_for(self) -> float:
        return self._time() - self.idle_since

    @property
    def usable(self) -> bool:
        """Idle, open and allowed to carry another request."""
        transport = self.transport
        return (
            self._phase == _IDLE
            and self._keep_alive
            and transport is not None
            and not transport.is_closing()
        )

    def begin_relay(self) -> None:
        """The status was 2xx: from now on, payloads go to ``feed``."""
        self._relaying = True
        if self._failure is not None or self._phase != _BODY:
            return
        data, self._buffer = self._buffer, b""
        if self._message_done:
            # An empty body (Content-Length: 0, 204): no [DONE].
            self._message_end()
        elif data:
            self._body(data)
        else:
            self._fast = self._body_mode == _CHUNKED
        lost = self._lost
        if lost is not None and self._phase == _BODY:
            self._lost = None
            self.connection_lost(lost[0])

    def next_events(self) -> asyncio.Future[bytes]:
        """The events that arrived since the last call, or a future done when
        some do; a failure, or ``StopAsyncIteration`` at the end."""
        future: asyncio.Future[bytes] = self._loop.create_future()
        out = self._out
        if out:
            future.set_result(out[0] if len(out) == 1 else b"".join(out))
            out.clear()
            if self._paused and self.transport is not None:
                self._paused = False
                self.transport.resume_reading()
        elif self._failure is not None:
            future.set_exception(self._failure)
            self._consumer_done(failed=True)
        elif self._saw_done:
            future.set_exception(StopAsyncIteration())
            self._consumer_done(failed=False)
        else:
            self._waiter = future
        return future

    def abandon(self) -> None:
        """The reader is gone before the end (the client left, a failure):
        drop the connection, so the upstream sees it closed."""
        self.owner_done = True
        self._waiter = None
        self._push = self._write = None
        pump, self._pump = self._pump, None
        if pump is not None:
            pump.cancel()
        transport = self.transport
        if self._phase != _IDLE and transport is not None:
            self._phase = _CLOSED
            self._fast = False
            transport.close()

    def consumer_done(self, *, failed: bool) -> None:
        self._consumer_done(failed=failed)

    def _consumer_done(self, *, failed: bool) -> None:
        self.owner_done = True
        if failed or not self._keep_alive:
            self.abandon()
            return
        if self._message_done:
            self._idle()
            return
        # [DONE] came before the message's last chunk: wait for it briefly.
        self._drain_timer = self._loop.call_later(_DRAIN_SECONDS, self.abandon)

    def _idle(self) -> None:
        if self._drain_timer is not None:
            self._drain_timer.cancel()
            self._drain_timer = None
        self._phase = _IDLE
        self._fast = False
        self.idle_since = self._time()
        self.reused = True
        if self._on_idle is not None:
            self._on_idle(self)

    # ------------------------------------------------------------ reading

    def data_received(self, data: bytes) -> None:
        self.last = self._time()
        if self._fast:
            # The common read: "<hex size>\r\n" "data: {...}\n\n" "\r\n",
            # one chunk holding one event of one line that is not [DONE]
            # (each check here is counted per chunk: docs/benchmarks.md).
            i = data.find(_CRLF)
            total = len(data)
            if (
                0 < i < 9
                and data.endswith(b"\n\n\r\n")
                and data.startswith(b"data: ", i + 2)
                and data.find(b"\n", i + 8) == total - 4
                and data[i + 8] != _BRACKET
                and not data[:i].translate(None, _HEX)
                and int(data[:i], 16) == total - i - 4
            ):
                payload = data[i + 8 : total - 4]
                try:
                    events = self._feed(payload)  # type: ignore[misc]
                except (msgspec.DecodeError, msgspec.ValidationError) as error:
                    self._unreadable(payload, error)
                    return
                if events:
                    write = self._write
                    if write is not None and write(events):
                        return
                    push = self._push
                    if push is not None:
                        push(events)
                        return
                    waiter = self._waiter
                    if waiter is not None:
                        self._waiter = None
                        waiter.set_result(events)
                    else:
                        self._queue(events)
                return
        phase = self._phase
        if phase == _BODY:
            if not self._relaying and self.status < 300:
                # 2xx, before the reader started on the body: held for it.
                self._buffer += data
                return
            if self._buffer:
                data, self._buffer = self._buffer + data, b""
            self._body(data)
            self._flush()
        elif phase == _HEAD:
            self._received = True
            self._head(self._buffer + data if self._buffer else data)
        elif phase == _IDLE and data:
            # Bytes nobody asked for: the connection cannot be trusted.
            self._keep_alive = False
            if self.transport is not None:
                self.transport.close()

    def _head(self, data: bytes) -> None:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            if len(data) > MAX_HEAD_BYTES:
                self._fail(self._protocol_error("its headers are too large"))
            else:
                self._buffer = data
            return
        self._buffer = b""
        try:
            self._parse_head(data[:end])
        except ProtocolError as error:
            self._fail(self._protocol_error(str(error)))
            return
        rest = data[end + 4 :]
        if 100 <= self.status < 200:
            # An interim answer (103 Early Hints): the real one follows.
            self.headers = {}
            if rest:
                self._head(rest)
            return
        self._phase = _BODY
        if self._body_mode == _LENGTH and self._left == 0:
            self._message_end()
        if 200 <= self.status < 300:
            self._buffer = rest
            self._head_ready()
            return
        # Not 2xx: the body is read whole (an error's text) before the head
        # waiter hears; a redirect's is not needed.
        if 300 <= self.status < 400:
            self._keep_alive = False
            self._head_ready()
            return
        if rest:
            self._body(rest)
        if self._message_done:
            self._head_ready()

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status_line = lines[0]
        parts = status_line.split(b" ", 2)
        if (
            len(parts) < 2
            or not parts[0].startswith(b"HTTP/1.")
            or len(parts[1]) != 3
            or parts[1].translate(None, _DIGITS)
        ):
            raise ProtocolError(f"its status line is not HTTP/1.x: {status_line[:80]!r}")
        self.status = int(parts[1])
        if parts[0] != b"HTTP/1.1":
            self._keep_alive = False
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if not colon or not name or name != name.strip() or b" " in name:
                raise ProtocolError(f"a header line is malformed: {line[:80]!r}")
            key = name.decode("latin-1").lower()
            text = value.strip().decode("latin-1")
            known = headers.get(key)
            headers[key] = text if known is None else f"{known}, {text}"
        self.headers = headers
        if "close" in headers.get("connection", "").lower():
            self._keep_alive = False
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding not in ("identity", ""):
            raise ProtocolError(f"its body is encoded ({encoding}), which was not asked for")
        status = self.status
        if status < 200 or status in (204, 304):
            self._body_mode, self._left = _LENGTH, 0
            return
        transfer = headers.get("transfer-encoding")
        if transfer is not None:
            if transfer.lower() != "chunked":
                raise ProtocolError(f"its transfer coding {transfer!r} is not chunked")
            self._body_mode = _CHUNKED
            if "content-length" in headers:
                # Both framings: chunked wins, the connection is not reused.
                self._keep_alive = False
            return
        length = headers.get("content-length")
        if length is not None:
            if not length or length.strip(_DIGITS.decode()) or len(length) > 18:
                raise ProtocolError(f"its Content-Length {length[:40]!r} is not a number")
            self._body_mode, self._left = _LENGTH, int(length)
            return
        self._body_mode = _UNTIL_CLOSE
        self._keep_alive = False

    def _body(self, data: bytes) -> None:
        """Body bytes as they came: unframed, then relayed or kept."""
        mode = self._body_mode
        if mode == _CHUNKED:
            self._chunked(data)
        elif mode == _LENGTH:
            left = self._left
            if len(data) >= left:
                if len(data) > left:
                    # More than announced: the connection cannot be reused.
                    self._keep_alive = False
                self._left = 0
                self._content(data[:left])
                self._message_end()
            else:
                self._left = left - len(data)
                self._content(data)
        else:
            self._content(data)

    def _chunked(self, data: bytes) -> None:
        """The chunked decoder, for reads the common path does not take (any
        split of the framing, several chunks, extensions, trailers)."""
        at, size = 0, len(data)
        while at < size and self._phase == _BODY and not self._message_done:
            state = self._chunk_state
            if state == _DATA:
                take = min(self._chunk_left, size - at)
                piece = data[at : at + take]
                at += take
                self._chunk_left -= take
                if self._chunk_left == 0:
                    self._chunk_state = _DATA_END
                self._content(piece)
                continue
            line_end = data.find(_CRLF, at)
            if state == _DATA_END:
                if size - at < 2:
                    # Half of the CRLF: wait for the other.
                    if data[at:] != b"\r":
                        return self._bad_chunk("no CRLF after a chunk")
                    self._buffer = data[at:]
                    return None
                if data[at : at + 2] != _CRLF:
                    return self._bad_chunk("no CRLF after a chunk")
                at += 2
                self._chunk_state = _SIZE
                continue
            if line_end < 0:
                if size - at > _MAX_SIZE_LINE:
                    return self._bad_chunk("a chunk-size line is too long")
                self._buffer = data[at:]
                return None
            line = data[at:line_end]
            at = line_end + 2
            if state == _TRAILER:
                if not line:
                    self._message_end()
                    break
                continue
            digits = line.split(b";", 1)[0].strip(b" \t")
            if not digits or digits.translate(None, _HEX) or len(digits) > 15:
                return self._bad_chunk(f"a chunk size is malformed: {line[:40]!r}")
            self._chunk_left = int(digits, 16)
            self._chunk_state = _DATA if self._chunk_left else _TRAILER
        if at < size and self._message_done:
            # Bytes after the message: not a connection to reuse.
            self._keep_alive = False
        if (
            self._relaying
            and self._phase == _BODY
            and self._chunk_state == _SIZE
            and not self._buffer
            and not self._pending
        ):
            self._fast = True
        else:
            self._fast = False
        return None

    def _bad_chunk(self, problem: str) -> None:
        self._fail(self._protocol_error(problem))

    def _content(self, data: bytes) -> None:
        """Unframed body bytes: SSE lines to the relay (their events queued
        for one send per read), or an error's body."""
        if not data or self._saw_done or self._failure is not None:
            return
        if not self._relaying:
            kept = self._error_body
            if len(kept) < MAX_ERROR_BODY:
                kept += data[: MAX_ERROR_BODY - len(kept)]
            return
        feed = self._feed
        assert feed is not None
        pending = self._pending
        payload = b""
        try:
            if (
                not pending
                and data.endswith(b"\n\n")
                and data.startswith(b"data: ")
                and data.find(b"\n") == len(data) - 2
                and data[6] != _BRACKET
            ):
                # One event of one line, not [DONE] (a chunk of a read that
                # brought several).
                payload = data[6:-2]
                events = feed(payload)
                if events:
                    self._queue(events)
                return
            lines = (pending + data).split(b"\n") if pending else data.split(b"\n")
            self._pending = lines.pop()
            for line in lines:
                if line.startswith(b"data:"):
                    payload = line[5:].strip()
                    if payload == b"[DONE]":
                        self._done()
                        return
                    events = feed(payload)
                    if events:
                        self._queue(events)
                elif self._comments is not None and line.startswith(b":"):
                    self._comments(line[1:].strip())
        except (msgspec.DecodeError, msgspec.ValidationError) as error:
            self._unreadable(payload, error)

    def _done(self) -> None:
        """``[DONE]``: what the relay still owes, then the end."""
        assert self._finish is not None
        events = self._finish()
        self._saw_done = True
        self._pending = b""
        if events:
            self._queue(events)
        self._wake_end()

    def _queue(self, events: bytes) -> None:
        """Events for the reader, sent at the end of the read (_flush)."""
        out = self._out
        out.append(events)
        if len(out) > _PAUSE_EVENTS and not self._paused and self.transport is not None:
            # A slow client: stop reading the upstream until it catches up.
            self._paused = True
            self.transport.pause_reading()

    def _flush(self) -> None:
        """A waiting reader (or the pump) gets what this read brought, in
        one piece."""
        out = self._out
        if not out:
            return
        push = self._push
        if push is not None:
            events = out[0] if len(out) == 1 else b"".join(out)
            out.clear()
            push(events)
            return
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            waiter.set_result(out[0] if len(out) == 1 else b"".join(out))
            out.clear()

    def has_events(self) -> bool:
        return bool(self._out)

    def stop_pushing(self) -> None:
        """A send is blocked: queue the events and read no more meanwhile."""
        self._push = self._write = None
        if self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def resume_pushing(self) -> None:
        if self._paused and self.transport is not None and self._phase != _CLOSED:
            self._paused = False
            self.transport.resume_reading()
        self.pump_unblocked()

    def take_events(self) -> bytes:
        """What is queued for the reader (the pump, after a blocked send)."""
        out = self._out
        events = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return events

    def pump(self, send: Send, writer: ChunkWriter | None = None) -> asyncio.Future[bytes]:
        """Send each read's events to the client from :meth:`data_received`
        itself (no task wake-up per chunk; see :class:`Pump`). The future:
        the events still owed at the end (to go with the response's last
        message), or the failure."""
        pump = self._pump = Pump(self, send, self._loop, writer)
        self._waiter = None
        if self._out:
            pump.push(self.take_events())
        if self._failure is not None or self._saw_done:
            pump.end(self._failure)
        elif not pump.blocked:
            self._push, self._write = pump.push, pump.write
        return pump.done

    def pump_unblocked(self) -> None:
        """The pump's blocked send is done: events go out directly again."""
        pump = self._pump
        if pump is None:
            return
        if self._failure is not None or self._saw_done:
            pump.end(self._failure)
            return
        self._push, self._write = pump.push, pump.write

    def _wake_end(self) -> None:
        """The stream ended (well or not): a waiting reader hears it now
        (after the events before the end)."""
        pump = self._pump
        if pump is not None:
            self._push = self._write = None
            if not pump.blocked:
                pump.end(self._failure)
            return
        self._flush()
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if self._failure is not None:
                waiter.set_exception(self._failure)
                self._consumer_done(failed=True)
            else:
                waiter.set_exception(StopAsyncIteration())
                self._consumer_done(failed=False)

    def _message_end(self) -> None:
        """The upstream's message is complete."""
        self._message_done = True
        self._fast = False
        if self._relaying:
            if not self._saw_done and self._failure is None:
                pending, self._pending = self._pending, b""
                if pending.startswith(b"data:"):
                    # The last line may end the stream without a newline.
                    payload = pending[5:].strip()
                    if payload == b"[DONE]":
                        self._done()
                    else:
                        try:
                            events = self._feed(payload) if self._feed is not None else b""
                        except (msgspec.DecodeError, msgspec.ValidationError) as error:
                            self._unreadable(payload, error)
                            return
                        if events:
                            self._queue(events)
                if not self._saw_done:
                    self._ended_without_done()
                    return
            if self.owner_done and self._phase == _BODY:
                if self._keep_alive:
                    self._idle()
                else:
                    self.abandon()
        elif self._head_waiter is not None:
            self._head_ready()

    def _ended_without_done(self) -> None:
        self._keep_alive = False
        self._fail(UpstreamError(f"backend {self._name} ended the stream without [DONE]"))

    def _head_ready(self) -> None:
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    # ------------------------------------------------------------ failing

    def _unreadable(self, payload: bytes, error: Exception) -> None:
        from gateway.backends.upstream_errors import unreadable_answer

        self._fail(unreadable_answer(self._name, payload, error))

    def _protocol_error(self, problem: str) -> UpstreamError:
        self._keep_alive = False
        return UpstreamError(f"backend {self._name} answered with malformed HTTP ({problem})")

    def _cut(self, kind: str) -> UpstreamError:
        return UpstreamError(f"backend {self._name} is unreachable or timed out ({kind})")

    def fail(self, error: BaseException) -> None:
        """From outside (the idle watch): end the request with ``error``."""
        self._fail(error)

    def _fail(self, error: BaseException) -> None:
        if self._failure is not None or self._saw_done:
            return
        self._failure = error
        self._keep_alive = False
        self._fast = False
        waiter, self._head_waiter = self._head_waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
            # Retrieved by whoever awaits it; never logged as unretrieved.
            waiter.exception()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            self._phase = _CLOSED
            transport.close()
        self._wake_end()

    @property
    def error_body(self) -> bytes:
        return bytes(self._error_body)
