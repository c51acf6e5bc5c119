"""Faults of an OpenAI-compatible upstream, over real HTTP: a small aiohttp
server on loopback answers as the test says (redirects, held connections,
malformed health and metrics answers), in front of the real gateway run in
process (or the backend alone). It listens on a socket, hence ``e2e``; each
test takes about a second."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from gateway.backends.openai_compat import OpenAICompatibleBackend, OpenAICompatibleConfig
from gateway.testing.inprocess import InProcessGateway, in_process_gateway

pytestmark = [pytest.mark.e2e, pytest.mark.anyio, pytest.mark.timeout(60)]

METRICS = b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
ANSWER = {
    "id": "up",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "from the upstream", "refusal": None},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4},
}
CHUNK = {
    "id": "up",
    "object": "chat.completion.chunk",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": "hi"},
            "logprobs": None,
            "finish_reason": None,
        }
    ],
}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hello"}]}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclass
class Upstream:
    """What the fake upstream does; the test changes it between requests."""

    chat: str = "answer"  # "answer", "redirect", "hold" (a stream held open)
    health: str = "ok"  # "ok", "redirect"
    metrics: bytes | None = METRICS  # None: hang
    metrics_type: str = "text/plain; version=0.0.4"
    release: asyncio.Event = field(default_factory=asyncio.Event)
    holding: asyncio.Event = field(default_factory=asyncio.Event)
    elsewhere: int = 0  # requests that reached a redirect's target
    chats: int = 0
    url: str = ""
    # A held stream's connection was closed by the gateway.
    dropped: asyncio.Event = field(default_factory=asyncio.Event)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        await request.read()
        self.chats += 1
        if self.chat == "redirect":
            raise web.HTTPFound("/elsewhere/v1/chat/completions")
        if self.chat == "hold":
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b"data: " + json.dumps(CHUNK).encode() + b"\n\n")
            self.holding.set()
            while not self.release.is_set():
                transport = request.transport
                if transport is None or transport.is_closing():
                    self.dropped.set()
                    return response
                await asyncio.sleep(0.01)
            await response.write(b"data: [DONE]\n\n")
            return response
        return web.json_response(ANSWER)

    async def redirected(self, request: web.Request) -> web.Response:
        self.elsewhere += 1
        return web.json_response({**ANSWER, "choices": []})

    async def health_check(self, request: web.Request) -> web.Response:
        if self.health == "redirect":
            raise web.HTTPFound("/elsewhere/health")
        return web.Response(text="")

    async def elsewhere_health(self, request: web.Request) -> web.Response:
        self.elsewhere += 1
        return web.Response(text="")

    async def metrics_page(self, request: web.Request) -> web.StreamResponse:
        if self.metrics is None:
            await self.release.wait()  # set when the test ends
        return web.Response(body=self.metrics, headers={"Content-Type": self.metrics_type})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "m", "object": "model"}]})


@asynccontextmanager
async def upstream() -> AsyncIterator[Upstream]:
    state = Upstream()
    app = web.Application()
    app.router.add_post("/v1/chat/completions", state.chat_completions)
    app.router.add_post("/elsewhere/v1/chat/completions", state.redirected)
    app.router.add_get("/health", state.health_check)
    app.router.add_get("/elsewhere/health", state.elsewhere_health)
    app.router.add_get("/metrics", state.metrics_page)
    app.router.add_get("/v1/models", state.models)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    state.url = f"http://127.0.0.1:{port}/v1"
    try:
        yield state
    finally:
        state.release.set()
        await runner.cleanup()


def gateway_config(url: str, **backend: object) -> str:
    options = "\n".join(f"{key} = {json.dumps(value)}" for key, value in backend.items())
    return f"""
[backends.up]
type = "vllm"
base_url = "{url}"
models = ["m"]
probe_interval = 0.05
{options}

[models.m]
deployments = [{{ backend = "up" }}]
retries = 0
"""


@asynccontextmanager
async def gateway(url: str, **backend: object) -> AsyncIterator[InProcessGateway]:
    async with in_process_gateway(gateway_config(url, **backend)) as gw:
        yield gw


# ------------------------------------------------------------ redirects


@pytest.mark.parametrize("stream", [False, True])
async def test_a_redirect_from_the_upstream_is_not_followed(stream: bool) -> None:
    async with upstream() as up, gateway(up.url) as gw:
        up.chat = "redirect"
        answer = await gw.http.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert answer.status_code == 502, answer.text
        assert "redirect (302)" in answer.json()["error"]["message"]
        assert up.elsewhere == 0


async def test_a_health_probe_that_redirects_marks_the_backend_unhealthy() -> None:
    async with upstream() as up:
        up.health = "redirect"
        config = OpenAICompatibleConfig(base_url=up.url, models=("m",), probe_interval=60)
        backend = OpenAICompatibleBackend("up", "vllm", config)
        await backend.start()
        try:
            health = await backend.health()
        finally:
            await backend.aclose()
    assert not health.ready
    assert health.detail == "status 302"
    assert up.elsewhere == 0


# ----------------------------------------------------------------- pool


async def test_waiting_for_a_free_connection_is_load_not_a_failure() -> None:
    """One connection, held by a stream: the next request waits for it at
    most pool_timeout, gets a 503 it may retry, and the deployment is not
    cooled down for it (the connection's own timeouts are longer)."""
    async with (
        upstream() as up,
        gateway(up.url, max_connections=1, pool_timeout=0.2, first_token_timeout=1.0) as gw,
    ):
        up.chat = "hold"
        async with gw.http.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "stream": True}
        ) as held:
            assert held.status_code == 200
            await up.holding.wait()
            busy = await gw.http.post("/v1/chat/completions", json=CHAT)
            assert busy.status_code == 503, busy.text
            assert busy.json()["error"]["code"] == "engine_overloaded"
            assert busy.headers["retry-after"].isdigit()
            assert not gw.runtime.serving().stats.in_cooldown("m/0")
            up.release.set()
            await held.aread()
        up.chat = "answer"
        answer = await gw.http.post("/v1/chat/completions", json=CHAT)
        assert answer.status_code == 200, answer.text


