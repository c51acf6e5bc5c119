"""The one seam to HTTP upstreams that speak OpenAI's API (vLLM, edge nodes,
hosted APIs): pooled client, timeouts, and the translation of every transport
failure and upstream status into a typed gateway error, in exactly one place
(the mapping itself is in :mod:`gateway.backends.upstream_errors`).

The client is one ``aiohttp.ClientSession`` per upstream, chosen on
measurement (docs/benchmarks.md, "What was optimised, and by how much"): the
first client, httpx's API on an aiohttp transport, spent about a third of the
gateway's Python time building httpx requests, URLs, cookie jars and responses
around aiohttp. Without it the server executes 1.25M instructions per proxied
request instead of 2.22M, and spends 0.43 CPU-ms instead of 0.78-0.82.
It sits behind a one-method transport (:mod:`gateway.backends.transport`) that
tests replace. The cheap relay's streams from an ``http://`` upstream are read
by the gateway's own HTTP/1.1 client instead
(:mod:`gateway.backends.stream_client`, chosen on measurement too: 38,500
instructions a relayed chunk against 60,900 on aiohttp).

Redirects are never followed: the operator chose where requests go, and a
3xx from an upstream is its fault, a 502. Waiting for a free connection of the
pool (``max_connections``) is bounded by ``pool_timeout`` and is load, not ill
health: past it the request gets :class:`EngineOverloadedError`, which moves
on to another deployment without cooling this one down (a slow upstream must
not make its own queue look like a failure and cascade into cooldowns). The
gateway's own GETs (probes, metrics, listings) do not wait behind clients'
requests for a connection, and read at most ``MAX_GET_BYTES``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass

import aiohttp
import msgspec
from yarl import URL

from gateway.backends.relay_stream import RelayStream
from gateway.backends.stream_client import RelayHandlers
from gateway.backends.stream_pool import RequestHead, StreamPool
from gateway.backends.transport import (
    AiohttpTransport,
    TransportClosedError,
    TransportFactory,
    TransportOptions,
    TransportResponse,
)
from gateway.backends.upstream_errors import status_error, unreadable_answer
from gateway.errors import EngineOverloadedError, GatewayError, UpstreamError

# What the client may raise: its own errors, and timeouts (ServerTimeoutError
# is both; a few paths raise a bare TimeoutError).
# Bytes the relay's common read is checked for.
_NEWLINE = ord("\n")
_BRACKET = ord("[")
_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError)
_log = logging.getLogger("gateway.upstream")
# The largest body a GET (probe, metrics, listing) may have; a larger one is
# an UpstreamError (vLLM's /metrics is tens of kB).
MAX_GET_BYTES = 8 * 1024 * 1024
# Connections beyond max_connections for the gateway's own GETs, which do not
# wait for the clients' ones.
_GET_CONNECTIONS = 4


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float
    # Until the first byte of the answer (the whole answer, unstreamed);
    # between chunks once a stream has started.
    first_token: float


class _IdleWatch:
    """Calls ``on_idle`` once nothing arrived for ``seconds`` (the caller
    sets ``last`` on each read): one timer per period, re-armed only when it
    fires early, instead of one per read."""

    __slots__ = ("_handle", "_on_idle", "_seconds", "fired", "last", "loop")

    def __init__(self, seconds: float, on_idle: Callable[[], object]) -> None:
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self.fired = False
        self._seconds = seconds
        self._on_idle = on_idle
        self._handle = self.loop.call_at(self.last + seconds, self._check)

    def _check(self) -> None:
        due = self.last + self._seconds
        if self.loop.time() < due:
            self._handle = self.loop.call_at(due, self._check)
            return
        self.fired = True
        self._on_idle()

    def cancel(self) -> None:
        self._handle.cancel()


def api_key_from_env(variable: str | None) -> str | None:
    """The upstream's key, read from the environment variable the config names
    (secrets are never written in the config file)."""
    if variable is None:
        return None
    value = os.environ.get(variable)
    if not value:
        raise ValueError(f"environment variable {variable} (the upstream's API key) is not set")
    return value


class Upstream:
    """One pooled HTTP client for one upstream, created at start-up (the
    transport's connections on first use, inside the event loop).

    ``answer`` and ``stream`` carry clients' requests: their errors never
    carry the upstream's text. ``post``, ``put``, ``get`` and ``delete`` are for
    the gateway's own calls (probes, metrics, adapters), whose callers may read
    the upstream's message.
    """

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        timeouts: Timeouts,
        api_key: str | None = None,
        max_connections: int = 4096,
        pool_timeout: float = 5.0,
        transport: TransportFactory = AiohttpTransport,
        own_stream_client: bool = True,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        headers = {"Content-Type": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._transport = transport(
            TransportOptions(
                headers,
                timeouts.connect,
                timeouts.first_token,
                max_connections + _GET_CONNECTIONS,
            )
        )
        self._max_connections = max_connections
        self._first_token = timeouts.first_token
        # Clients' requests hold one of these from sending until the answer
        # is read (or the stream closed), so the pool never makes them wait:
        # the wait is here, bounded, and told apart from a failure.
        self._connections = asyncio.Semaphore(max_connections)
        self._pool_timeout = pool_timeout
        self._urls: dict[str, URL] = {}
        # Relayed streams from a plain-HTTP upstream go through the gateway's
        # own HTTP/1.1 client (gateway/backends/stream_client.py), unless the
        # transport is a test's or the operator turned it off.
        self._streams: StreamPool | None = None
        self._stream_head: RequestHead | None = None
        base = URL(self.base_url)
        if own_stream_client and transport is AiohttpTransport and base.scheme == "http":
            host = base.raw_host or ""
            port = base.port or 80
            self._streams = StreamPool(name, host, port, timeouts.connect)
            authority = host if base.explicit_port is None else f"{host}:{port}"
            if ":" in host:
                authority = f"[{host}]" if base.explicit_port is None else f"[{host}]:{port}"
            self._stream_head = RequestHead(base.raw_path.rstrip("/"), authority, headers)

    def _url(self, path: str) -> URL:
        """``path`` below the base URL, or an absolute URL; parsed once."""
        url = self._urls.get(path)
        if url is None:
            absolute = path.startswith(("http://", "https://"))
            url = self._urls[path] = URL(path if absolute else self.base_url + path)
        return url

    async def answer(
        self, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> bytes:
        """A client's request, unstreamed: the answer's body. ``headers``:
        added to the request (the client's tenant, the trace context)."""
        return await self._send("POST", path, body, headers, reveal=False)

    async def answer_and_headers(
        self, path: str, body: bytes, headers: Mapping[str, str] | None = None
    ) -> tuple[bytes, Mapping[str, str]]:
        """:meth:`answer`, with the answer's headers (an edge node reports
        its busy time in one)."""
        return await self._sent("POST", path, body, headers, reveal=False)

    async def post(self, path: str, body: bytes, headers: Mapping[str, str] | None = None) -> bytes:
        return await self._send("POST", path, body, headers, reveal=True)

    async def put(self, path: str, body: bytes, headers: Mapping[str, str] | None = None) -> bytes:
        """For admin calls (adapter uploads); errors as for :meth:`post`."""
        return await self._send("PUT", path, body, headers, reveal=True)

    async def _send(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str] | None,
        *,
        reveal: bool,
    ) -> bytes:
        """The body of a successful answer; every failure as a typed error."""
        content, _ = await self._sent(method, path, body, headers, reveal=reveal)
        return content

    async def _sent(
        self,
        method: str,
        path: str,
        body: bytes,
        headers: Mapping[str, str] | None,
        *,
        reveal: bool,
    ) -> tuple[bytes, Mapping[str, str]]:
        """:meth:`_send`, with the answer's headers."""
        async with self._connection():
            try:
                response = await self._transport.send(method, self._url(path), body, headers)
                try:
                    content = await response.read()
                finally:
                    response.release()
            except _TRANSPORT_ERRORS as error:
                raise self._transport_error(error) from error
        if 300 <= response.status < 400:
            raise self._redirect_error(response.status, response.headers)
        if response.status >= 400:
            raise status_error(self.name, response.status, content, response.headers, reveal=reveal)
        return content, response.headers

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[None]:
        """Hold one of the pool's connections; waiting past ``pool_timeout``
        is an EngineOverloadedError (retried elsewhere, never a cooldown)."""
        await self._take_slot()
        slots = self._connections
        try:
            yield
        finally:
            slots.release()

    async def get(self, path: str, headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
        """For probes and metrics: the status and body, errors as UpstreamError."""
        status, _, content = await self.probe(path, headers)
        return status, content

    async def probe(
        self, path: str, headers: Mapping[str, str] | None = None
    ) -> tuple[int, str, bytes]:
        """A GET of the gateway's own: the status, content type and body (at
        most MAX_GET_BYTES), errors as UpstreamError; never waits for a
        connection behind clients' requests."""
        try:
            response = await self._transport.send("GET", self._url(path), None, headers)
            try:
                content = await self._capped(response, path)
            except BaseException:
                response.close()  # unread: the connection cannot be reused
                raise
            response.release()
        except _TRANSPORT_ERRORS as error:
            raise self._transport_error(error) from error
        return response.status, response.headers.get("content-type", ""), content

    async def _capped(self, response: TransportResponse, path: str) -> bytes:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > MAX_GET_BYTES:
            raise self._too_large(path)
        content = bytearray()
        async for data in response.content.iter_any():
            content += data
            if len(content) > MAX_GET_BYTES:
                raise self._too_large(path)
        return bytes(content)

    def _too_large(self, path: str) -> UpstreamError:
        return UpstreamError(
            f"backend {self.name}: the answer to GET {path} is larger than {MAX_GET_BYTES} bytes"
        )

    async def delete(self, path: str, headers: Mapping[str, str] | None = None) -> int:
        """For admin calls: the status, transport errors as UpstreamError."""
        status, _ = await self._status_and_body("DELETE", path, headers)
        return status

    async def _status_and_body(
        self, method: str, path: str, headers: Mapping[str, str] | None
    ) -> tuple[int, bytes]:
        async with self._connection():
            try:
                response = await self._transport.send(method, self._url(path), None, headers)
                try:
                    return response.status, await response.read()
                finally:
                    response.release()
            except _TRANSPORT_ERRORS as error:
                raise self._transport_error(error) from error

    async def stream(
        self,
        path: str,
        body: bytes,
        headers: Mapping[str, str] | None = None,
        comments: Callable[[bytes], None] | None = None,
    ) -> AsyncIterator[bytes]:
        """The ``data:`` payloads of a client's streamed answer, without
        ``[DONE]``. ``comments``: told each SSE comment line's text (after
        the colon; an edge node reports its busy time in one).

        Failures before the first payload raise retryable errors; closing the
        iterator closes the connection, which makes vLLM abort the request.
        Each payload is yielded as soon as its line is complete.
        """
        # aclosing: closing this iterator closes the response at once.
        payloads = contextlib.aclosing(self._stream(path, body, headers, comments))
        async with self._connection(), payloads as lines:
            async for payload in lines:
                yield payload

    async def _stream(
        self,
        path: str,
        body: bytes,
        headers: Mapping[str, str] | None,
        comments: Callable[[bytes], None] | None,
    ) -> AsyncGenerator[bytes, None]:
        try:
            response = await self._transport.send("POST", self._url(path), body, headers)
        except _TRANSPORT_ERRORS as error:
            raise self._transport_error(error) from error
        complete = False
        try:
            if 300 <= response.status < 400:
                raise self._redirect_error(response.status, response.headers)
            if response.status >= 400:
                content = await response.read()
                raise status_error(
                    self.name, response.status, content, response.headers, reveal=False
                )
            pending = b""
            async for data in response.content.iter_any():
                lines = (pending + data).split(b"\n") if pending else data.split(b"\n")
                pending = lines.pop()
                for line in lines:
                    if line.startswith(b"data:"):
                        payload = line[5:].strip()
                        if payload == b"[DONE]":
                            complete = True
                            return
                        yield payload
                    elif comments is not None and line.startswith(b":"):
                        comments(line[1:].strip())
            # The last line may end the stream without a newline.
            if pending.startswith(b"data:"):
                payload = pending[5:].strip()
                if payload == b"[DONE]":
                    complete = True
                    return
                yield payload
            raise UpstreamError(f"backend {self.name} ended the stream without [DONE]")
        except _TRANSPORT_ERRORS as error:
            raise self._transport_error(error) from error
        finally:
            if complete:
                # The whole answer was read: the connection goes back to the pool.
                response.release()
            else:
                # Cut short (the client went away, an error): drop the
                # connection, so the upstream sees the close and stops.
                response.close()

    def relay(
        self,
        path: str,
        body: bytes,
        headers: Mapping[str, str] | None,
        handlers: RelayHandlers,
    ) -> AsyncGenerator[bytes, None] | RelayStream:
        """A client's streamed answer, each ``data:`` payload turned into the
        client's bytes by ``handlers.feed`` (``finish`` adds what is owed at
        ``[DONE]``), the output of one network read at once. ``comments``:
        told each SSE comment line's text, as :meth:`stream` (an edge node's
        busy seconds); comments never reach the client. ``closed``: called
        once when the stream is closed, however it ended (it must be closed,
        as :func:`contextlib.aclosing` does).

        The same contract as :meth:`stream` (this is the cheap relay's hot
        loop): retryable errors before the first events, a payload ``feed``
        cannot read is an UpstreamError, no ``[DONE]`` is an UpstreamError,
        closing the iterator drops the connection. On a plain-HTTP upstream
        it runs on the gateway's own client (:mod:`gateway.backends.stream_client`),
        else on aiohttp.
        """
        pool, head = self._streams, self._stream_head
        if pool is None or head is None:
            return self._aiohttp_relay(path, body, headers, handlers)
        return RelayStream(
            self.name,
            pool,
            head.request(path, headers, body),
            self._first_token,
            self._take_slot,
            self._connections.release,
            handlers,
        )

    async def _take_slot(self) -> None:
        """One of the pool's connections, as :meth:`_connection` takes it;
        the caller releases it."""
        slots = self._connections
        if slots.locked():
            try:
                async with asyncio.timeout(self._pool_timeout):
                    await slots.acquire()
            except TimeoutError:
                raise EngineOverloadedError(
                    f"backend {self.name}: all {self._max_connections} connections are busy",
                    retry_after_seconds=1,
                ) from None
        else:
            await slots.acquire()

    async def _aiohttp_relay(
        self,
        path: str,
        body: bytes,
        headers: Mapping[str, str] | None,
        handlers: RelayHandlers,
    ) -> AsyncGenerator[bytes, None]:
        """:meth:`relay` on aiohttp (an https upstream, a test's transport)."""
        events = self._aiohttp_events(path, body, headers, handlers)
        try:
            async with contextlib.aclosing(events):
                async for data in events:
                    yield data
        finally:
            if handlers.closed is not None:
                handlers.closed()

    async def _aiohttp_events(
        self,
        path: str,
        body: bytes,
        headers: Mapping[str, str] | None,
        handlers: RelayHandlers,
    ) -> AsyncGenerator[bytes, None]:
        feed, finish, comments = handlers.feed, handlers.finish, handlers.comments
        async with self._connection():
            try:
                # Until the status and headers: one timer for the stream.
                async with asyncio.timeout(self._first_token):
                    response = await self._transport.send(
                        "POST", self._url(path), body, headers, watched=True
                    )
            except _TRANSPORT_ERRORS as error:
                raise self._transport_error(error) from error
            complete = False
            payload = b""
            idle = _IdleWatch(self._first_token, response.close)
            try:
                if 300 <= response.status < 400:
                    raise self._redirect_error(response.status, response.headers)
                if response.status >= 400:
                    content = await response.read()
                    raise status_error(
                        self.name, response.status, content, response.headers, reveal=False
                    )
                pending = b""
                out: list[bytes] = []
                # readany, not iter_any: one awaitable less per read.
                read = response.content.readany
                clock = idle.loop.time
                while data := await read():
                    idle.last = clock()
                    end = len(data) - 2
                    if (
                        not pending
                        and data.find(b"\n") == end
                        and data[-1] == _NEWLINE
                        and data.startswith(b"data: ")
                        and data[6] != _BRACKET
                    ):
                        # The common read: one event of one line, not
                        # [DONE] (counted once a chunk: docs/benchmarks.md).
                        payload = data[6:end]
                        events = feed(payload)
                        if events:
                            yield events
                        continue
                    lines = (pending + data).split(b"\n") if pending else data.split(b"\n")
                    pending = lines.pop()
                    for line in lines:
                        if line.startswith(b"data:"):
                            payload = line[5:].strip()
                            if payload == b"[DONE]":
                                complete = True
                                break
                            out.append(feed(payload))
                        elif comments is not None and line.startswith(b":"):
                            comments(line[1:].strip())
                    if complete:
                        break
                    if out:
                        events = b"".join(out)
                        out.clear()
                        if events:
                            yield events
                if not complete and pending.startswith(b"data:"):
                    # The last line may end the stream without a newline.
                    payload = pending[5:].strip()
                    complete = payload == b"[DONE]"
                    if not complete:
                        out.append(feed(payload))
                if not complete:
                    raise UpstreamError(f"backend {self.name} ended the stream without [DONE]")
                out.append(finish())
                events = b"".join(out)
                if events:
                    yield events
            except msgspec.DecodeError as error:
                complete = False
                raise self.unreadable(payload, error) from None
            except _TRANSPORT_ERRORS as error:
                if idle.fired:
                    raise UpstreamError(
                        f"backend {self.name} is unreachable or timed out "
                        f"(nothing for {self._first_token:g} s)"
                    ) from error
                raise self._transport_error(error) from error
            finally:
                idle.cancel()
                if complete:
                    response.release()
                else:
                    response.close()

    def unreadable(self, payload: bytes, problem: Exception) -> UpstreamError:
        """An answer or chunk that does not decode (logged for the operator)."""
        return unreadable_answer(self.name, payload, problem)

    def _redirect_error(self, status: int, headers: Mapping[str, str]) -> UpstreamError:
        """A 3xx: never followed; the operator reads where it pointed."""
        _log.warning(
            "backend %s answered %d (redirect to %r): not followed; fix its base_url",
            self.name,
            status,
            headers.get("location", ""),
        )
        return UpstreamError(f"backend {self.name} answered with a redirect ({status})")

    def _transport_error(self, error: BaseException) -> GatewayError:
        if isinstance(error, TransportClosedError):
            return UpstreamError(f"backend {self.name} is shut down")
        kind = type(error).__name__
        return UpstreamError(f"backend {self.name} is unreachable or timed out ({kind})")

    async def aclose(self) -> None:
        if self._streams is not None:
            self._streams.close()
        await self._transport.aclose()
