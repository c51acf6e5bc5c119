"""A client that leaves a relayed stream, against a real ``nomoat serve``:
its hang-up is heard from the connection (gateway/hang_up.py: the gateway's
uvicorn protocol tells the request, no watcher task awaits ``receive()``),
which only a real server exercises (the in-process transport has no such
connection and keeps the watcher). The request's body is over uvicorn's
64 KiB read-ahead, after which uvicorn stops reading the socket until the
application asks: the close must still be seen. The upstream learns it as
vLLM does, by its connection being dropped."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from gateway.testing import LiveGateway
from tests.loop_gateway import gateway_beside, open_raw_stream, vllm_config
from tests.test_upstream_faults import CHAT, Upstream, upstream

pytestmark = [pytest.mark.e2e, pytest.mark.anyio, pytest.mark.timeout(120)]

KEY = "sk-hang-up-test-0123456789"
# Over uvicorn's HIGH_WATER_LIMIT (64 KiB) of request body.
BIG_PROMPT = "word " * 20_000


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@asynccontextmanager
async def _served(tmp_path: Path) -> AsyncIterator[tuple[Upstream, LiveGateway]]:
    """The upstream on this loop; the gateway started from a thread, so the
    loop answers its probes meanwhile."""
    async with (
        upstream() as up,
        gateway_beside(tmp_path, vllm_config(up.url, KEY, 0.05), KEY) as live,
    ):
        yield up, live


async def _open_stream(live: LiveGateway) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    body = {**CHAT, "messages": [{"role": "user", "content": BIG_PROMPT}], "stream": True}
    return await open_raw_stream(live, KEY, json.dumps(body).encode())


async def test_leaving_a_relayed_stream_drops_the_upstreams_connection(tmp_path: Path) -> None:
    async with _served(tmp_path) as (up, live):
        up.chat = "hold"  # the first chunk, then nothing until released
        reader, writer = await _open_stream(live)
        head = await asyncio.wait_for(reader.readuntil(b"data: "), 10)
        assert head.startswith(b"HTTP/1.1 200")
        writer.close()
        await asyncio.wait_for(up.dropped.wait(), 5)
        assert live.process.poll() is None
