"""A client that goes away stops the generation it started, at once."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.testing import FakeCall, Script

from .conftest import Start
from .support import ENDPOINTS, MODEL, USER, body_for, chat_body, pool

pytestmark = pytest.mark.anyio

# How soon after the client left the generation must have stopped.
PROMPTLY = 0.5


async def stopped(call: FakeCall, left_at: float) -> None:
    assert await call.wait_ended(within=PROMPTLY) in ("cancelled", "closed")
    assert call.ended_at is not None and call.ended_at - left_at < PROMPTLY


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_leaving_a_json_request_cancels_its_generation(start: Start, path: str) -> None:
    async with start(pool("a")) as gw:
        gw.backend("a").script(Script(stall_after=0))
        request = asyncio.ensure_future(gw.http.post(path, json=body_for(path)))
        [call] = await gw.backend("a").wait_for_calls(1)
        request.cancel()
        left_at = time.monotonic()
        await stopped(call, left_at)
        # The gateway goes on serving.
        assert (await gw.http.post(path, json=body_for(path))).status_code == 200


async def test_an_sdk_call_its_caller_gives_up_on_cancels_its_generation(start: Start) -> None:
    async with start(pool("a")) as gw:
        gw.backend("a").script(Script(stall_after=0))
        call = asyncio.ensure_future(gw.sdk.chat.completions.create(model=MODEL, messages=USER))
        await gw.backend("a").wait_for_calls(1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(call, timeout=0.01)
        left_at = time.monotonic()
        await stopped(gw.backend("a").calls[0], left_at)


@pytest.mark.parametrize("path", ENDPOINTS)
async def test_leaving_a_stalled_stream_closes_its_generation(start: Start, path: str) -> None:
    async with start(pool("a")) as gw:
        gw.backend("a").script(Script(stall_after=1))
        async with gw.http.stream("POST", path, json=body_for(path, stream=True)) as response:
            first = await anext(response.aiter_lines())
            assert first.startswith("data: {")
        left_at = time.monotonic()
        await stopped(gw.backend("a").calls[0], left_at)


async def test_leaving_a_flowing_stream_stops_it_half_way(start: Start) -> None:
    async with start(pool("a")) as gw:
        gw.backend("a").script(Script(chunks=50, chunk_delay=0.01))
        async with gw.http.stream("POST", "/v1/chat/completions", json=chat_body(stream=True)) as r:
            lines = r.aiter_lines()
            events = [line async for line in _first_events(lines, 3)]
        left_at = time.monotonic()
        call = gw.backend("a").calls[0]
        await stopped(call, left_at)
    assert len(events) == 3 and call.chunks_sent < 50


async def _first_events(lines: object, count: int) -> object:
    seen = 0
    async for line in lines:  # type: ignore[attr-defined]
        if line:
            yield line
            seen += 1
            if seen == count:
                return


async def test_closing_an_sdk_stream_stops_the_generation(start: Start) -> None:
    async with start(pool("a")) as gw:
        gw.backend("a").script(Script(stall_after=2))
        stream = await gw.sdk.chat.completions.create(model=MODEL, messages=USER, stream=True)
        await anext(aiter(stream))
        await stream.close()
        left_at = time.monotonic()
        await stopped(gw.backend("a").calls[0], left_at)


async def test_leaving_a_stream_before_its_first_chunk_cancels_it(start: Start) -> None:
    async with start(pool("a")) as gw:
        gw.backend("a").script(Script(stall_after=0))
        request = asyncio.ensure_future(
            gw.http.post("/v1/chat/completions", json=chat_body(stream=True))
        )
        [call] = await gw.backend("a").wait_for_calls(1)
        request.cancel()
        left_at = time.monotonic()
        try:
            await stopped(call, left_at)
        finally:
            call.release()


async def test_a_stream_read_to_the_end_is_not_cut(start: Start) -> None:
    async with start(pool("a")) as gw:
        response = await gw.http.post("/v1/chat/completions", json=chat_body(stream=True))
        assert response.text.endswith("data: [DONE]\n\n")
        assert gw.backend("a").calls[0].outcome == "streamed"
