"""The gateway's own HTTP/1.1 stream client (gateway/backends/stream_client.py):
its parser read by read (chunk boundaries inside an event and inside a CRLF,
extensions, trailers, malformed sizes, early closes, other framings), and the
stream over a pool (statuses, redirects, kept-alive connections, a stale one,
a reader that leaves). No sockets: the protocol is fed bytes directly; the
relay's own output against the typed path's is in tests/test_relay.py.
"""

from __future__ import annotations

import asyncio
import itertools
import random
from collections.abc import Callable
from typing import Any

import msgspec
import pytest

from gateway.backends.stream_client import (
    RelayHandlers,
    StaleConnectionError,
    StreamConnection,
)
from gateway.errors import (
    EngineOverloadedError,
    GatewayError,
    UpstreamError,
    UpstreamRateLimitedError,
)
from tests.scripted_transport import Reply, ScriptedTransport, sse_reply
from tests.upstream_kit import backend
from tests.wired_streams import per_byte, per_piece, wire

pytestmark = pytest.mark.anyio

HEAD = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Socket:
    """What the protocol writes to and closes."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False
        self.paused = False

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


def echo(payload: bytes) -> bytes:
    """A relay that writes each payload back as one line (so the test sees
    exactly which payloads the parser found)."""
    if payload.startswith(b"!"):
        raise msgspec.DecodeError("not a chunk")
    return payload + b"|"


class Fed:
    def __init__(self, *, reused: bool = False) -> None:
        self.connection = StreamConnection("up", asyncio.get_running_loop())
        self.socket = Socket()
        self.connection.connection_made(self.socket)  # type: ignore[arg-type]
        self.connection.reused = reused
        self.idle: list[StreamConnection] = []
        self.comments: list[bytes] = []
        self.head = self.connection.start(
            b"POST / HTTP/1.1\r\n\r\n",
            echo,
            lambda: b"<end>",
            self.comments.append,
            self.idle.append,
        )
        self.relaying = False

    def read(self, *reads: bytes) -> None:
        for data in reads:
            self.connection.data_received(data)
            if not self.relaying and self.head.done() and not self.head.exception():
                self.relaying = True
                self.connection.begin_relay()

    def events(self) -> tuple[bytes, BaseException | None]:
        """Everything the reader gets now, and how it ended (None: not yet)."""
        out = b""
        while True:
            future = self.connection.next_events()
            if not future.done():
                future.cancel()
                return out, None
            error = future.exception()
            if error is not None:
                return out, error
            out += future.result()


def chunked(*chunks: bytes, trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n" + trailer + b"\r\n"


BODY = chunked(
    b"data: one\n\n",
    b"data: two\n\ndata: thr",  # two events, the second cut by the chunk's end
    b"ee\n\n: busy 0.5\n",  # ... and a comment line
    b"data: [DONE]\n\n",
    trailer=b"x-trailer: 1\r\n",
)


def splits(data: bytes) -> list[list[bytes]]:
    chooser = random.Random(15)
    cuts = [sorted(chooser.sample(range(1, len(data)), 12)) for _ in range(20)]
    ways = [[data], [data[i : i + 1] for i in range(len(data))]]
    for points in cuts:
        bounds = [0, *points, len(data)]
        ways.append([data[a:b] for a, b in itertools.pairwise(bounds)])
    return ways


async def test_any_split_of_a_chunked_stream_gives_the_same_events_and_a_reusable_connection() -> (
    None
):
    # Every byte its own read covers boundaries inside an event, a size line,
    # the CRLF after a chunk and the trailers.
    for reads in splits(HEAD + BODY):
        fed = Fed()
        fed.read(*reads)
        events, end = fed.events()
        assert events == b"one|two|three|<end>"
        assert isinstance(end, StopAsyncIteration)
        assert fed.comments == [b"busy 0.5"]
        assert fed.idle == [fed.connection] and fed.connection.usable
        assert not fed.socket.closed


async def test_a_chunk_extension_and_upper_case_sizes_are_read() -> None:
    body = b"B;name=value\r\ndata: one\n\n\r\nE\r\ndata: [DONE]\n\n\r\n0\r\n\r\n"
    fed = Fed()
    fed.read(HEAD, body)
    events, end = fed.events()
    assert events == b"one|<end>" and isinstance(end, StopAsyncIteration)
    assert fed.connection.usable


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\ndata: one\n\n\r\n",
        b"-1\r\n",
        b"0x1\r\nd\r\n",
        b"1 0\r\n",
        b"+b\r\ndata: one\n\n\r\n",
        b"b\r\ndata: one\n\nXY",  # no CRLF after the data
        b"1" * 2000,  # a size line that never ends
    ],
    ids=["letters", "negative", "0x", "space", "plus", "no-crlf", "endless"],
)
async def test_a_malformed_chunk_fails_the_stream_and_drops_the_connection(body: bytes) -> None:
    for reads in ([HEAD, body], [HEAD, *per_byte([body])]):
        fed = Fed()
        fed.read(*reads)
        _, end = fed.events()
        assert isinstance(end, UpstreamError) and "malformed HTTP" in end.message
        assert fed.socket.closed and not fed.connection.usable


async def test_a_zero_length_body_and_an_early_close_are_errors_not_ends() -> None:
    fed = Fed()
    fed.read(HEAD, chunked())  # the last chunk at once: no [DONE]
    _, end = fed.events()
    assert isinstance(end, UpstreamError) and "without [DONE]" in end.message

    fed = Fed()
    fed.read(HEAD, b"b\r\ndata: one\n\n\r\n10\r\ndata: t")  # cut inside a chunk
    fed.connection.connection_lost(ConnectionResetError())
    events, end = fed.events()
    assert events == b"one|"
    assert isinstance(end, UpstreamError) and "ConnectionResetError" in end.message


async def test_content_length_and_close_delimited_bodies() -> None:
    body = b"data: one\n\ndata: [DONE]\n\n"
    fed = Fed()
    head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body)
    fed.read(head + body[:5], body[5:])
    assert fed.events()[0] == b"one|<end>" and fed.connection.usable

    # Ended by the close; the last line without its newline.
    fed = Fed()
    fed.read(b"HTTP/1.1 200 OK\r\n\r\ndata: one\n\ndata: [DONE]")
    fed.connection.connection_lost(None)
    events, end = fed.events()
    assert events == b"one|<end>" and isinstance(end, StopAsyncIteration)

    fed = Fed()
    fed.read(b"HTTP/1.0 200 OK\r\n\r\ndata: one\n\n")
    fed.connection.connection_lost(None)
    _, end = fed.events()
    assert isinstance(end, UpstreamError) and "without [DONE]" in end.message


async def test_a_payload_the_relay_cannot_read_fails_the_stream() -> None:
    fed = Fed()
    fed.read(HEAD + chunked(b"data: one\n\n", b"data: !bad\n\n", b"data: [DONE]\n\n"))
    events, end = fed.events()
    assert events == b"one|" and isinstance(end, UpstreamError)
    assert fed.socket.closed


async def test_done_before_the_last_chunk_keeps_the_connection_once_it_comes() -> None:
    fed = Fed()
    fed.read(HEAD, b"e\r\ndata: [DONE]\n\n\r\n")
    events, end = fed.events()
    assert events == b"<end>" and isinstance(end, StopAsyncIteration)
    assert fed.idle == []  # the upstream's message is not over yet
    fed.read(b"0\r\n\r\n")
    assert fed.idle == [fed.connection] and fed.connection.usable


async def test_a_reused_connection_closed_before_any_byte_is_stale() -> None:
    fed = Fed(reused=True)
    fed.connection.connection_lost(None)
    assert isinstance(fed.head.exception(), StaleConnectionError)
    fresh = Fed()
    fresh.connection.connection_lost(None)
    assert isinstance(fresh.head.exception(), UpstreamError)


async def test_an_interim_answer_and_a_slow_reader() -> None:
    fed = Fed()
    many = chunked(*[b"data: x\n\n"] * 300)
    fed.read(b"HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n" + HEAD, many)
    # Nobody read the 300 events: the upstream is not read meanwhile.
    assert fed.socket.paused
    events, _ = fed.events()
    assert events.count(b"x|") == 300 and not fed.socket.paused


# ------------------------------------------------ over a pool (RelayStream)


async def relayed(
    scripted: ScriptedTransport, **options: object
) -> tuple[Callable[[], object], object]:
    made = backend(scripted, **options)  # type: ignore[arg-type]
    pool = wire(made, scripted, per_piece)
    upstream = made._upstream
    handlers = RelayHandlers(echo, lambda: b"<end>")
    return (lambda: upstream.relay("/chat/completions", b"{}", None, handlers)), pool


async def read_all(stream: object) -> bytes:
    out = b""
    async for data in stream:  # type: ignore[attr-defined]
        out += data
    return out


async def test_statuses_and_redirects_fail_before_the_stream_starts() -> None:
    scripted = ScriptedTransport(
        Reply(429, [b'{"error": {"message": "slow down"}}'], {"retry-after": "7"}),
        Reply(500, [b"internal trace"]),
        Reply(307, [], {"location": "http://elsewhere/"}),
    )
    open_stream, _ = await relayed(scripted)
    with pytest.raises(UpstreamRateLimitedError) as limited:
        await anext(open_stream())  # type: ignore[call-overload]
    assert limited.value.headers["Retry-After"] == "7"
    with pytest.raises(UpstreamError) as failed:
        await anext(open_stream())  # type: ignore[call-overload]
    assert "internal trace" not in failed.value.message
    with pytest.raises(UpstreamError, match="redirect"):
        await anext(open_stream())  # type: ignore[call-overload]


async def test_streams_reuse_a_kept_alive_connection_and_free_their_slot() -> None:
    scripted = ScriptedTransport(
        sse_reply([b"one"]), sse_reply([b"two"]), sse_reply([b"three"], done=False)
    )
    open_stream, pool = await relayed(scripted, max_connections=1)
    assert await read_all(open_stream()) == b"one|<end>"
    assert await read_all(open_stream()) == b"two|<end>"
    with pytest.raises(GatewayError):
        await read_all(open_stream())
    (socket,) = pool.sockets  # type: ignore[attr-defined]
    assert socket.requests == 3
    assert scripted.sent[0].url.path == "/v1/chat/completions"
    # The one slot is free again: a fourth stream is not refused as overloaded.
    scripted.add(sse_reply([b"four"]))
    assert await read_all(open_stream()) == b"four|<end>"


async def test_a_reader_that_leaves_drops_the_connection() -> None:
    hold = asyncio.Event()
    scripted = ScriptedTransport(Reply(200, [b"data: one\n\n"], hold=hold), sse_reply([b"two"]))
    open_stream, pool = await relayed(scripted, max_connections=1)
    stream = open_stream()
    assert await anext(stream) == b"one|"  # type: ignore[call-overload]
    await stream.aclose()  # type: ignore[attr-defined]
    await asyncio.sleep(0)
    first = pool.sockets[0]  # type: ignore[attr-defined]
    assert first.is_closing()
    # Not reused; the slot is free.
    assert await read_all(open_stream()) == b"two|<end>"
    assert len(pool.sockets) == 2  # type: ignore[attr-defined]
    hold.set()


async def test_waiting_for_a_slot_past_the_pool_timeout_is_load() -> None:
    hold = asyncio.Event()
    scripted = ScriptedTransport(Reply(200, [b"data: one\n\n"], hold=hold))
    open_stream, _ = await relayed(scripted, max_connections=1, pool_timeout=0.01)
    stream = open_stream()
    await anext(stream)  # type: ignore[call-overload]
    with pytest.raises(EngineOverloadedError):
        await anext(open_stream())  # type: ignore[call-overload]
    await stream.aclose()  # type: ignore[attr-defined]
    hold.set()


async def test_an_upstream_silent_before_its_status_fails_after_first_token_timeout() -> None:
    scripted = ScriptedTransport(Reply(0), sse_reply([b"one"]))
    open_stream, pool = await relayed(scripted, first_token_timeout=0.02)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamError, match=r"nothing for 0\.02 s"):
        await anext(open_stream())  # type: ignore[call-overload]
    assert loop.time() - started < 1.0
    await asyncio.sleep(0)
    assert pool.sockets[0].is_closing()  # type: ignore[attr-defined]
    assert await read_all(open_stream()) == b"one|<end>"


# ------------------------------------------- the pump (events sent from here)


class Client:
    """An ASGI send whose socket can fill up (its sends then wait on a gate)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.gate: asyncio.Future[None] | None = None
        self.broken = False

    async def send(self, message: Any) -> None:
        if self.broken:
            raise RuntimeError("the client's socket broke")
        if self.gate is not None and not self.gate.done():
            await self.gate
        self.bodies.append(message["body"])


