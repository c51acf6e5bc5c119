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
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Mapping
from typing import Any, Final, cast

import msgspec
from litestar.types import Send

from gateway.backends.upstream_errors import status_error
from gateway.errors import GatewayError, UpstreamError

Feed = Callable[[bytes], bytes]
Finish = Callable[[], bytes]
Comments = Callable[[bytes], None]

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
# An idle kept-alive connection older than this is closed, not reused
# (aiohttp's keepalive_timeout; uvicorn closes its side after 5 s).
KEEPALIVE_SECONDS: Final = 15.0
# After [DONE], how long the rest of the upstream's message (its last
# chunk) may take before the connection is dropped instead of reused.
_DRAIN_SECONDS: Final = 5.0
# Resolved host names are kept this long (aiohttp's default DNS cache).
_DNS_SECONDS: Final = 10.0

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
        self._pump: _Pump | None = None
        self._push: Callable[[bytes], None] | None = None
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
        self._push = None
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
        self._push = None
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

    def pump(self, send: Send) -> asyncio.Future[bytes]:
        """Send each read's events to the client from :meth:`data_received`
        itself (no task wake-up per chunk; see :class:`_Pump`). The future:
        the events still owed at the end (to go with the response's last
        message), or the failure."""
        pump = self._pump = _Pump(self, send, self._loop)
        self._waiter = None
        if self._out:
            pump.push(self.take_events())
        if self._failure is not None or self._saw_done:
            pump.end(self._failure)
        elif not pump.blocked:
            self._push = pump.push
        return pump.done

    def pump_unblocked(self) -> None:
        """The pump's blocked send is done: events go out directly again."""
        pump = self._pump
        if pump is None:
            return
        if self._failure is not None or self._saw_done:
            pump.end(self._failure)
            return
        self._push = pump.push

    def _wake_end(self) -> None:
        """The stream ended (well or not): a waiting reader hears it now
        (after the events before the end)."""
        pump = self._pump
        if pump is not None:
            self._push = None
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


