"""Deployments' max_concurrency: a full deployment is left out of the
ranking, so the policy tries another; when every deployment is full the
request waits for a slot, at most capacity_wait_seconds, then gets a 503; and
/status and /metrics show the limits and the waits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.backends.openai_compat import OpenAICompatibleBackend
from gateway.catalog import Catalog, ModelEntry, Retry
from gateway.contract import Candidate, Target
from gateway.endpoints import CHAT
from gateway.errors import EngineOverloadedError
from gateway.metrics_state import CapacityState, DeploymentState, ServerState
from gateway.pipeline import Pipeline
from gateway.policies import OrderedPolicy
from gateway.settings import LimitSettings
from gateway.sse import sse_events
from gateway.testing.fake import Script
from gateway.testing.inprocess import in_process_gateway
from tests.scripted_transport import ScriptedTransport, sse_reply
from tests.upstream_kit import ENGINE_MODEL, MODEL, backend, chat_request, context, started

CHUNKS = [
    {
        "id": "chatcmpl-upstream",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": ENGINE_MODEL,
        "choices": [
            {"index": 0, "delta": {"content": "hi"}, "logprobs": None, "finish_reason": "stop"}
        ],
    },
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def gateway(
    backends: Sequence[OpenAICompatibleBackend],
    limits: Sequence[int | None],
    wait: float = 10.0,
) -> Pipeline:
    candidates = tuple(
        Candidate(Target(MODEL, ENGINE_MODEL, f"{MODEL}/{index}"), made.name, max_concurrency=limit)
        for index, (made, limit) in enumerate(zip(backends, limits, strict=True))
    )
    entry = ModelEntry(
        MODEL,
        candidates,
        OrderedPolicy(),
        "test",
        "ordered",
        retry=Retry(rounds=0),
        capacity_wait_seconds=wait,
    )
    return Pipeline(
        LimitSettings(), Catalog({MODEL: entry}), {made.name: made for made in backends}
    )


def transport(streams: int) -> ScriptedTransport:
    return ScriptedTransport(*(sse_reply(CHUNKS) for _ in range(streams)))


async def drain(events: AsyncIterator[Any]) -> bytes:
    """The client's bytes of a stream :meth:`Pipeline.events` started."""
    return b"".join([data async for data in sse_events(events)])


async def until(condition: object, *, loops: int = 1000) -> None:
    for _ in range(loops):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("the condition never held")


@pytest.mark.anyio
async def test_a_full_deployment_is_passed_over_for_the_next() -> None:
    first, second = ScriptedTransport(), ScriptedTransport()
    # Started (probed, ready): two unready deployments would see one held out.
    made = [await started(first, "first"), await started(second, "second")]
    first.add(sse_reply(CHUNKS))
    second.add(sse_reply(CHUNKS))
    pipeline = gateway(made, [1, None])
    try:
        held = await pipeline.events(CHAT, chat_request(stream=True), context())
        # The ordered policy would pick the first again: it is full.
        other = await pipeline.events(CHAT, chat_request(stream=True), context())
        assert len(first.sent) == 2 and len(second.sent) == 2  # a probe, a stream
        assert pipeline.stats.in_flight(f"{MODEL}/0") == 1
        await drain(held)
        await drain(other)
        assert pipeline.stats.in_flight(f"{MODEL}/0") == 0
    finally:
        for one in made:
            await one.aclose()


@pytest.mark.anyio
async def test_when_every_deployment_is_full_a_request_waits_for_a_slot() -> None:
    scripted = transport(2)
    made = backend(scripted)
    pipeline = gateway([made], [1])
    try:
        held = await pipeline.events(CHAT, chat_request(stream=True), context())
        waiting = asyncio.create_task(pipeline.events(CHAT, chat_request(stream=True), context()))
        await until(lambda: pipeline.stats.waiting_for_capacity == 1)
        assert len(scripted.sent) == 1  # not sent while the deployment is full
        assert (await drain(held)).endswith(b"data: [DONE]\n\n")
        events = await asyncio.wait_for(waiting, 5)
        assert len(scripted.sent) == 2
        assert (await drain(events)).endswith(b"data: [DONE]\n\n")
        assert pipeline.stats.capacity_waits == 1 and pipeline.stats.capacity_timeouts == 0
    finally:
        await made.aclose()


