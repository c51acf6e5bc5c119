"""The gateway's own stream client (gateway/backends/stream_client.py) driven
without a server: a :class:`ScriptedTransport`'s replies are played as
HTTP/1.1 bytes (status line, headers, a chunked body) into the client's
protocol, cut into reads as a test chooses (each piece its own chunk and
read, every byte its own read, everything in one read), so every split of the
framing is exercised. The requests are recorded in the scripted transport's
``sent``, as the aiohttp path records them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from yarl import URL

from gateway.backends.openai_compat import OpenAICompatibleBackend
from gateway.backends.stream_client import StreamConnection
from gateway.backends.stream_pool import RequestHead, StreamPool
from tests.scripted_transport import Reply, ScriptedTransport, Sent

# How a reply's bytes are cut into reads.
Split = Callable[[list[bytes]], list[bytes]]


def per_piece(framed: list[bytes]) -> list[bytes]:
    """The head in one read, then each HTTP chunk in its own (as vLLM writes)."""
    return framed


def per_byte(framed: list[bytes]) -> list[bytes]:
    """Every byte its own read: boundaries inside events, sizes and CRLFs."""
    whole = b"".join(framed)
    return [whole[i : i + 1] for i in range(len(whole))]


def all_at_once(framed: list[bytes]) -> list[bytes]:
    return [b"".join(framed)]


SPLITS: dict[str, Split] = {"piece": per_piece, "byte": per_byte, "once": all_at_once}


def framed(reply: Reply) -> list[bytes]:
    """The reply as an upstream would write it: the head, each piece as one
    chunk, then the last chunk (unless it is cut)."""
    headers = {"content-type": "text/event-stream", **reply.headers}
    head = f"HTTP/1.1 {reply.status} X\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    parts = [(head + "transfer-encoding: chunked\r\n\r\n").encode()]
    parts += [b"%x\r\n%s\r\n" % (len(piece), piece) for piece in reply.pieces if piece]
    if reply.cut is None and reply.hold is None:
        parts.append(b"0\r\n\r\n")
    return parts


class WireTransport(asyncio.Transport):
    """One connection's socket: a request written to it is answered with
    the scripted transport's next reply, read by read."""

    def __init__(
        self, scripted: ScriptedTransport, split: Split, protocol: StreamConnection
    ) -> None:
        super().__init__()
        self._scripted = scripted
        self._split = split
        self._protocol = protocol
        self._closing = False
        self.requests = 0
        self.paused = False
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes | bytearray | memoryview) -> None:  # type: ignore[override]
        raw = bytes(data)
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        url = URL(f"http://{headers['Host']}{target}")
        self._scripted.sent.append(Sent(method, url, body, headers))
        self.requests += 1
        if not self._scripted.replies:
            self._loop.call_soon(self._lost, ConnectionResetError())
            return
        reply = self._scripted.replies.popleft()
        if isinstance(reply, BaseException):
            self._loop.call_soon(self._lost, ConnectionResetError())
            return
        self._loop.create_task(self._play(reply))

    async def _play(self, reply: Reply) -> None:
        if reply.status == 0:
            return  # (status 0: an upstream that never answers)
        for data in self._split(framed(reply)):
            await asyncio.sleep(0)
            if self._closing:
                return
            self._protocol.data_received(data)
        if reply.hold is not None:
            await reply.hold.wait()
        if reply.cut is not None and not self._closing:
            # (Named in the client's error as aiohttp's would be.)
            cut = reply.cut
            self._lost(cut if isinstance(cut, Exception) else ConnectionResetError())

    def _lost(self, error: Exception | None) -> None:
        if not self._closing:
            self._closing = True
            self._protocol.connection_lost(error)

    def close(self) -> None:
        if not self._closing:
            self._closing = True
            self._loop.call_soon(self._protocol.connection_lost, None)

    def abort(self) -> None:
        self.close()

    def is_closing(self) -> bool:
        return self._closing

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class WiredPool(StreamPool):
    """A pool whose new connections are wired to the scripted replies."""

    def __init__(self, scripted: ScriptedTransport, split: Split, name: str) -> None:
        super().__init__(name, "upstream.test", 80, 1.0)
        self._scripted = scripted
        self._split = split
        self.sockets: list[WireTransport] = []

    async def connect(self) -> StreamConnection:
        connection = StreamConnection(self.name, asyncio.get_running_loop())
        socket = WireTransport(self._scripted, self._split, connection)
        self.sockets.append(socket)
        connection.connection_made(socket)
        return connection


def wire(made: OpenAICompatibleBackend, scripted: ScriptedTransport, split: Split) -> WiredPool:
    """Make ``made``'s relayed streams use the own client on ``scripted``'s
    replies (its other requests stay on the scripted transport)."""
    upstream = made._upstream
    pool = WiredPool(scripted, split, made.name)
    upstream._streams = pool
    upstream._stream_head = RequestHead(
        URL(upstream.base_url).raw_path.rstrip("/"),
        "upstream.test",
        {"Content-Type": "application/json"},
    )
    return pool
