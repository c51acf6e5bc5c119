"""A real gateway (``nomoat serve``) in front of a fake vLLM-shaped upstream
served on the test's own event loop: the gateway is started and stopped from
a thread, so the loop answers the upstream's requests (and the gateway's
probes) meanwhile."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from aiohttp import web

from gateway.auth import hash_api_key
from gateway.testing import LiveGateway, running_gateway


def vllm_config(url: str, key: str, probe_interval: float, extra: str = "") -> str:
    """One vLLM backend ``up`` at ``url`` serving model ``m``, no retries,
    the key ``key`` required; ``extra`` TOML before the backend."""
    return f"""
[server]
api_key_hashes = ["{hash_api_key(key)}"]
{extra}
[plugins]
disabled = ["llamacpp"]

[backends.up]
type = "vllm"
base_url = "{url}"
models = ["m"]
probe_interval = {probe_interval}

[models.m]
deployments = [{{ backend = "up" }}]
retries = 0
"""


@asynccontextmanager
async def served(app: web.Application) -> AsyncIterator[str]:
    """``app`` on a free loopback port; yields its ``/v1`` base URL."""
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def gateway_beside(tmp_path: Path, config: str, key: str) -> AsyncIterator[LiveGateway]:
    """The gateway started and stopped from a thread (this loop keeps running)."""
    context = running_gateway(tmp_path, config, api_key=key)
    live = await asyncio.to_thread(context.__enter__)
    try:
        yield live
    finally:
        await asyncio.to_thread(context.__exit__, None, None, None)


async def open_raw_stream(
    live: LiveGateway, key: str, payload: bytes, receive_buffer: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A chat completion POSTed by hand on a socket of the test's own (with
    ``receive_buffer``: SO_RCVBUF, so that it fills quickly), the response
    left unread."""
    host, port = live.root_url.removeprefix("http://").rsplit(":", 1)
    sock = socket.socket()
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    sock.connect((host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n"
        ).encode()
        + payload
    )
    await writer.drain()
    return reader, writer
