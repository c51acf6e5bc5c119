"""What one request may make an engine do is bounded before any engine sees
it (limits.max_choices, max_stop_length, max_tokens_ceiling), and requests
past limits.max_requests in progress are shed with 503 + Retry-After while
/health still answers (gateway/shedding.py)."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from litestar.types import Receive, Scope, Send

from gateway.shedding import RequestShedder
from gateway.testing.inprocess import ASGIStreamTransport

from .conftest import Start
from .support import ENDPOINTS, body_for, chat_body, completion_body, error_of, pool

pytestmark = pytest.mark.anyio


# ------------------------------------------------------- per request


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_a_stop_sequence_longer_than_the_limit_is_refused(start: Start, path: str) -> None:
    """Before, any length was accepted, and engines match every stop sequence
    against held-back text after each token."""
    async with start(pool("a", limits={"max_stop_length": 16})) as gw:
        fits = await gw.http.post(path, json=body_for(path, stop=["x" * 16]))
        refused = await gw.http.post(path, json=body_for(path, stop=["ok", "y" * 17]))
        single = await gw.http.post(path, json=body_for(path, stop="z" * 100_000))
    assert fits.status_code == 200, fits.text
    for response in (refused, single):
        error = error_of(response, 400)
        assert error["param"] == "stop"
        assert "at most 16" in error["message"]
    assert len(gw.backend("a").calls) == 1


async def test_prompts_times_n_is_bounded(start: Start) -> None:
    """Before, a completion request could ask for (prompts x n) generations
    with n within limits.max_n but any number of prompts."""
    config = pool("a", limits={"max_n": 4, "max_choices": 6}, fakes={"a": {"max_n": 4}})
    async with start(config) as gw:
        fits = await gw.http.post(
            "/v1/completions", json=completion_body(prompt=["a", "b", "c"], n=2)
        )
        too_many = await gw.http.post(
            "/v1/completions", json=completion_body(prompt=["a", "b", "c"], n=3)
        )
        prompts = await gw.http.post("/v1/completions", json=completion_body(prompt=["p"] * 7))
        token_ids = await gw.http.post(
            "/v1/completions", json=completion_body(prompt=[1, 2, 3, 4, 5, 6, 7], n=4)
        )
    assert fits.status_code == 200, fits.text
    assert token_ids.status_code == 200, token_ids.text  # one prompt, as token ids
    for response in (too_many, prompts):
        error = error_of(response, 400)
        assert error["param"] == "prompt"
        assert "at most 6" in error["message"]


@pytest.mark.parametrize("param", ["max_tokens", "max_completion_tokens"])
async def test_a_completion_budget_above_the_ceiling_is_refused(start: Start, param: str) -> None:
    async with start(pool("a", limits={"max_tokens_ceiling": 100})) as gw:
        fits = await gw.http.post("/v1/chat/completions", json=chat_body(**{param: 100}))
        refused = await gw.http.post("/v1/chat/completions", json=chat_body(**{param: 101}))
    assert fits.status_code == 200, fits.text
    error = error_of(refused, 400)
    assert error["param"] == param
    assert "at most 100" in error["message"]


# --------------------------------------------------------- shedding


class _SlowApp:
    """Answers probes at once, the rest once ``release`` is set; counts the
    requests it saw."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.held = asyncio.Event()
        self.seen = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.seen += 1
        if scope["path"] not in ("/health", "/ready"):
            if self.seen == 2:
                self.held.set()
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})


async def test_requests_past_the_limit_are_shed_and_health_still_answers() -> None:
    app = _SlowApp()
    shedder = RequestShedder(app, max_requests=2)  # type: ignore[arg-type]
    transport = ASGIStreamTransport(shedder)  # type: ignore[arg-type]
    async with httpx.AsyncClient(transport=transport, base_url="http://gateway") as client:
        held = [asyncio.ensure_future(client.post("/v1/chat/completions")) for _ in range(2)]
        await app.held.wait()
        shed = await client.post("/v1/chat/completions")
        health = await client.get("/health")
        ready = await client.get("/ready")
        app.release.set()
        assert [r.status_code for r in await asyncio.gather(*held)] == [200, 200]
        after = await client.post("/v1/chat/completions")
    assert shed.status_code == 503
    assert shed.headers["retry-after"] == "1"
    assert shed.headers["connection"] == "close"
    assert json.loads(shed.content)["error"] == {
        "message": "The gateway is overloaded: too many requests are in progress. Retry later.",
        "type": "server_error",
        "param": None,
        "code": "server_overloaded",
    }
    assert health.status_code == ready.status_code == after.status_code == 200
    assert app.seen == 5  # the shed request never reached the app
    assert shedder.in_progress == 0
    assert shedder.shed == 1
