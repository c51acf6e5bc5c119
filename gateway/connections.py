"""HTTP connections: what a client may hold before a request reaches the app.

uvicorn's own HTTP/1.1 protocol (httptools) bounds none of this: a request's
line and headers may be any size and any number and take forever to arrive,
and a connection that sends nothing stays open for good. Its
``limit_concurrency`` would not do either: it counts idle connections too, so
a few thousand of them would make every request, ``/health`` included, a 503.

:class:`GuardedProtocol` is uvicorn's protocol with nginx's and Envoy's
limits added:

- at most ``max_connections`` open (before file descriptors run out): a new
  connection past it takes the place of the connection idle longest (no
  request in progress: kept alive, or still sending its headers), which is
  closed, if that one has been idle for ``EVICTABLE_AFTER_SECONDS``;
  otherwise (every connection busy, or all just opened: a burst) the new one
  is answered 503 with ``Retry-After`` and closed. So idle connections,
  however many, cannot lock out a client for long;
- a request's line and headers within ``max_header_bytes`` (431), at most
  ``max_header_count`` header lines (431), a URL within ``max_url_bytes``
  (414), all counted as the bytes arrive, before the parser buffers them;
- the line and headers complete within ``header_timeout_seconds`` of the
  connection (or of the request's first byte on a kept-alive connection):
  408 and closed, so slow-header clients (slowloris) cannot hold
  connections; a connection that sends nothing is closed then too;
- a body that stops arriving for ``body_timeout_seconds`` (while the app is
  ready for more): 408 and closed.

Timeouts are checked by one task per server, every fraction of a second,
not by a timer per connection. Refusals are OpenAI-shaped JSON errors, sent
with a lingering close (as nginx does): the write side is shut, what the
client still sends is read and dropped for a few seconds, so the refusal is
not lost to a reset from a request the server never read.
"""

from __future__ import annotations

import asyncio
import http
import logging
import resource
import socket
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from gateway import wire
from gateway.chunk_write import CHUNK_WRITE
from gateway.errors import ErrorBody, ErrorDetail
from gateway.hang_up import HANG_UP, HangUpWatch
from gateway.settings import LimitSettings

_log = logging.getLogger(__name__)
# File descriptors kept for everything but client connections: upstream
# pools, the decision log, adapter files, the model, uvicorn's own.
RESERVED_FILES = 512
_REPORT_EVERY_SECONDS = 10.0
# An idle connection younger than this is not closed to make room: in a
# burst, the connections just opened are about to send their requests.
EVICTABLE_AFTER_SECONDS = 1.0
# A refused connection stays open this long at most, reading and dropping.
LINGER_SECONDS = 5.0
# Refused connections lingering at once; past it, they are closed at once
# (they take file descriptors from the reserve).
MAX_LINGERING = RESERVED_FILES // 2


@dataclass(frozen=True, slots=True)
class HttpLimits:
    max_connections: int
    max_header_count: int
    max_header_bytes: int
    max_url_bytes: int
    header_timeout: float
    body_timeout: float
    send_buffer_bytes: int = 0

    @classmethod
    def from_settings(cls, limits: LimitSettings, max_connections: int) -> HttpLimits:
        return cls(
            max_connections=max_connections,
            max_header_count=limits.max_header_count,
            max_header_bytes=limits.max_header_bytes,
            max_url_bytes=limits.max_url_bytes,
            header_timeout=limits.header_timeout_seconds,
            body_timeout=limits.body_timeout_seconds,
            send_buffer_bytes=limits.socket_send_buffer_bytes,
        )

    @property
    def sweep_interval(self) -> float:
        return max(0.01, min(1.0, self.header_timeout / 4, self.body_timeout / 4))


