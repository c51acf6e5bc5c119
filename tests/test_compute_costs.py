"""Self-hosted cost against real engines: a node's usd_per_hour split among
the requests it served by their share of its busy time, the rest reported
as idle. On a known workload (concurrent requests through the official
SDK, JSON and streams, with pauses between waves), the requests' compute
costs plus the idle cost equal usd_per_hour times the elapsed time within
2 %: on the embedded engine (measured from its batch steps) and on an edge
node (measured there, reported with each answer). Token prices reach the
opt-in x-nomoat-cost-usd header exactly."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MODEL, Server, config_with_key, running_server
from tests.test_edge_routing import edge_node

pytestmark = pytest.mark.e2e

# 3.6 USD an hour: a millidollar a second, so the sums are easy to read.
RATE = 3.6
INPUT, OUTPUT = 0.15, 0.6  # USD per million tokens
PROMPTS = ["Count to twenty.", "Name some colours.", "Tell a short story about a cat."]


Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metrics(root_url: str) -> Metrics:
    text = httpx.get(f"{root_url}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): float(sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(seen: Metrics, name: str, **labels: str) -> float:
    return seen.get((name, tuple(sorted(labels.items()))), 0.0)


def backend_total(seen: Metrics, name: str, backend: str) -> float:
    """``name`` summed over its series of ``backend``."""
    return sum(
        value
        for (sample_name, labels), value in seen.items()
        if sample_name == name and ("backend", backend) in labels
    )


def charged_nano(prompt_tokens: int, completion_tokens: int) -> int:
    # 0.15 USD per million: 150 nano-USD a token; 0.6: 600.
    return prompt_tokens * 150 + completion_tokens * 600


def usd(nano: int) -> str:
    return f"{nano // 10**9}.{nano % 10**9:09d}"


def one_request(client: openai.OpenAI, model: str, index: int) -> None:
    """JSON or stream, by index; the cost the header or the stream's last
    comment gives must be the tokens at the deployment's prices, exactly."""
    prompt = PROMPTS[index % len(PROMPTS)]
    max_tokens = 8 + 12 * (index % 4)
    if index % 2 == 0:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens
        )
        usage = raw.parse().usage
        assert usage is not None
        expected = charged_nano(usage.prompt_tokens, usage.completion_tokens)
        assert raw.headers["x-nomoat-cost-usd"] == usd(expected)
        return
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {client.api_key}"}
    lines: list[str] = []
    with httpx.stream(
        "POST", f"{client.base_url}chat/completions", json=body, headers=headers, timeout=120
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    cost = [line for line in lines if line.startswith(": x-nomoat-cost-usd=")]
    usage_line = [line for line in lines if '"usage"' in line and '"prompt_tokens"' in line][-1]
    usage = httpx.Response(200, content=usage_line[len("data: ") :]).json()["usage"]
    expected = charged_nano(usage["prompt_tokens"], usage["completion_tokens"])
    assert cost == [f": x-nomoat-cost-usd={usd(expected)}"]


def workload(client: openai.OpenAI, model: str) -> None:
    """Three waves of 6 concurrent requests, idle pauses between them."""
    with ThreadPoolExecutor(max_workers=6) as pool:
        for wave in range(3):
            list(pool.map(lambda i: one_request(client, model, i), range(wave, wave + 6)))
            time.sleep(0.7)


def check_conservation(root_url: str, backend: str) -> tuple[float, float]:
    """Requests' compute cost + idle cost == usd_per_hour x tracked time
    (2 %); returns (requests' compute USD, idle USD)."""
    seen = metrics(root_url)
    elapsed = sample(seen, "nomoat_node_tracked_seconds_total", backend=backend)
    requests = backend_total(seen, "nomoat_requests_compute_usd_total", backend)
    idle = sample(seen, "nomoat_node_cost_usd_total", backend=backend, state="idle")
    busy = sample(seen, "nomoat_node_cost_usd_total", backend=backend, state="busy")
    expected = RATE * elapsed / 3600
    assert requests > 0 and idle > 0, (requests, idle)
    assert requests + idle == pytest.approx(expected, rel=0.02), (requests, idle, expected)
    # Every second of busy time reached a request (rounding aside).
    assert requests == pytest.approx(busy, rel=0.01, abs=1e-6)
    return requests, idle


def node_cost_rows(database: Path, backend: str) -> list[tuple[float, float, int, int]]:
    with sqlite3.connect(database) as connection:
        return list(
            connection.execute(
                "SELECT started_at, ended_at, busy_nano, idle_nano FROM node_costs "
                "WHERE backend = ? ORDER BY started_at",
                (backend,),
            )
        )


def check_rows(database: Path, backend: str, requests_usd: float) -> None:
    """node_costs: windows end to end, their busy and idle sum to the price
    over their span, and the busy part is what the requests were charged."""
    rows = node_cost_rows(database, backend)
    assert len(rows) >= 2
    busy = sum(row[2] for row in rows) / 1e9
    idle = sum(row[3] for row in rows) / 1e9
    assert busy == pytest.approx(requests_usd, rel=0.02)
    assert idle > 0


def priced_config(tmp_path: Path, backends: str, model: str, backend: str) -> str:
    """``model`` (and ``short``, the same on ``backend``) at the test's prices."""
    return config_with_key(
        f"""
        [accounting]
        database = "sqlite:///{tmp_path / "accounting.db"}"
        cost_header = true
        node_cost_window_seconds = 1.0

        {backends}

        [models.{model}]
        deployments = [
          {{ backend = "{backend}", model = "{MODEL}", input_usd_per_million = {INPUT}, \
output_usd_per_million = {OUTPUT} }},
        ]

        [models.short]
        deployments = [{{ backend = "{backend}", model = "{MODEL}" }}]
        """
    )


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    tmp = tmp_path_factory.mktemp("costs-embedded")
    backends = f"""
        [backends.embedded]
        type = "llamacpp"
        parallel = 4
        threads = 1
        usd_per_hour = {RATE}
        """
    with running_server(tmp, priced_config(tmp, backends, MODEL, "embedded")) as live:
        yield live, tmp / "accounting.db"


def test_the_embedded_engines_price_is_split_among_requests_and_idle(
    embedded: tuple[Server, Path],
) -> None:
    live, database = embedded
    client = openai.OpenAI(base_url=live.base_url, api_key=live.api_key, max_retries=0)
    workload(client, MODEL)
    requests, _ = check_conservation(live.root_url, "embedded")
    # The windows written so far (one a second) agree with the totals.
    time.sleep(1.2)
    check_rows(database, "embedded", requests)


def test_a_request_pays_for_its_share_of_the_steps(embedded: tuple[Server, Path]) -> None:
    """Alone on the engine, a request is charged the steps it ran: less than
    its whole latency at the rate, and most of it (the rest is HTTP and
    tokenising). Beside a shorter one, a longer one pays more: the steps
    are shared by the tokens each fed (the same prompt: 40 tokens against 8)."""
    live, _ = embedded
    client = openai.OpenAI(base_url=live.base_url, api_key=live.api_key, max_retries=0)
    messages = [{"role": "user", "content": PROMPTS[2]}]
    # No end of generation (<|endoftext|>, <|im_end|>, <reponame>): every
    # token asked for. Sampled, with <|im_end|> alone forbidden, the model
    # could still end early on <|endoftext|>.
    extra = {"logit_bias": {"0": -100, "2": -100, "4": -100}}

    def ask(model: str, max_tokens: int) -> None:
        client.chat.completions.create(
            model=model, messages=messages, max_tokens=max_tokens, extra_body=extra
        )

    def compute(seen: Metrics, model: str) -> float:
        return sample(
            seen, "nomoat_requests_compute_usd_total", backend="embedded", deployment=f"{model}/0"
        )

    before = metrics(live.root_url)
    started = time.monotonic()
    ask(MODEL, 40)
    latency = time.monotonic() - started
    alone = compute(metrics(live.root_url), MODEL) - compute(before, MODEL)
    assert 0.3 * RATE * latency / 3600 < alone <= RATE * latency / 3600

    before = metrics(live.root_url)
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(lambda args: ask(*args), [(MODEL, 40), ("short", 8)]))
    after = metrics(live.root_url)
    long_share = compute(after, MODEL) - compute(before, MODEL)
    short_share = compute(after, "short") - compute(before, "short")
    assert short_share > 0 and long_share > 1.5 * short_share, (long_share, short_share)


