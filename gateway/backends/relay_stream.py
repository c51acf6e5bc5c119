"""A client's relayed stream on the gateway's own stream client: a slot, a
connection from the pool, the request, the status, then the connection's
events (see :mod:`gateway.backends.stream_client`); the idle watch that
bounds each wait by ``first_token_timeout``."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Mapping

from litestar.types import Send

from gateway.backends.stream_client import (
    RelayHandlers,
    StaleConnectionError,
    StreamConnection,
)
from gateway.backends.stream_pool import StreamPool
from gateway.backends.upstream_errors import status_error
from gateway.chunk_write import ChunkWriter
from gateway.errors import GatewayError, UpstreamError


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
        handlers: RelayHandlers,
    ) -> None:
        self.name = name
        feed, finish, comments, closed = handlers
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

    def pump(self, send: Send, writer: ChunkWriter | None = None) -> asyncio.Future[bytes] | None:
        """Once open: the events sent to ``send`` as they come (see
        :meth:`StreamConnection.pump`); None if the stream is over already."""
        connection = self._connection
        if connection is None or not inspect.iscoroutinefunction(send):
            # (Run by hand, send must be a coroutine function: uvicorn's is.)
            return None
        return connection.pump(send, writer)

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