# --------------------------------------------------------------- probes


@asynccontextmanager
async def probed(up: Upstream) -> AsyncIterator[OpenAICompatibleBackend]:
    config = OpenAICompatibleConfig(
        base_url=up.url, models=("m",), probe_interval=0.02, probe_timeout=0.5
    )
    backend = OpenAICompatibleBackend("up", "vllm", config)
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose()


async def wait_for(backend: OpenAICompatibleBackend, ready: bool, seconds: float = 5) -> str:
    """Wait until the backend's health is ``ready`` (it changes only when a
    probe ends: polled at the probe interval); its detail."""
    async with asyncio.timeout(seconds):
        while (health := await backend.health()).ready is not ready:  # noqa: ASYNC110
            await asyncio.sleep(0.02)
    return health.detail


@pytest.mark.parametrize(
    ("metrics", "content_type", "detail"),
    [
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 16, "text/plain", "not UTF-8"),
        (b"x" * (9 * 1024 * 1024), "text/plain", "larger than 8388608 bytes"),
        (METRICS, "text/html; charset=utf-8", "text/html"),
        (
            b"vllm:num_requests_running +Inf\nvllm:num_requests_waiting 0\n",
            "text/plain",
            "does not report",
        ),
        (None, "text/plain", "no answer to the probe"),
    ],
    ids=["garbage", "huge", "html", "infinite", "hang"],
)
async def test_a_malformed_metrics_answer_marks_it_unhealthy_and_the_prober_goes_on(
    metrics: bytes | None, content_type: str, detail: str
) -> None:
    async with upstream() as up, probed(up) as backend:
        await wait_for(backend, True)
        up.metrics, up.metrics_type = metrics, content_type
        assert detail in await wait_for(backend, False)
        up.metrics, up.metrics_type = METRICS, "text/plain; version=0.0.4"
        await wait_for(backend, True)


async def test_the_gateway_routes_around_it_meanwhile() -> None:
    async with upstream() as up:
        config = gateway_config(up.url, probe_timeout=0.5).replace(
            'deployments = [{ backend = "up" }]',
            'deployments = [{ backend = "up" }, { backend = "spare" }]',
        )
        config += '\n[backends.spare]\ntype = "fake"\n'
        async with in_process_gateway(config) as gw:
            backend = gw.runtime.backends["up"]
            assert isinstance(backend, OpenAICompatibleBackend)
            assert (await gw.http.post("/v1/chat/completions", json=CHAT)).status_code == 200
            assert (up.chats, len(gw.backend("spare").calls)) == (1, 0)
            up.metrics = b"\x00\x01garbage"
            await wait_for(backend, False)
            status = (await gw.http.get("/status")).json()
            assert [d["ready"] for d in status["models"]["m"]] == [False, True]
            assert (await gw.http.post("/v1/chat/completions", json=CHAT)).status_code == 200
            assert (up.chats, len(gw.backend("spare").calls)) == (1, 1)
            up.metrics = METRICS
            await wait_for(backend, True)
            assert (await gw.http.post("/v1/chat/completions", json=CHAT)).status_code == 200
            assert up.chats == 2


# ------------------------------------------------------- a silent stream


@pytest.mark.parametrize("typed", [False, True], ids=["relay", "typed"])
async def test_a_stream_silent_past_first_token_timeout_ends_with_an_error_event(
    typed: bool,
) -> None:
    """The relay bounds the gaps with its own idle watch (aiohttp's read
    timer is off for it), the typed path with aiohttp's: both end a stream
    that goes silent after its first chunk with an error event, about
    first_token_timeout after the last chunk, and drop the connection."""
    async with upstream() as up:
        config = gateway_config(up.url, first_token_timeout=0.3)
        if typed:  # a stream time limit: the typed path (the last table is [models.m])
            config += "stream_timeout_seconds = 60\n"
        async with in_process_gateway(config) as gw:
            up.chat = "hold"
            loop = asyncio.get_running_loop()
            async with gw.http.stream(
                "POST", "/v1/chat/completions", json={**CHAT, "stream": True}
            ) as held:
                assert held.status_code == 200
                lines = []
                async for line in held.aiter_lines():
                    if line.startswith("data: "):
                        lines.append((loop.time(), line.removeprefix("data: ")))
    (first_at, first), (error_at, error) = lines
    assert json.loads(first)["choices"][0]["delta"]["content"] == "hi"
    assert "timed out" in json.loads(error)["error"]["message"]
    assert 0.2 < error_at - first_at < 5.0


# ------------------------------------------- a client that leaves a stream


async def test_a_client_that_leaves_a_relayed_stream_closes_the_upstreams_connection() -> None:
    """The relay (the own stream client, sending from the upstream's reads)
    drops the upstream's connection when its client goes away mid-stream,
    which is how vLLM learns to stop generating."""
    async with upstream() as up, gateway(up.url) as gw:
        up.chat = "hold"
        async with gw.http.stream(
            "POST", "/v1/chat/completions", json={**CHAT, "stream": True}
        ) as held:
            assert held.status_code == 200
            async for line in held.aiter_lines():
                if line.startswith("data: "):
                    break
        await asyncio.wait_for(up.dropped.wait(), 5.0)