def event_chunk(text: bytes) -> bytes:
    event = b"data: " + text + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(event), event)


async def test_the_pump_sends_each_read_and_waits_out_a_full_client_socket() -> None:
    fed = Fed()
    fed.read(HEAD, event_chunk(b"one"))
    assert fed.events()[0] == b"one|"
    client = Client()
    done = fed.connection.pump(client.send)  # type: ignore[arg-type]
    fed.read(event_chunk(b"two"))
    assert client.bodies == [b"two|"]
    # The client's socket is full: the send waits, the upstream is not read,
    # what still arrives is queued and goes out after, in order.
    client.gate = asyncio.get_running_loop().create_future()
    fed.read(event_chunk(b"three"))
    assert fed.socket.paused
    fed.read(event_chunk(b"four"), event_chunk(b"[DONE]") + b"0\r\n\r\n")
    assert client.bodies == [b"two|"] and not done.done()
    client.gate.set_result(None)
    last = await done  # (what goes with the response's last message)
    # The blocked send, then what was queued meanwhile in one send.
    assert client.bodies == [b"two|", b"three|", b"four|<end>"] and last == b""
    assert not fed.socket.paused and fed.idle == [fed.connection]


async def test_a_pumped_stream_fails_as_a_read_one_does() -> None:
    fed = Fed()
    fed.read(HEAD, event_chunk(b"one"))
    fed.events()
    client = Client()
    done = fed.connection.pump(client.send)  # type: ignore[arg-type]
    fed.read(event_chunk(b"!bad"))
    with pytest.raises(UpstreamError):
        await done
    assert fed.socket.closed

    fed = Fed()
    fed.read(HEAD, event_chunk(b"one"))
    fed.events()
    client.broken = True
    done = fed.connection.pump(client.send)  # type: ignore[arg-type]
    fed.read(event_chunk(b"two"))
    with pytest.raises(RuntimeError):
        await done
    assert fed.socket.closed  # the upstream sees the close


