"""The chunk writer the gateway's HTTP protocol offers a streamed response
(gateway/chunk_write.py, docs/benchmarks.md "Streaming at scale", session
7): uvicorn's own protocol (``GuardedProtocol``) fed a request through a
transport that records what is written, no socket. The writer's bytes are
what uvicorn's ``send`` writes; it declines whenever ``send`` must decide
(the client's socket full, the response not started, complete, or its
client gone)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import uvicorn
from uvicorn.server import ServerState

from gateway.chunk_write import ChunkWriter, chunk_writer
from gateway.connections import ConnectionGuard, GuardedProtocol, HttpLimits, protocol_class

pytestmark = pytest.mark.anyio

REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}"
EVENTS = [b"data: one\n\n", b"data: " + b"x" * 300 + b"\n\n", b"data: three\n\n"]
SSE = [(b"content-type", b"text/event-stream")]
START = {"type": "http.response.start", "status": 200, "headers": SSE}


class Transport(asyncio.Transport):
    """What the protocol writes, kept."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False


App = Callable[[Any, Any, Any], Awaitable[None]]


async def _serve(app: App) -> tuple[GuardedProtocol, Transport, asyncio.Task[None]]:
    """The protocol with ``app`` behind it, fed one request; the app's task."""
    config = uvicorn.Config(app, lifespan="off", proxy_headers=False, access_log=False)
    limits = HttpLimits(100, 100, 8192, 8192, 10.0, 10.0)
    state = ServerState()
    state.default_headers = [(b"date", b"Mon, 30 Nov 2026 15:00:00 GMT"), (b"server", b"uvicorn")]
    protocol = protocol_class(ConnectionGuard(limits))(
        config=config, server_state=state, app_state={}
    )
    transport = Transport()
    protocol.connection_made(transport)
    protocol.data_received(REQUEST)
    (task,) = state.tasks
    return protocol, transport, task


async def test_the_writer_writes_the_bytes_send_would_and_declines_what_send_must_decide() -> None:
    # The same events sent by uvicorn's send, then through the writer.
    async def by_send(scope: Any, receive: Any, send: Any) -> None:
        await send(START)
        for body in EVENTS:
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})

    _, sent, task = await _serve(by_send)
    await task

    seen: list[object] = []
    protocol: GuardedProtocol | None = None

    async def by_writer(scope: Any, receive: Any, send: Any) -> None:
        writer: ChunkWriter | None = chunk_writer(scope)
        assert writer is not None and protocol is not None
        seen.append(writer.write(EVENTS[0]))  # before the status line: send's
        # Headers whose handling is send's, or that it refuses: nothing written.
        seen.append(writer.start(200, [*SSE, (b"Content-Length", b"9")], EVENTS[0]))
        seen.append(writer.start(200, [*SSE, (b"x-bad", b"a\r\nb: c")], EVENTS[0]))
        protocol.pause_writing()  # the client's socket is full
        seen.append(writer.start(200, SSE, EVENTS[0]))
        protocol.resume_writing()
        assert not protocol.transport.written  # type: ignore[attr-defined]
        seen.append(writer.start(200, SSE, EVENTS[0]))
        seen.append(writer.start(200, SSE, EVENTS[0]))  # started already
        seen.append(writer.write(b""))  # nothing, not the body's end
        protocol.pause_writing()
        seen.append(writer.write(EVENTS[1]))
        protocol.resume_writing()
        seen.append(writer.write(EVENTS[1]))
        seen.append(writer.write(EVENTS[2]))
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
        seen.append(writer.write(b"data: late\n\n"))  # past the end: send raises

    protocol, written, task = await _serve(by_writer)
    await task
    assert seen == [False, False, False, False, True, False, True, False, True, True, False]
    # Byte for byte what send wrote: the head (date and server included),
    # each chunk's framing, the end.
    assert written.written == sent.written
    assert written.written.startswith(b"HTTP/1.1 200 OK\r\ndate: Mon, 30 Nov 2026 15:00:00 GMT")
    assert written.written.endswith(b"\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")


async def test_a_client_gone_mid_stream_gets_nothing_more_from_the_writer() -> None:
    gone = asyncio.Event()
    outcome: list[object] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        writer = chunk_writer(scope)
        assert writer is not None
        await send(START)
        outcome.append(writer.write(EVENTS[0]))
        await gone.wait()
        # Declined: send, as uvicorn's does for a lost client, writes nothing.
        outcome.append(writer.write(EVENTS[1]))
        await send({"type": "http.response.body", "body": EVENTS[1], "more_body": True})

    protocol, transport, task = await _serve(app)
    await asyncio.sleep(0)
    protocol.connection_lost(None)
    before = bytes(transport.written)
    gone.set()
    await task
    assert outcome == [True, False]
    assert transport.written == before and before.endswith(b"data: one\n\n\r\n")