@pytest.mark.anyio
async def test_a_wait_for_a_slot_is_bounded() -> None:
    scripted = transport(2)
    made = backend(scripted)
    pipeline = gateway([made], [1], wait=0.02)
    try:
        held = await pipeline.events(CHAT, chat_request(stream=True), context())
        with pytest.raises(EngineOverloadedError) as refused:
            await pipeline.events(CHAT, chat_request(stream=True), context())
        assert refused.value.status_code == 503
        assert refused.value.headers["Retry-After"] == "1"
        assert "max_concurrency" in refused.value.message
        assert len(scripted.sent) == 1
        assert pipeline.stats.capacity_timeouts == 1
        assert pipeline.stats.waiting_for_capacity == 0
        await drain(held)
    finally:
        await made.aclose()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a /metrics page, by name and labels (in any order)."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def labels(**pairs: str) -> frozenset[tuple[str, str]]:
    return frozenset(pairs.items())


def test_metrics_show_limits_in_flight_and_waits() -> None:
    state = ServerState(
        {},
        deployments={
            ("m", "m/0", "b"): DeploymentState(True, 4, max_concurrency=4),
            ("m", "m/1", "c"): DeploymentState(True),
        },
        capacity=CapacityState(waiting=2, waits=3, timeouts=1, worker=1, workers=2),
    )
    found = samples(generate_latest(state).decode())
    m0 = labels(model="m", deployment="m/0", backend="b")
    m1 = labels(model="m", deployment="m/1", backend="c")
    assert found["nomoat_deployment_in_flight", m0] == 4
    assert found["nomoat_deployment_max_concurrency", m0] == 4
    assert ("nomoat_deployment_max_concurrency", m1) not in found
    assert found["nomoat_capacity_waiting", labels()] == 2
    assert found["nomoat_capacity_waits_total", labels()] == 3
    assert found["nomoat_capacity_timeouts_total", labels()] == 1
    assert found["nomoat_worker_info", labels(worker="1")] == 1
    assert found["nomoat_workers", labels()] == 2


@pytest.mark.anyio
async def test_status_and_metrics_show_the_limit_the_load_and_the_wait() -> None:
    config = """
[backends.a]
type = "fake"

[models.m]
deployments = [{ backend = "a", max_concurrency = 1 }]
capacity_wait_seconds = 5
"""
    async with in_process_gateway(config) as gw:
        fake = gw.backend("a")
        fake.script(Script(stall_after=1))
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        async with gw.http.stream("POST", "/v1/chat/completions", json=body) as held:
            assert held.status_code == 200
            waiting = asyncio.create_task(gw.http.post("/v1/chat/completions", json=body))
            status: dict[str, Any] = {}
            for _ in range(1000):
                status = (await gw.http.get("/status")).json()
                if status["waiting_for_capacity"] == 1:
                    break
                await asyncio.sleep(0)
            (deployment,) = status["models"]["m"]
            assert status["waiting_for_capacity"] == 1
            assert (deployment["in_flight"], deployment["max_concurrency"]) == (1, 1)
            found = samples((await gw.http.get("/metrics")).text)
            m0 = labels(model="m", deployment="m/0", backend="a")
            assert found["nomoat_deployment_max_concurrency", m0] == 1
            assert found["nomoat_deployment_in_flight", m0] == 1
            assert found["nomoat_capacity_waiting", labels()] == 1
            fake.calls[0].release()
            assert (await held.aread()).endswith(b"data: [DONE]\n\n")
        answered = await asyncio.wait_for(waiting, 5)
        assert answered.status_code == 200
        assert len(fake.calls) == 2
        found = samples((await gw.http.get("/metrics")).text)
        assert found["nomoat_capacity_waits_total", labels()] == 1
        assert found["nomoat_worker_info", labels(worker="0")] == 1
        assert found["nomoat_workers", labels()] == 1
