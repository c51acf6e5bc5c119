"""A scripted transport for :class:`gateway.backends.upstream.Upstream`: each
request gets the next scripted reply (a status, headers and a body, whole or
in pieces, perhaps cut off by a transport error), and every request is
recorded. Fast tests drive the upstream code with it, with no server.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgspec
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.backends.transport import TransportOptions


@dataclass
class Reply:
    status: int = 200
    # Sent in pieces as they are listed (a stream's network reads).
    pieces: list[bytes] = field(default_factory=list)
    headers: Mapping[str, str] = field(default_factory=dict)
    # Raised after the pieces (a connection cut mid-body).
    cut: BaseException | None = None
    # Awaited after the pieces (an upstream that goes quiet): None, no wait.
    hold: asyncio.Event | None = None


def json_reply(body: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Reply:
    return Reply(status, [msgspec.json.encode(body)], headers or {})


def sse_reply(payloads: Iterable[Any], *, done: bool = True, status: int = 200) -> Reply:
    """One ``data:`` event per payload (JSON-encoded unless bytes), then [DONE]."""
    events = [
        b"data: " + (p if isinstance(p, bytes) else msgspec.json.encode(p)) + b"\n\n"
        for p in payloads
    ]
    if done:
        events.append(b"data: [DONE]\n\n")
    return Reply(status, events, {"content-type": "text/event-stream"})


@dataclass
class Sent:
    method: str
    url: URL
    body: bytes | None
    headers: Mapping[str, str] | None

    def json(self) -> Any:
        assert self.body is not None
        return msgspec.json.decode(self.body)


class _Body:
    def __init__(self, reply: Reply) -> None:
        self._reply = reply
        self._reads: AsyncIterator[bytes] | None = None

    async def readany(self) -> bytes:
        """The next piece; b"" once they are all read (as aiohttp's)."""
        if self._reads is None:
            self._reads = self.iter_any()
        return await anext(self._reads, b"")

    async def iter_any(self) -> AsyncIterator[bytes]:
        for piece in self._reply.pieces:
            yield piece
        if self._reply.hold is not None:
            await self._reply.hold.wait()
        if self._reply.cut is not None:
            raise self._reply.cut


class ScriptedResponse:
    def __init__(self, reply: Reply) -> None:
        self._reply = reply
        self.status = reply.status
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(reply.headers))
        self.content = _Body(reply)
        self.released = False
        self.closed = False

    async def read(self) -> bytes:
        if self._reply.cut is not None:
            raise self._reply.cut
        return b"".join(self._reply.pieces)

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True


class ScriptedTransport:
    """Also its own factory: pass the instance as ``transport=``."""

    def __init__(self, *replies: Reply | BaseException) -> None:
        self.replies: deque[Reply | BaseException] = deque(replies)
        self.sent: list[Sent] = []
        self.responses: list[ScriptedResponse] = []
        self.options: TransportOptions | None = None
        self.closed = False

    def __call__(self, options: TransportOptions) -> ScriptedTransport:
        self.options = options
        return self

    def add(self, *replies: Reply | BaseException) -> None:
        self.replies.extend(replies)

    async def send(
        self,
        method: str,
        url: URL,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        *,
        watched: bool = False,
    ) -> ScriptedResponse:
        self.sent.append(Sent(method, url, body, headers))
        if not self.replies:
            raise aiohttp.ClientConnectionError("nothing scripted for this request")
        reply = self.replies.popleft()
        if isinstance(reply, BaseException):
            raise reply
        response = ScriptedResponse(reply)
        self.responses.append(response)
        return response

    async def aclose(self) -> None:
        self.closed = True
