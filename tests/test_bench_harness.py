"""The gateway-overhead benchmark's machinery, run briefly so it cannot rot:
the fake upstream, the bare proxy and nomoat in front of the fake (two vllm
deployments, API key), through the real openai SDK and the benchmark's own
raw client, the relay check, and a one-second wrk run if wrk is installed.
No LiteLLM, nothing pinned; a few seconds in all.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "loadtests"))

import bench_overhead as bench  # noqa: E402

# A few seconds on a quiet machine; generous for a busy one.
pytestmark = pytest.mark.timeout(120)
DELAY_MS = 20.0


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, bench.Target]]:
    workdir = tmp_path_factory.mktemp("overhead")
    try:
        upstream = [bench.free_port(), bench.free_port()]
        fake = bench.start_fake("fake", upstream, workdir, None, DELAY_MS)
        bare_port, nomoat_port = bench.free_port(), bench.free_port()
        bare = bench.start_bare(upstream[0], bare_port, workdir, None)
        nomoat = bench.start_nomoat(upstream, nomoat_port, workdir, None)
        yield {
            "direct": bench.Target("direct", upstream[1], fake),
            "bare": bench.Target("bare", bare_port, bare),
            "nomoat": bench.Target("nomoat", nomoat_port, nomoat, bench.auth_headers()),
        }
    finally:
        bench.stop_all()


def sdk(target: bench.Target) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"http://127.0.0.1:{target.port}/v1",
        api_key=bench.API_KEY,
        max_retries=0,
        timeout=10,
    )


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["direct", "bare", "nomoat"])
def test_each_path_answers_the_openai_sdk(paths: dict[str, bench.Target], name: str) -> None:
    client = sdk(paths[name])
    reply = client.chat.completions.create(
        model=bench.MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=8
    )
    assert reply.choices[0].message.content == "Hello from the fake upstream."
    assert reply.usage is not None and reply.usage.completion_tokens == 6

    stream = client.chat.completions.create(
        model=bench.MODEL,
        messages=[{"role": "user", "content": "Hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the fake upstream."
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == 18


@pytest.mark.e2e
def test_the_fake_looks_like_vllm_to_probes(paths: dict[str, bench.Target]) -> None:
    port = paths["direct"].port
    status, metrics = bench.request_once(port, "GET", "/metrics", b"", {})
    assert status == 200 and b"vllm:num_requests_running" in metrics
    assert bench.request_once(port, "GET", "/health", b"", {})[0] == 200
    models = sdk(paths["direct"]).models.list()
    assert [m.id for m in models.data] == [bench.MODEL, bench.SLOW_MODEL]


@pytest.mark.e2e
def test_nomoat_refuses_a_request_without_the_key(paths: dict[str, bench.Target]) -> None:
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"http://127.0.0.1:{paths['nomoat'].port}/v1",
            api_key="sk-wrong-0123456789abcdef",
            max_retries=0,
        ).chat.completions.create(model=bench.MODEL, messages=[{"role": "user", "content": "x"}])


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["direct", "bare", "nomoat"])
def test_stream_timing_and_relay_check(paths: dict[str, bench.Target], name: str) -> None:
    timed = bench.stream_ttfc(paths[name], 5)
    assert len(timed.ttfc_ms) == 5 and 0 < timed.p50_ms < 1000
    # Six content chunks, DELAY_MS apart upstream, arrive as spread out. On a
    # busy machine one run can see two chunks land together after the process
    # was descheduled; a gateway that buffers never spreads them, so one spread
    # run in three proves the relay.
    runs = [bench.relay_check(paths[name], DELAY_MS, count=1) for _ in range(3)]
    relay = next((run for run in runs if run.relayed), runs[0])
    assert relay.relayed, runs
    assert len(relay.gaps_ms) == 5 and relay.spread_ms >= 4 * DELAY_MS


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_a_short_wrk_run_measures_requests_and_cpu(
    paths: dict[str, bench.Target], tmp_path: Path
) -> None:
    result = bench.run_wrk(paths["nomoat"], 2, 1, tmp_path)
    assert result.requests > 10 and result.errors == 0
    assert result.cpu_ms_per_request is not None and result.cpu_ms_per_request > 0
    assert 0 < result.p50_ms <= result.p99_ms


def test_the_report_shows_every_path_and_the_targets() -> None:
    def wrk(p50: float, rps: int, cpu: float) -> bench.WrkResult:
        return bench.WrkResult(rps, 1.0, p50, p50 * 2, p50, 0, cpu, 0.0)

    round_ = bench.Round()
    for name, p50, rps, cpu in (
        ("direct", 0.05, 30000, 0.01),
        ("bare", 0.4, 4000, 0.2),
        ("nomoat", 0.5, 3000, 0.3),
        ("litellm", 8.0, 120, 8.0),
    ):
        round_.c1[name] = wrk(p50, rps, cpu)
        round_.c32[name] = wrk(p50, rps, cpu)
        round_.stream[name] = bench.StreamResult([p50], 0.0)
    relay = bench.RelayResult(9, [20.0] * 5, 20.0, 100.0, True)
    rows = bench.summarise([round_], list(round_.c1), {"nomoat": relay})
    text = bench.table(rows, 32) + "\n" + bench.ratios_and_targets(rows, DELAY_MS)
    assert "| litellm | 8.000 |" in text
    assert "added latency p50 <= 0.6 ms at c=1: 0.450 ms, met" in text
    assert "requests/s >= 20x LiteLLM's: 3,000 vs 120 (25.00x), met" in text
