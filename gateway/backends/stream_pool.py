"""Kept-alive connections of the gateway's own stream client, per upstream
(host and port), and the fixed head of its streamed requests."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Mapping
from typing import Final

from gateway.backends.stream_client import StreamConnection
from gateway.errors import UpstreamError

# An idle kept-alive connection older than this is closed, not reused
# (aiohttp's keepalive_timeout; uvicorn closes its side after 5 s).
KEEPALIVE_SECONDS: Final = 15.0
# Resolved host names are kept this long (aiohttp's default DNS cache).
_DNS_SECONDS: Final = 10.0


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
