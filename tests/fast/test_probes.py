"""The prober of OpenAI-compatible backends (vLLM, edge nodes, hosted APIs)
against malformed answers: each marks the backend unhealthy, and the prober
carries on (a good answer makes it ready again). The upstream's GETs are
scripted here; tests/test_upstream_faults.py sends the same over real HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from gateway.backends.openai_compat import (
    LOAD_METRICS,
    OpenAICompatibleBackend,
    OpenAICompatibleConfig,
    checked_load,
    metrics_text,
)
from gateway.errors import UpstreamError

pytestmark = pytest.mark.anyio

PROM = "text/plain; version=0.0.4"
GOOD = b"nomoat_engine_requests_running 1\nnomoat_engine_requests_waiting 2\n"
Reply = tuple[int, str, bytes]


class Script:
    """What the upstream answers to /health and /metrics, changed at will."""

    def __init__(self) -> None:
        self.health: Reply = (200, "application/json", b'{"status":"ok"}')
        self.metrics: Reply | Callable[[], Reply] = (200, PROM, GOOD)
        self.hang = False
        self.calls = 0
        self.seen = asyncio.Event()

    async def probe(self, path: str, headers: object = None) -> Reply:
        self.calls += 1
        self.seen.set()
        if self.hang:
            await asyncio.Event().wait()
        if path.endswith("/health"):
            return self.health
        metrics = self.metrics
        return metrics() if callable(metrics) else metrics


@asynccontextmanager
async def edge(script: Script) -> AsyncIterator[OpenAICompatibleBackend]:
    config = OpenAICompatibleConfig(
        base_url="http://edge.test/v1", models=("m",), probe_interval=0.005, probe_timeout=0.05
    )
    backend = OpenAICompatibleBackend("e", "edge", config)
    backend._upstream.probe = script.probe  # type: ignore[method-assign]
    await backend.start()
    try:
        yield backend
    finally:
        await backend.aclose()


async def probes(script: Script, count: int = 2) -> None:
    """Wait until the prober has run ``count`` more probes."""
    for _ in range(count):
        script.seen.clear()
        await asyncio.wait_for(script.seen.wait(), timeout=2)
    await asyncio.sleep(0)


@pytest.mark.parametrize(
    ("reply", "detail"),
    [
        ((200, PROM, b"\xff\xfe\x00garbage"), "not UTF-8"),
        (
            (200, PROM, b"<html>Bad Gateway</html>"),
            "does not report nomoat_engine_requests_running",
        ),
        ((200, "text/html", GOOD), "text/html"),
        ((200, "", GOOD), "no content type"),
        ((500, PROM, GOOD), "status 500"),
        (
            (200, PROM, b"nomoat_engine_requests_running +Inf\nnomoat_engine_requests_waiting 1\n"),
            "does not report nomoat_engine_requests_running",
        ),
        (
            (200, PROM, b"nomoat_engine_requests_running NaN\nnomoat_engine_requests_waiting 1\n"),
            "does not report",
        ),
    ],
)
async def test_a_malformed_metrics_answer_marks_it_unhealthy_until_a_good_one(
    reply: Reply, detail: str
) -> None:
    script = Script()
    async with edge(script) as backend:
        assert (await backend.health()).ready
        assert (backend.load().running, backend.load().waiting) == (1, 2)
        script.metrics = reply
        await probes(script)
        health = await backend.health()
        assert not health.ready and detail in health.detail
        script.metrics = (200, PROM, GOOD)
        await probes(script)
        assert (await backend.health()).ready


async def test_a_probe_that_raises_anything_does_not_end_the_prober() -> None:
    script = Script()

    def broken() -> Reply:
        raise RuntimeError("a bug of the reply's own")

    async with edge(script) as backend:
        script.metrics = broken
        await probes(script, 3)
        health = await backend.health()
        assert not health.ready and "a bug of the reply's own" in health.detail
        script.metrics = (200, PROM, GOOD)
        await probes(script)
        assert (await backend.health()).ready


async def test_a_probe_that_hangs_times_out_and_the_prober_goes_on() -> None:
    script = Script()
    async with edge(script) as backend:
        script.hang = True
        await probes(script, 2)  # the second probe started: the first one ended
        health = await backend.health()
        assert not health.ready and "no answer to the probe" in health.detail
        script.hang = False
        await probes(script)
        assert (await backend.health()).ready


async def test_an_upstream_error_on_health_marks_it_unhealthy() -> None:
    script = Script()

    async def unreachable(path: str, headers: object = None) -> Reply:
        script.seen.set()
        raise UpstreamError("backend e: the answer to GET /health is larger than 8388608 bytes")

    async with edge(script) as backend:
        backend._upstream.probe = unreachable  # type: ignore[method-assign]
        await probes(script)
        assert "larger than" in (await backend.health()).detail


def test_metrics_are_read_only_from_prometheus_text() -> None:
    names = LOAD_METRICS["vllm"]
    text = metrics_text(200, "text/plain; version=1.0.0; charset=utf-8", b"")
    assert text == ""
    assert metrics_text(200, "application/openmetrics-text; version=1.0.0", b"x") == "x"
    vllm = (
        'vllm:num_requests_running{model_name="m"} 3.0\n'
        'vllm:num_requests_waiting{model_name="m"} 0.0\n'
        'vllm:kv_cache_usage_perc{model_name="m"} 0.25\n'
    )
    load = checked_load(vllm, names)
    assert (load.running, load.waiting, load.kv_cache_usage) == (3, 0, 0.25)
    with pytest.raises(ValueError, match="vllm:num_requests_waiting"):
        checked_load(vllm.replace("waiting", "queued"), names)
