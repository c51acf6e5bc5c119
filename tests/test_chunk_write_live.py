"""A relayed stream's chunks written by the gateway's own HTTP protocol
(gateway/chunk_write.py), against a real ``nomoat serve``: only a real
server has that protocol (the in-process transport sends every chunk
through ASGI ``send``). A client that stops reading (the writer declines
while its socket is full, and ``send`` waits) then gets every event, in
order, in well-formed chunks; a client that leaves
while chunks flow closes the upstream's connection, and the next stream is
whole."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from gateway.testing import LiveGateway
from tests.loop_gateway import gateway_beside, open_raw_stream, served, vllm_config

pytestmark = [pytest.mark.e2e, pytest.mark.anyio, pytest.mark.timeout(120)]

KEY = "sk-chunk-write-test-0123456789"
CHUNKS = 4000
TEXT = "y" * 1000  # each chunk's content: 4 MB in all


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _chunk(content: str) -> bytes:
    chunk = {
        "id": "up",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


@dataclass
class Upstream:
    """Streams CHUNKS numbered chunks as fast as its client takes them, or
    ``gap`` seconds apart."""

    url: str = ""
    gap: float = 0.0
    written: int = 0
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: asyncio.Event = field(default_factory=asyncio.Event)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.written = 0
        self.finished.clear()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for number in range(CHUNKS):
                await response.write(_chunk(f"{number}:{TEXT}"))
                self.written = number + 1
                if self.gap:
                    await asyncio.sleep(self.gap)
            await response.write(b"data: [DONE]\n\n")
        except (ConnectionError, RuntimeError):
            self.dropped.set()
            return response
        self.finished.set()
        return response

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(text="")

    async def metrics(self, request: web.Request) -> web.Response:
        body = b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
        return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4"})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})


@asynccontextmanager
async def _served(tmp_path: Path) -> AsyncIterator[tuple[Upstream, LiveGateway]]:
    state = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", state.chat)
    app.router.add_get("/health", state.health)
    app.router.add_get("/metrics", state.metrics)
    app.router.add_get("/v1/models", state.models)
    async with served(app) as url:
        state.url = url
        extra = "\n[limits]\nsocket_send_buffer_bytes = 16384\n"
        async with gateway_beside(tmp_path, vllm_config(url, KEY, 0.5, extra), KEY) as live:
            yield state, live


async def _open(live: LiveGateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    payload = json.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    return await open_raw_stream(live, KEY, payload, receive_buffer=8192)  # fills quickly


async def _events(reader: asyncio.StreamReader) -> list[bytes]:
    """The response's body de-chunked, strictly, split into its events."""
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding: chunked" in head
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n"))[:-2], 16)
        data = await reader.readexactly(size + 2)
        assert data.endswith(b"\r\n")
        if size == 0:
            break
        body += data[:-2]
    assert body.endswith(b"\n\n")
    return bytes(body[:-2]).split(b"\n\n")


def _contents(events: list[bytes]) -> list[str]:
    """Every event's text, in order (the last event is [DONE])."""
    contents = []
    for item in events[:-1]:
        assert item.startswith(b"data: {")
        (choice,) = json.loads(item[6:])["choices"]
        if choice["delta"].get("content"):
            contents.append(choice["delta"]["content"])
    return contents


async def test_a_client_that_stops_reading_for_a_while_then_gets_every_event_in_order(
    tmp_path: Path,
) -> None:
    async with _served(tmp_path) as (up, live):
        reader, writer = await _open(live)
        # Not read for a while: the gateway's socket to it fills (16 KiB
        # and 8 KiB of buffers for 4 MB), its writes wait, it stops reading
        # the upstream (whose bytes wait in the kernel's buffers meanwhile).
        await asyncio.sleep(1.0)
        events = await asyncio.wait_for(_events(reader), 60)
        writer.close()
        assert events[-1] == b"data: [DONE]"
        assert _contents(events) == [f"{number}:{TEXT}" for number in range(CHUNKS)]
        assert up.finished.is_set()


async def test_a_client_that_leaves_while_chunks_flow_closes_the_upstreams_connection(
    tmp_path: Path,
) -> None:
    async with _served(tmp_path) as (up, live):
        up.gap = 0.005  # (not all written, into the kernel's buffers, before the client leaves)
        reader, writer = await _open(live)
        await asyncio.wait_for(reader.readuntil(b"data: "), 10)
        await asyncio.wait_for(reader.readexactly(20_000), 10)  # chunks flowing
        writer.close()
        await asyncio.wait_for(up.dropped.wait(), 10)
        assert up.written < CHUNKS
        # The gateway goes on: the next stream is whole.
        up.gap = 0.0
        reader, writer = await _open(live)
        events = await asyncio.wait_for(_events(reader), 60)
        writer.close()
        assert _contents(events) == [f"{number}:{TEXT}" for number in range(CHUNKS)]
        assert live.process.poll() is None
