"""A request is in flight until its last byte, its error or its
cancellation, and ``GET /status`` shows each deployment's count; a stream
has a total-duration limit of its own."""

from __future__ import annotations

import asyncio
import time

import pytest

from gateway.errors import UpstreamError
from gateway.testing import Script
from gateway.testing.inprocess import InProcessGateway

from .conftest import Start
from .support import MODEL, chat_body, error_of, pool, sse_json

pytestmark = pytest.mark.anyio


async def in_flight(gw: InProcessGateway) -> list[int]:
    status = (await gw.http.get("/status")).json()
    return [deployment["in_flight"] for deployment in status["models"][MODEL]]


async def settled(gw: InProcessGateway, expected: list[int]) -> list[int]:
    """The counts once they reach ``expected`` (a second at most): the
    gateway finishes its bookkeeping just after the client's last byte."""
    async with asyncio.timeout(1):
        # Polled: what /status shows is the point, not an event inside.
        while (counts := await in_flight(gw)) != expected:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
    return counts


async def test_status_shows_zero_in_flight_when_idle(start: Start) -> None:
    async with start(pool("a", "b")) as gw:
        assert await in_flight(gw) == [0, 0]


async def test_a_json_request_is_in_flight_until_it_is_answered(start: Start) -> None:
    async with start(pool("a", "b")) as gw:
        gw.backend("a").script(Script(stall_after=0))
        request = asyncio.ensure_future(gw.http.post("/v1/chat/completions", json=chat_body()))
        [call] = await gw.backend("a").wait_for_calls(1)
        assert await in_flight(gw) == [1, 0]
        call.release()
        assert (await request).status_code == 200
        assert await settled(gw, [0, 0]) == [0, 0]


async def test_a_stream_is_in_flight_until_its_last_byte(start: Start) -> None:
    async with start(pool("a", "b")) as gw:
        gw.backend("a").script(Script(stall_after=2))
        async with gw.http.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True)
        ) as response:
            lines = response.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
            call = gw.backend("a").calls[0]
            assert await in_flight(gw) == [1, 0]
            call.release()
            rest = [line async for line in lines]
        assert "data: [DONE]" in rest
        assert await settled(gw, [0, 0]) == [0, 0]


async def test_a_stream_that_fails_half_way_is_no_longer_in_flight(start: Start) -> None:
    async with start(pool("a", "b")) as gw:
        gw.backend("a").script(Script(stall_after=2, error=UpstreamError("cut"), error_after=3))
        async with gw.http.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True)
        ) as response:
            lines = response.aiter_lines()
            await anext(lines)
            assert await in_flight(gw) == [1, 0]
            gw.backend("a").calls[0].release()
            rest = [line async for line in lines if line]
        assert rest[-1].startswith('data: {"error"')
        assert await settled(gw, [0, 0]) == [0, 0]


async def test_a_stream_the_client_left_is_no_longer_in_flight(start: Start) -> None:
    async with start(pool("a", "b")) as gw:
        gw.backend("a").script(Script(stall_after=2))
        async with gw.http.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True)
        ) as response:
            await anext(response.aiter_lines())
            assert await in_flight(gw) == [1, 0]
        assert await gw.backend("a").calls[0].wait_ended() in ("cancelled", "closed")
        assert await settled(gw, [0, 0]) == [0, 0]


async def test_least_outstanding_sees_a_long_stream_as_load(start: Start) -> None:
    async with start(pool("a", "b", policy="least-outstanding")) as gw:
        gw.backend("a").script(Script(stall_after=2))
        async with gw.http.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True)
        ) as response:
            await anext(response.aiter_lines())
            # a is busy with the open stream: the next request goes to b.
            await gw.http.post("/v1/chat/completions", json=chat_body())
            assert len(gw.backend("b").calls) == 1
            gw.backend("a").calls[0].release()


# ------------------------------------------------------------ stream duration


async def test_a_stream_longer_than_its_limit_ends_with_a_timeout_error(start: Start) -> None:
    limit = 0.15
    async with start(pool("a", stream_timeout_seconds=limit)) as gw:
        gw.backend("a").script(Script(chunks=100, chunk_delay=0.01))
        started = time.monotonic()
        response = await gw.http.post("/v1/chat/completions", json=chat_body(stream=True))
        elapsed = time.monotonic() - started
        events, done = sse_json(response.content)
        call = gw.backend("a").calls[0]
        assert await call.wait_ended() in ("cancelled", "closed")
    assert not done
    assert set(events[-1]) == {"error"} and events[-1]["error"]["code"] == "timeout"
    assert limit <= elapsed < limit + 0.2
    assert call.chunks_sent < 100


async def test_a_stream_within_its_limit_ends_well(start: Start) -> None:
    async with start(pool("a", stream_timeout_seconds=1.0)) as gw:
        gw.backend("a").script(Script(chunks=5, chunk_delay=0.01))
        response = await gw.http.post("/v1/chat/completions", json=chat_body(stream=True))
        _, done = sse_json(response.content)
    assert done


async def test_the_stream_limit_counts_from_the_requests_arrival(start: Start) -> None:
    async with start(pool("a", stream_timeout_seconds=0.2)) as gw:
        # 0.15 s before the first chunk, then 0.1 s of chunks: 0.25 s in all.
        gw.backend("a").script(Script(delay=0.15, chunks=10, chunk_delay=0.01))
        response = await gw.http.post("/v1/chat/completions", json=chat_body(stream=True))
        events, done = sse_json(response.content)
    assert not done and events[-1]["error"]["code"] == "timeout"


async def test_the_stream_limit_does_not_apply_to_json_answers(start: Start) -> None:
    async with start(pool("a", stream_timeout_seconds=0.05)) as gw:
        gw.backend("a").script(Script(delay=0.1))
        response = await gw.http.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 200


async def test_timeout_seconds_still_bounds_a_streams_first_chunk(start: Start) -> None:
    model = {"stream_timeout_seconds": 5.0, "timeout_seconds": 0.1, "retries": 0}
    async with start(pool("a", **model)) as gw:
        gw.backend("a").script(Script(stall_after=0))
        response = await gw.http.post("/v1/chat/completions", json=chat_body(stream=True))
        error_of(response, 504)
