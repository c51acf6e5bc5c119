"""The HTTP transport under :class:`~gateway.backends.upstream.Upstream`: one
method that sends a request and hands back the response, unread.

In production it is aiohttp: one pooled ``ClientSession`` per upstream, and
aiohttp's own ``ClientResponse`` passes through unwrapped (the protocols below
are the part of it the upstream code uses), so the seam costs one call. Tests
inject a scripted transport instead and drive every status, body and cut-off
stream without a server.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from yarl import URL


class ResponseBody(Protocol):
    def iter_any(self) -> AsyncIterator[bytes]:
        """The body's bytes as they arrive."""
        ...

    async def readany(self) -> bytes:
        """What has arrived of the body (waiting for some); ``b""`` at its end."""
        ...


class TransportResponse(Protocol):
    """A response whose body has not been read yet."""

    @property
    def status(self) -> int: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def content(self) -> ResponseBody: ...

    async def read(self) -> bytes: ...

    def release(self) -> object:
        """Done with a wholly read body: the connection may be reused."""
        ...

    def close(self) -> None:
        """Drop the connection (the upstream sees it closed)."""
        ...


class Transport(Protocol):
    async def send(
        self,
        method: str,
        url: URL,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        *,
        watched: bool = False,
    ) -> TransportResponse:
        """Send a request (``headers`` on top of the transport's own) and
        return its response once the status line and headers are in.

        ``watched``: the caller bounds the waits for the answer's bytes itself
        (the cheap relay's idle watchdog), so the transport sets no timer of
        its own between reads."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class TransportOptions:
    # Sent with every request (content type, the upstream's key).
    headers: Mapping[str, str]
    # Opening a connection.
    connect_timeout: float
    # Waiting for a pooled connection, and between reads of an answer.
    read_timeout: float
    max_connections: int


TransportFactory = Callable[[TransportOptions], Transport]


class TransportClosedError(aiohttp.ClientConnectionError):
    """A request after the transport was closed (the gateway is stopping)."""


class AiohttpTransport:
    """The production transport; its session is created on first use, inside
    the event loop."""

    def __init__(self, options: TransportOptions) -> None:
        self._options = options
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._watched_timeout = aiohttp.ClientTimeout()

    def _client(self) -> aiohttp.ClientSession:
        session = self._session
        if session is None:
            if self._closed:
                raise TransportClosedError("the transport is closed")
            options = self._options
            limit = options.max_connections
            # For watched requests: no sock_read timer, which aiohttp re-arms
            # on every read (about 6,000 instructions a stream chunk).
            self._watched_timeout = aiohttp.ClientTimeout(
                total=None,
                connect=options.read_timeout,
                sock_connect=options.connect_timeout,
                sock_read=None,
            )
            session = self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=limit, limit_per_host=limit),
                headers=dict(options.headers),
                # connect: waiting for a pooled connection and opening one (as
                # httpx's pool timeout); sock_connect: opening one; sock_read:
                # between reads.
                timeout=aiohttp.ClientTimeout(
                    total=None,
                    connect=options.read_timeout,
                    sock_connect=options.connect_timeout,
                    sock_read=options.read_timeout,
                ),
                # Never a proxy from the environment, never cookies: nothing
                # the client or the upstream sends changes what the next
                # request carries.
                trust_env=False,
                cookie_jar=aiohttp.DummyCookieJar(),
                raise_for_status=False,
            )
        return session

    async def send(
        self,
        method: str,
        url: URL,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        *,
        watched: bool = False,
    ) -> aiohttp.ClientResponse:
        # Redirects are never followed (aiohttp's default would): a 3xx is
        # the upstream's answer, and an error (see gateway/backends/upstream.py).
        session = self._client()
        if watched:
            return await session.request(
                method,
                url,
                data=body,
                headers=headers,
                allow_redirects=False,
                timeout=self._watched_timeout,
            )
        return await session.request(method, url, data=body, headers=headers, allow_redirects=False)

    async def aclose(self) -> None:
        self._closed = True
        session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                await session.close()