@pytest.fixture(scope="module")
def edge_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, int]]:
    tmp = tmp_path_factory.mktemp("costs-edge")
    with edge_node(tmp, "a") as (port, _):
        backends = f"""
            [backends.edge-a]
            type = "edge"
            base_url = "http://127.0.0.1:{port}/v1"
            probe_interval = 0.5
            usd_per_hour = {RATE}
            """
        with running_server(tmp, priced_config(tmp, backends, "edgy", "edge-a")) as live:
            yield live, port


def test_an_edge_nodes_price_is_split_by_what_it_reports(
    edge_gateway: tuple[Server, int],
) -> None:
    live, port = edge_gateway
    client = openai.OpenAI(base_url=live.base_url, api_key=live.api_key, max_retries=0)
    workload(client, "edgy")
    check_conservation(live.root_url, "edge-a")
    # What the node reported with its answers is all its engine's busy time.
    node = metrics(f"http://127.0.0.1:{port}")
    measured = sample(node, "nomoat_engine_busy_seconds_total", backend="engine")
    reported = sample(metrics(live.root_url), "nomoat_engine_busy_seconds_total", backend="edge-a")
    assert reported == pytest.approx(measured, rel=0.02)


def test_an_edge_node_tells_its_busy_time_to_gateways_only_in_a_header_or_comment(
    edge_gateway: tuple[Server, int],
) -> None:
    """The node's answers carry it; the gateway's answers to clients do not."""
    live, port = edge_gateway
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    direct = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
    assert float(direct.headers["x-nomoat-busy-seconds"]) > 0
    with httpx.stream(
        "POST",
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={**body, "stream": True},
        timeout=60,
    ) as response:
        lines = [line for line in response.iter_lines() if line]
    assert lines[-2].startswith(": nomoat-busy-seconds=") and lines[-1] == "data: [DONE]"
    headers = {"Authorization": f"Bearer {live.api_key}"}
    through = httpx.post(
        f"{live.base_url}/chat/completions", json={**body, "model": "edgy"}, headers=headers
    )
    assert through.status_code == 200 and "x-nomoat-busy-seconds" not in through.headers