class _Pump:
    """The relay's events sent to the client from the upstream connection's
    ``data_received``: the ASGI ``send`` coroutine is run there and, as
    uvicorn's ``send`` of a body does unless the client's socket is full,
    finishes without suspending. When it does suspend (flow control), the
    upstream is not read, a task finishes that send and the events queued
    meanwhile, and reading resumes. The end (the events still owed, or the
    failure) is told through :attr:`done`, after any send in progress."""

    __slots__ = ("_connection", "_drain", "_ended", "_loop", "_send", "blocked", "done")

    def __init__(
        self, connection: StreamConnection, send: Send, loop: asyncio.AbstractEventLoop
    ) -> None:
        self._connection = connection
        self._send = send
        self._loop = loop
        self.done: asyncio.Future[bytes] = loop.create_future()
        self.blocked = False
        self._drain: asyncio.Task[None] | None = None
        self._ended: tuple[BaseException | None] | None = None

    def push(self, events: bytes) -> None:
        sending = cast(
            Coroutine[Any, Any, None],
            self._send({"type": "http.response.body", "body": events, "more_body": True}),
        )
        try:
            awaited = sending.send(None)
        except StopIteration:
            return
        except BaseException as error:
            self._failed(error)
            return
        # The client's socket is full: finish this send in a task.
        self.blocked = True
        connection = self._connection
        connection.stop_pushing()
        self._drain = self._loop.create_task(self._drained(sending, awaited))

    async def _drained(self, sending: Coroutine[Any, Any, None], awaited: object) -> None:
        connection = self._connection
        try:
            await _resumed(sending, awaited)
            while connection.has_events():
                await self._send(
                    {
                        "type": "http.response.body",
                        "body": connection.take_events(),
                        "more_body": True,
                    }
                )
        except asyncio.CancelledError:
            return
        except BaseException as error:
            self._failed(error)
            return
        self.blocked = False
        connection.resume_pushing()
        if self._ended is not None:
            self.end(self._ended[0])

    def end(self, failure: BaseException | None) -> None:
        """The upstream's stream ended: tell the response (after a blocked send)."""
        if self.blocked:
            self._ended = (failure,)
            return
        if self.done.done():
            return
        connection = self._connection
        if failure is not None:
            self.done.set_exception(failure)
            connection.consumer_done(failed=True)
        else:
            self.done.set_result(connection.take_events() if connection.has_events() else b"")
            connection.consumer_done(failed=False)

    def _failed(self, error: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(error)
        self._connection.abandon()

    def cancel(self) -> None:
        drain, self._drain = self._drain, None
        if drain is not None:
            drain.cancel()


@types.coroutine
def _resumed(sending: Coroutine[Any, Any, None], awaited: object) -> Generator[Any, Any, None]:
    """Finish a coroutine that was run by hand and suspended on ``awaited``
    (a future): the task waits on it, then the coroutine goes on."""
    yield awaited
    yield from sending


class _IdleWatch:
    """Fails the connection once nothing arrived for ``seconds`` (its
    ``last`` is set on each read): one timer per period, re-armed only when
    it fires early, instead of one per read."""

    __slots__ = ("_connection", "_handle", "_loop", "_name", "_seconds")

    def __init__(self, connection: StreamConnection, seconds: float, name: str) -> None:
        self._loop = asyncio.get_running_loop()
        self._connection = connection
        self._seconds = seconds
        self._name = name
        self._handle = self._loop.call_at(connection.last + seconds, self._check)

    def _check(self) -> None:
        due = self._connection.last + self._seconds
        if self._loop.time() < due:
            self._handle = self._loop.call_at(due, self._check)
            return
        self._connection.fail(
            UpstreamError(
                f"backend {self._name} is unreachable or timed out "
                f"(nothing for {self._seconds:g} s)"
            )
        )

    def cancel(self) -> None:
        self._handle.cancel()


class StreamPool:
    """The kept-alive connections to one upstream (host and port), reused
    last-in first-out; how many are in use at once is bounded by the
    caller (:class:`~gateway.backends.upstream.Upstream`'s slots)."""

    def __init__(self, name: str, host: str, port: int, connect_timeout: float) -> None:
        self.name = name
        self._host = host
        self._port = port
        self._connect_timeout = connect_timeout
        self._idle: list[StreamConnection] = []
        self._address: tuple[str, float] | None = None
        self._closed = False

    async def connection(self) -> StreamConnection:
        """An idle kept-alive connection, or a new one."""
        if self._closed:
            raise UpstreamError(f"backend {self.name} is shut down")
        idle = self._idle
        while idle:
            connection = idle.pop()
            if not connection.usable:
                continue
            if connection.idle_for() > KEEPALIVE_SECONDS:
                if connection.transport is not None:
                    connection.transport.close()
                continue
            return connection
        return await self.connect()

    async def connect(self) -> StreamConnection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._connect_timeout):
                host = await self._resolved(loop)
                _, connection = await loop.create_connection(
                    lambda: StreamConnection(self.name, loop), host, self._port
                )
        except (OSError, TimeoutError) as error:
            raise UpstreamError(
                f"backend {self.name} is unreachable or timed out ({type(error).__name__})"
            ) from error
        return connection

    async def _resolved(self, loop: asyncio.AbstractEventLoop) -> str:
        """The host's address, resolved at most every ``_DNS_SECONDS`` (an IP
        address is used as it is)."""
        known = self._address
        now = time.monotonic()
        if known is not None and now < known[1]:
            return known[0]
        try:
            socket.inet_pton(socket.AF_INET6 if ":" in self._host else socket.AF_INET, self._host)
        except OSError:
            infos = await loop.getaddrinfo(
                self._host, self._port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
            )
            if not infos:
                raise OSError(f"{self._host} has no address") from None
            address = str(infos[0][4][0])
            self._address = (address, now + _DNS_SECONDS)
            return address
        self._address = (self._host, float("inf"))
        return self._host

    def idle(self, connection: StreamConnection) -> None:
        """A connection done with its request: kept if it can be reused."""
        if self._closed or not connection.usable:
            return
        self._idle.append(connection)

    def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for connection in idle:
            if connection.transport is not None:
                connection.transport.close()


class RequestHead:
    """The fixed part of an upstream's streamed requests, made once per path:
    the request line, Host, and the client's own headers (content type, key)."""

    def __init__(self, base_path: str, host: str, headers: Mapping[str, str]) -> None:
        self._base_path = base_path
        self._fixed = "".join(f"{name}: {value}\r\n" for name, value in _checked(headers).items())
        self._host = host
        self._heads: dict[str, bytes] = {}

    def request(self, path: str, headers: Mapping[str, str] | None, body: bytes) -> bytes:
        """A POST of ``body`` to ``path`` (below the base URL), in one buffer."""
        head = self._heads.get(path)
        if head is None:
            head = self._heads[path] = (
                f"POST {self._base_path}{path} HTTP/1.1\r\nHost: {self._host}\r\n{self._fixed}"
            ).encode("latin-1")
        extra = (
            "".join(f"{name}: {value}\r\n" for name, value in _checked(headers).items())
            if headers
            else ""
        )
        return b"".join(
            (head, f"{extra}Content-Length: {len(body)}\r\n\r\n".encode("latin-1"), body)
        )