def error_response(
    status: int, message: str, code: str, *, retry_after: int | None = None
) -> bytes:
    """A whole HTTP/1.1 response carrying an OpenAI-shaped error; the
    connection closes after it."""
    kind = "server_error" if status >= 500 else "invalid_request_error"
    body = wire.encoder.encode(ErrorBody(ErrorDetail(message, kind, None, code)))
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if retry_after is not None:
        lines.append(f"retry-after: {retry_after}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class _RefusedError(Exception):
    """Raised in a parser callback to stop parsing a refused request."""


class ConnectionGuard:
    """What the connections of one server share: the count, the refusals,
    and the task that enforces the timeouts."""

    def __init__(self, limits: HttpLimits) -> None:
        self.limits = limits
        self.refused: Counter[str] = Counter()
        self._connections: set[GuardedProtocol] = set()
        # Connections with no request in progress (since when), the longest
        # idle first.
        self._idle: dict[GuardedProtocol, float] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._reported: Counter[str] = Counter()
        self.lingering = 0

    def join(self, connection: GuardedProtocol) -> bool:
        """Count a new (idle) connection, closing the longest idle one if
        there are too many; False if every one has a request in progress."""
        if self._sweeper is None:
            loop = asyncio.get_running_loop()
            self._sweeper = loop.create_task(self._sweep_forever(), name="connection-guard")
        now = time.monotonic()
        if len(self._connections) >= self.limits.max_connections:
            oldest, since = next(iter(self._idle.items()), (None, now))
            if oldest is None or now - since < EVICTABLE_AFTER_SECONDS:
                self.refused["connections over max_connections"] += 1
                return False
            self.refused["idle connections closed for new ones"] += 1
            self.leave(oldest)
            oldest.close_idle()
        self._connections.add(connection)
        self._idle[connection] = now
        return True

    def leave(self, connection: GuardedProtocol) -> None:
        self._connections.discard(connection)
        self._idle.pop(connection, None)

    def busy(self, connection: GuardedProtocol) -> None:
        """``connection`` has a request in progress."""
        self._idle.pop(connection, None)

    def idle(self, connection: GuardedProtocol) -> None:
        """``connection`` has no request in progress (any more)."""
        if connection in self._connections:
            self._idle.pop(connection, None)
            self._idle[connection] = time.monotonic()

    async def _sweep_forever(self) -> None:
        last_report = time.monotonic()
        while True:
            await asyncio.sleep(self.limits.sweep_interval)
            now = time.monotonic()
            for connection in list(self._connections):
                try:
                    connection.check_timeouts(now)
                except Exception:  # one broken connection must not end the sweeps
                    _log.exception("checking a connection's timeouts failed")
                    connection.close_idle()
            if now - last_report >= _REPORT_EVERY_SECONDS:
                last_report = now
                self._report()

    def _report(self) -> None:
        new = self.refused - self._reported
        if new:
            self._reported = Counter(self.refused)
            summary = ", ".join(f"{count} {reason}" for reason, count in sorted(new.items()))
            _log.warning("refused HTTP clients in the last %gs: %s", _REPORT_EVERY_SECONDS, summary)


_TOO_MANY_CONNECTIONS = error_response(
    503,
    "The gateway has too many open connections; retry later.",
    "server_overloaded",
    retry_after=1,
)
_HEADER_TIMEOUT = error_response(
    408, "The request's headers did not arrive in time.", "request_timeout"
)
_BODY_TIMEOUT = error_response(408, "The request's body stopped arriving.", "request_timeout")


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's HTTP/1.1 protocol with the limits above; bind a guard with
    :func:`protocol_class`. Each request's scope also carries what the
    protocol knows for it: its hang-up watch (:mod:`gateway.hang_up`) and a
    chunk writer for its response (:mod:`gateway.chunk_write`)."""

    guard: ClassVar[ConnectionGuard]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        now = time.monotonic()
        # The request line and headers are arriving (from the connection's
        # start, or a kept-alive connection's next first byte).
        self._in_head = True
        self._head_started = now
        self._head_bytes = 0
        self._header_count = 0
        self._header_size = 0
        self._in_body = False
        self._body_seen = now
        self._refusal: bytes | None = None
        self._lingering = False
        # The hang-up watches of the requests whose responses are not
        # complete, oldest first (more than one only when pipelined).
        self._watches: list[HangUpWatch] = []
        # Their chunk writers, in the same order (released with them: each
        # holds its cycle, whose scope holds the writer).
        self._writers: list[_CycleChunkWriter] = []

    # -------------------------------------------------------- connection

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if not self.guard.join(self):
            self._refuse(_TOO_MANY_CONNECTIONS)
            return
        size = self.guard.limits.send_buffer_bytes
        sock = transport.get_extra_info("socket")
        if size and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)

    def connection_lost(self, exc: Exception | None) -> None:
        self.guard.leave(self)
        watches, self._watches = self._watches, []
        for watch in watches:
            watch.lost()
        writers, self._writers = self._writers, []
        for writer in writers:
            writer.release()
        if self._lingering:
            self._lingering = False
            self.guard.lingering -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._lingering or self.transport.is_closing():
            return
        if self._in_head:
            self._head_bytes += len(data)
        super().data_received(data)
        # Still in the headers after this read: the parser holds them all.
        limit = self.guard.limits.max_header_bytes
        if self._in_head and self._head_bytes > limit and not self.transport.is_closing():
            self.guard.refused["oversized requests"] += 1
            message = f"The request's headers exceed {limit} bytes."
            self._refuse(error_response(431, message, "request_too_large"))

    def check_timeouts(self, now: float) -> None:
        """Called by the guard's sweeper."""
        limits = self.guard.limits
        if self._lingering or self.transport.is_closing():
            return
        if self._in_head and now - self._head_started > limits.header_timeout:
            self.guard.refused["header timeouts"] += 1
            # Nothing sent at all: nobody to answer.
            self._refuse(_HEADER_TIMEOUT if self._head_bytes else b"")
        elif (
            self._in_body
            and not self.flow.read_paused
            and now - self._body_seen > limits.body_timeout
        ):
            self.guard.refused["body timeouts"] += 1
            started = self.cycle is not None and self.cycle.response_started
            self._refuse(b"" if started else _BODY_TIMEOUT)

    def _refuse(self, response: bytes) -> None:
        """Send ``response`` (if any) and close, lingering if needed."""
        if self._lingering or self.transport.is_closing():
            return
        self.guard.leave(self)
        if not response:
            self.transport.close()
            return
        self.transport.write(response)
        if self.guard.lingering >= MAX_LINGERING or not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self._lingering = True
        self.guard.lingering += 1
        self.loop.call_later(LINGER_SECONDS, self.transport.close)

    def close_idle(self) -> None:
        """Make room for a new connection: this one has no request in progress."""
        if not self.transport.is_closing():
            self.transport.close()

    # ---------------------------------------------------- parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if not self._in_head:
            self._in_head = True
            self._head_started = time.monotonic()
            self._head_bytes = 0
        self._header_count = 0
        self._header_size = 0

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        limit = self.guard.limits.max_url_bytes
        if len(self.url) > limit:
            self._too_large(414, f"The request's URL exceeds {limit} bytes.")

    def on_header(self, name: bytes, value: bytes) -> None:
        # uvicorn's on_header, inline (once a header of every request).
        name = name.lower()
        if name == b"expect" and value.lower() == b"100-continue":
            self.expect_100_continue = True
        self.headers.append((name, value))
        limits = self.guard.limits
        self._header_count += 1
        self._header_size += len(name) + len(value) + 4
        if self._header_count > limits.max_header_count:
            self._too_large(431, f"The request has more than {limits.max_header_count} headers.")
        if self._header_size > limits.max_header_bytes:
            self._too_large(431, f"The request's headers exceed {limits.max_header_bytes} bytes.")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._in_body = True
        self._body_seen = time.monotonic()
        self.guard.busy(self)
        # The request hears of a lost connection from here (gateway.hang_up).
        watch = HangUpWatch()
        self._watches.append(watch)
        extensions: dict[str, dict[object, object]] = {HANG_UP: {HANG_UP: watch}}
        scope = self.scope
        scope["extensions"] = extensions
        super().on_headers_complete()
        cycle = self.cycle
        # (No new cycle for an upgrade: nothing to write to.)
        if cycle is not None and cycle.scope is scope:
            writer = _CycleChunkWriter(cycle)
            self._writers.append(writer)
            extensions[CHUNK_WRITE] = {CHUNK_WRITE: writer}

    def on_body(self, body: bytes) -> None:
        self._body_seen = time.monotonic()
        super().on_body(body)

    def on_message_complete(self) -> None:
        self._in_body = False
        super().on_message_complete()
        # The whole body is in: read on, so a client that leaves is heard
        # (uvicorn pauses reading past 64 KiB of body and resumes only in
        # receive(), which no task awaits any more: gateway.hang_up). What
        # can come now is a close or a pipelined request, which uvicorn
        # queues and pauses for.
        if self.flow is not None:
            self.flow.resume_reading()

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # then the next request starts now
        if self._watches:
            del self._watches[0]
        if self._writers:
            self._writers.pop(0).release()
        super().on_response_complete()
        if not pipelined:
            self.guard.idle(self)

    def _too_large(self, status: int, message: str) -> None:
        """Refuse the request being parsed: raising stops the parser, and
        uvicorn answers through :meth:`send_400_response`."""
        self.guard.refused["oversized requests"] += 1
        self._refusal = error_response(status, message, "request_too_large")
        raise _RefusedError(message)

    def send_400_response(self, msg: str) -> None:
        if self._refusal is None:
            super().send_400_response(msg)
            return
        self._refuse(self._refusal)


# Headers whose handling uvicorn's send decides (the body's framing, the
# connection's reuse): a response with one is started by send.
_FRAMING_HEADERS = frozenset((b"content-length", b"transfer-encoding", b"connection"))


class _CycleChunkWriter:
    """A request's :class:`gateway.chunk_write.ChunkWriter`: one chunk of
    its response framed and written as uvicorn's ``send`` would, with none of
    the message's handling around it. It declines whenever ``send`` has more
    to do than that: the client's socket is full (``send`` waits for it to
    drain), the response has not started, is complete or not chunked, the
    client has gone (``send`` writes nothing)."""

    __slots__ = ("_cycle",)

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle: RequestResponseCycle | None = cycle

    def release(self) -> None:
        """The response is complete or the connection gone: let the cycle go."""
        self._cycle = None

    def start(self, status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> bool:
        """The status line, ``headers`` and the first chunk in one write, as
        uvicorn's two sends would write them (its checks of each header
        kept). Declines, having changed nothing, for anything its send
        does otherwise: a started response, a full socket, a HEAD, an
        access log, a header that sets the framing or the connection, or a
        malformed one (send then raises as it would)."""
        cycle = self._cycle
        if (
            cycle is None
            or cycle.response_started
            or cycle.flow.write_paused
            or cycle.access_log
            or cycle.scope["method"] == "HEAD"
            or status in (204, 304)
        ):
            return False
        content = [STATUS_LINE[status]]
        for name, value in (*cycle.default_headers, *headers):
            if HEADER_RE.search(name) or HEADER_VALUE_RE.search(value):
                return False
            name = name.lower()
            if name in _FRAMING_HEADERS:
                return False
            content += (name, b": ", value, b"\r\n")
        if not cycle.keep_alive:
            content.append(b"connection: close\r\n")
        content.append(b"transfer-encoding: chunked\r\n\r\n")
        if body:
            content.append(b"%x\r\n%b\r\n" % (len(body), body))
        cycle.response_started = True
        cycle.waiting_for_100_continue = False
        cycle.chunked_encoding = True
        cycle.transport.write(b"".join(content))
        return True

    def write(self, body: bytes) -> bool:
        cycle = self._cycle
        if cycle is None:
            # Complete, or the client gone (released in connection_lost,
            # before uvicorn marks the cycle disconnected): send knows.
            return False
        if cycle.flow.write_paused or not cycle.chunked_encoding or cycle.response_complete:
            return False
        if body:  # (an empty chunk would end the body)
            cycle.transport.write(b"%x\r\n%b\r\n" % (len(body), body))
        return True


def protocol_class(guard: ConnectionGuard) -> type[GuardedProtocol]:
    """The protocol uvicorn should build for each connection (``http=``)."""

    class BoundGuardedProtocol(GuardedProtocol):
        pass

    BoundGuardedProtocol.guard = guard
    return BoundGuardedProtocol


def fit_file_limit(max_connections: int) -> int:
    """Raise this process's soft limit on open files as far as needed (up to
    the hard limit); the connections that then fit beside the reserved files."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + RESERVED_FILES
    if soft != resource.RLIM_INFINITY and soft < wanted:
        raised = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        if raised > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            _log.info("raised the open-files limit from %d to %d", soft, raised)
            soft = raised
    if soft == resource.RLIM_INFINITY:
        return max_connections
    fitting = max(soft - RESERVED_FILES, soft // 2, 1)
    if fitting < max_connections:
        _log.warning(
            "limits.max_connections is %d, but the open-files limit (%d, hard %d) leaves room "
            "for %d: using %d",
            max_connections,
            soft,
            hard,
            fitting,
            fitting,
        )
    return min(max_connections, fitting)
