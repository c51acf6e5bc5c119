"""Per-deployment stats: latency averages, cooldown, and the ejection cap."""

from __future__ import annotations

from gateway.contract import Candidate, Target
from gateway.stats import StatsTable


def candidate(index: int, backend: str | None = None) -> Candidate:
    return Candidate(Target("m", "e", f"m/{index}"), backend or f"b{index}")


def test_latency_averages_split_first_token_from_per_token_time() -> None:
    table = StatsTable(alpha=0.5)
    table.observe("m/0", ttft=0.1, seconds=1.1, tokens=100)
    stats = table.snapshot([candidate(0)], {})["m/0"]
    assert stats.ewma_ttft == 0.1 and stats.ewma_token_time == 0.01
    table.observe("m/0", ttft=0.3, seconds=0.3 + 0.03 * 10, tokens=10)
    stats = table.snapshot([candidate(0)], {})["m/0"]
    assert abs(stats.ewma_ttft - 0.2) < 1e-9 and abs(stats.ewma_token_time - 0.02) < 1e-9


def test_a_failure_cools_a_deployment_down_and_a_success_restores_it() -> None:
    table = StatsTable(cooldown_seconds=10)
    pool = [candidate(0), candidate(1)]
    table.failed("m/0", now=100.0)
    assert [c.target.deployment for c in table.available(pool, {}, now=105.0)] == ["m/1"]
    assert len(table.available(pool, {}, now=111.0)) == 2
    table.failed("m/0", now=200.0)
    table.succeeded("m/0")
    assert len(table.available(pool, {}, now=201.0)) == 2


def test_at_most_half_a_pool_is_ejected_and_probe_failures_stay_out_longest() -> None:
    table = StatsTable(cooldown_seconds=10, max_ejected_share=0.5)
    pool = [candidate(i) for i in range(4)]
    for index, moment in [(0, 100.0), (1, 101.0), (2, 102.0)]:
        table.failed(f"m/{index}", now=moment)
    left = table.available(pool, {}, now=103.0)
    # Three would be out; two may be: m/0 (soonest to recover) comes back.
    assert [c.target.deployment for c in left] == ["m/0", "m/3"]
    down = table.available(pool, {"b3": False}, now=103.0)
    assert "m/3" not in [c.target.deployment for c in down]
    assert len(down) == 2


def test_in_flight_counts_follow_start_and_finish() -> None:
    table = StatsTable()
    table.started("m/0")
    table.started("m/0")
    table.finished("m/0")
    assert table.snapshot([candidate(0)], {})["m/0"].in_flight == 1


def test_engine_load_is_parsed_from_vllm_metrics_text() -> None:
    from gateway.backends.openai_compat import LOAD_METRICS, parse_load

    text = "\n".join(
        [
            "# HELP vllm:num_requests_running Number of requests in model execution batches.",
            'vllm:num_requests_running{engine="0",model_name="m"} 3.0',
            'vllm:num_requests_running{engine="1",model_name="m"} 1.0',
            'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0',
            'vllm:kv_cache_usage_perc{engine="0",model_name="a b"} 0.25',
            'vllm:num_requests_running_total{engine="0"} 99.0',
        ]
    )
    load = parse_load(text, LOAD_METRICS["vllm"])
    assert (load.running, load.waiting, load.kv_cache_usage) == (4, 2, 0.25)
    assert parse_load("", LOAD_METRICS["edge"]).kv_cache_usage is None