def _checked(headers: Mapping[str, str]) -> Mapping[str, str]:
    """Headers that cannot split the request (no CR, LF or colon in a name)."""
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name or ":" in name:
            raise ValueError(f"header {name!r} cannot be sent")
    return headers


OpenSlot = Callable[[], Awaitable[None]]


class RelayStream:
    """A client's relayed stream on the gateway's own client: an async
    iterator of the client's events (as
    :meth:`gateway.backends.upstream.Upstream.relay` yields them). The first
    ``__anext__`` opens it: a slot, a connection, the request, the status;
    each later one is the connection's next events (a future, no coroutine
    per chunk)."""

    __slots__ = (
        "_body",
        "_closed",
        "_comments",
        "_connection",
        "_feed",
        "_finish",
        "_first_token",
        "_on_closed",
        "_open_slot",
        "_pool",
        "_release_slot",
        "_request",
        "_slot_held",
        "_watch",
        "name",
    )

    def __init__(
        self,
        name: str,
        pool: StreamPool,
        request: bytes,
        first_token: float,
        open_slot: OpenSlot,
        release_slot: Callable[[], None],
        feed: Feed,
        finish: Finish,
        comments: Comments | None,
        closed: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._on_closed = closed
        self._pool = pool
        self._request = request
        self._first_token = first_token
        self._open_slot = open_slot
        self._release_slot = release_slot
        self._feed, self._finish, self._comments = feed, finish, comments
        self._connection: StreamConnection | None = None
        self._slot_held = False
        self._closed = False
        self._watch: _IdleWatch | None = None

    def __aiter__(self) -> RelayStream:
        return self

    def pump(self, send: Send) -> asyncio.Future[bytes] | None:
        """Once open: the events sent to ``send`` as they come (see
        :meth:`StreamConnection.pump`); None if the stream is over already."""
        connection = self._connection
        if connection is None or not inspect.iscoroutinefunction(send):
            # (Run by hand, send must be a coroutine function: uvicorn's is.)
            return None
        return connection.pump(send)

    def __anext__(self) -> Awaitable[bytes]:
        connection = self._connection
        if connection is None:
            return self._open()
        return connection.next_events()

    async def _open(self) -> bytes:
        if self._closed:
            raise StopAsyncIteration
        await self._open_slot()
        self._slot_held = True
        try:
            connection = await self._answered()
            connection.begin_relay()
            return await connection.next_events()
        except BaseException:
            await self.aclose()
            raise

    async def _answered(self) -> StreamConnection:
        """A connection whose 2xx status and headers are in; any other
        status as the gateway's error. From the request on, the idle watch
        bounds the wait for the answer's first byte and then each gap
        (``first_token_timeout``; one timer for both, no asyncio.timeout)."""
        for attempt in range(2):
            connection = await (self._pool.connection() if attempt == 0 else self._pool.connect())
            self._connection = connection
            head = connection.start(
                self._request, self._feed, self._finish, self._comments, self._ended
            )
            watch = self._watch = _IdleWatch(connection, self._first_token, self.name)
            try:
                await head
            except StaleConnectionError:
                # Dropped by the upstream while idle: once more, on a new one.
                watch.cancel()
                self._watch = self._connection = None
                continue
            status = connection.status
            if 200 <= status < 300:
                return connection
            if 300 <= status < 400:
                raise redirect_error(self.name, status, connection.headers)
            raise status_error(
                self.name, status, connection.error_body, connection.headers, reveal=False
            )
        raise UpstreamError(f"backend {self.name} is unreachable or timed out (closed)")

    def _ended(self, connection: StreamConnection) -> None:
        """The connection is idle again, or lost: the pool takes it back (and
        the slot is free once the reader has heard the end)."""
        if self._connection is connection and connection.owner_done:
            self._finished()
        self._pool.idle(connection)

    def _finished(self) -> None:
        self._connection = None
        self._closed = True
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        if self._slot_held:
            self._slot_held = False
            self._release_slot()
        closed, self._on_closed = self._on_closed, None
        if closed is not None:
            closed()

    async def aclose(self) -> None:
        """Done reading, early or not: an unfinished request's connection is
        dropped (the upstream sees the close)."""
        connection = self._connection
        if connection is not None and not connection.owner_done:
            connection.abandon()
        self._finished()


def redirect_error(name: str, status: int, headers: Mapping[str, str]) -> GatewayError:
    """A 3xx: never followed (see :mod:`gateway.backends.upstream`)."""
    import logging

    logging.getLogger("gateway.upstream").warning(
        "backend %s answered %d (redirect to %r): not followed; fix its base_url",
        name,
        status,
        headers.get("location", ""),
    )
    return UpstreamError(f"backend {name} answered with a redirect ({status})")