class Writer:
    """The connection's chunk writer (gateway/chunk_write.py): it declines
    while the client's socket is full, and the pump then goes through send."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.full = False

    def write(self, body: bytes) -> bool:
        if self.full:
            return False
        self.written.append(body)
        return True


async def test_the_pump_writes_through_the_connections_writer_and_sends_when_it_declines() -> None:
    fed = Fed()
    fed.read(HEAD, event_chunk(b"one"))
    fed.events()
    client, writer = Client(), Writer()
    done = fed.connection.pump(client.send, writer)  # type: ignore[arg-type]
    fed.read(event_chunk(b"two"))
    assert writer.written == [b"two|"] and client.bodies == []
    # Full: send takes the read and waits for the socket to drain, the
    # upstream is not read meanwhile; what came then leaves in one send.
    writer.full = True
    client.gate = asyncio.get_running_loop().create_future()
    fed.read(event_chunk(b"three"))
    assert fed.socket.paused
    fed.read(event_chunk(b"four"))
    writer.full = False
    client.gate.set_result(None)
    for _ in range(5):  # the task that finishes the blocked send
        await asyncio.sleep(0)
    assert not fed.socket.paused
    assert client.bodies == [b"three|", b"four|"]
    fed.read(event_chunk(b"five"), event_chunk(b"[DONE]") + b"0\r\n\r\n")
    last = await done  # (what goes with the response's last message)
    # The events owed at the end ([DONE]) are written at once, like a chunk:
    # only the response's end is left to the relay's task.
    assert writer.written == [b"two|", b"five|", b"<end>"] and last == b""


async def test_the_end_goes_with_the_last_message_when_the_writer_declines() -> None:
    fed = Fed()
    fed.read(HEAD, event_chunk(b"one"))
    fed.events()
    client, writer = Client(), Writer()
    done = fed.connection.pump(client.send, writer)  # type: ignore[arg-type]
    fed.read(event_chunk(b"two"))
    writer.full = True  # the client's socket is full when the end comes
    fed.read(event_chunk(b"[DONE]") + b"0\r\n\r\n")
    last = await done
    assert writer.written == [b"two|"] and client.bodies == []
    assert last == b"<end>", "declined: the end goes with the response's last message"
