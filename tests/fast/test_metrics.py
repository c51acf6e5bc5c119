"""/metrics scraped and parsed with prometheus-client's text parser: the GenAI
histograms count the requests sent (with the conventions' buckets), the
request counters split by status class, retries, fallbacks, cooldowns and
hook time are counted, and no label outside the allowed set ever appears
(nothing a client writes becomes a label)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from gateway.errors import UpstreamError
from gateway.metrics_names import (
    DURATION_BUCKETS,
    GENAI_LABELS,
    NOMOAT_LABELS,
    TOKEN_BUCKETS,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
)
from gateway.testing import Script
from gateway.testing.inprocess import InProcessGateway

from .conftest import Start
from .support import MODEL, chat_body, completion_body, config, error_of, pool, sse_json

pytestmark = pytest.mark.anyio

# Labels of the metrics nomoat had before (engines, adapters, hooks), and the
# histograms' own.
STATE_LABELS = ("le",)
ALLOWED = {*GENAI_LABELS, *NOMOAT_LABELS, *STATE_LABELS}
Samples = dict[str, list[tuple[dict[str, str], float]]]


async def scrape(gw: InProcessGateway) -> tuple[str, Samples]:
    response = await gw.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return response.text, samples


def families(text: str) -> Iterable[Metric]:
    return text_string_to_metric_families(text)


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        value
        for found, value in samples.get(name, [])
        if all(found.get(key) == wanted for key, wanted in labels.items())
    )


def buckets(samples: Samples, name: str) -> list[float]:
    bounds = sorted({float(labels["le"]) for labels, _ in samples[f"{name}_bucket"]})
    return [bound for bound in bounds if bound != float("inf")]


async def settled(gw: InProcessGateway, name: str, expected: float, **labels: str) -> Samples:
    """The samples once ``name`` reaches ``expected`` (a second at most): a
    stream is counted just after its last byte reached the client."""
    async with asyncio.timeout(1):
        while True:
            _, samples = await scrape(gw)
            if total(samples, name, **labels) == expected:
                return samples
            await asyncio.sleep(0.005)


def assert_bounded(text: str) -> None:
    for family in families(text):
        for sample in family.samples:
            assert set(sample.labels) <= ALLOWED, (sample.name, sample.labels)


async def test_the_histograms_count_the_requests_sent(start: Start) -> None:
    async with start(pool("a", "b")) as gw:
        answers = 3
        streams = 2
        for _ in range(answers):
            response = await gw.http.post("/v1/chat/completions", json=chat_body())
            assert response.status_code == 200
        output_tokens = response.json()["usage"]["completion_tokens"]
        for _ in range(streams):
            response = await gw.http.post(
                "/v1/completions", json=completion_body(stream=True, max_tokens=8)
            )
            assert response.status_code == 200
        sent = answers + streams
        samples = await settled(gw, "nomoat_requests_total", sent, status_class="2xx")
        text, _ = await scrape(gw)
    assert_bounded(text)
    server = "gen_ai_server_request_duration_seconds"
    assert total(samples, f"{server}_count") == sent
    assert total(samples, f"{server}_count", gen_ai_operation_name="chat") == answers
    assert total(samples, f"{server}_count", gen_ai_operation_name="text_completion") == streams
    assert total(samples, f"{server}_count", gen_ai_request_model=MODEL) == sent
    client = "gen_ai_client_operation_duration_seconds"
    assert total(samples, f"{client}_count", gen_ai_provider_name="fake") == sent
    assert total(samples, f"{client}_count", error_type="") == sent
    # Time to first token and per output token: streams only (a JSON answer's
    # first token is not seen by the gateway).
    assert total(samples, "gen_ai_server_time_to_first_token_seconds_count") == streams
    assert total(samples, "gen_ai_server_time_per_output_token_seconds_count") == streams
    tokens = "gen_ai_client_token_usage"
    assert total(samples, f"{tokens}_count", gen_ai_token_type="input") == sent
    assert total(samples, f"{tokens}_count", gen_ai_token_type="output") == sent
    # The fake counts 5 prompt tokens per request.
    assert total(samples, f"{tokens}_sum", gen_ai_token_type="input") == 5 * sent
    assert total(
        samples, f"{tokens}_sum", gen_ai_operation_name="chat", gen_ai_token_type="output"
    ) == (answers * output_tokens)
    assert total(samples, "nomoat_requests_total", deployment="m/0", backend="a") == sent
    assert total(samples, "nomoat_requests_in_flight") == 0
    # The conventions' advised boundaries.
    assert buckets(samples, server) == list(DURATION_BUCKETS)
    assert buckets(samples, client) == list(DURATION_BUCKETS)
    assert buckets(samples, tokens) == [float(b) for b in TOKEN_BUCKETS]
    assert buckets(samples, "gen_ai_server_time_to_first_token_seconds") == list(TTFT_BUCKETS)
    assert buckets(samples, "gen_ai_server_time_per_output_token_seconds") == list(TPOT_BUCKETS)


async def test_errors_count_by_status_class_and_a_clients_model_name_is_no_label(
    start: Start,
) -> None:
    async with start(pool("a")) as gw:
        unknown = "no-such-model-4f9c1d"
        error_of(await gw.http.post("/v1/chat/completions", json=chat_body(model=unknown)), 404)
        error_of(await gw.http.post("/v1/chat/completions", json={"model": MODEL}), 400)
        gw.backend("a").script(
            Script(error=UpstreamError("down")), Script(error=UpstreamError("down"))
        )
        error_of(await gw.http.post("/v1/chat/completions", json=chat_body()), 502)
        text, samples = await scrape(gw)
    assert unknown not in text
    assert_bounded(text)
    assert total(samples, "nomoat_requests_total", status_class="4xx") == 2
    assert total(samples, "nomoat_requests_total", status_class="5xx", model=MODEL) == 1
    server = "gen_ai_server_request_duration_seconds_count"
    assert total(samples, server, error_type="upstream_error") == 1
    assert total(samples, server, error_type="model_not_found") == 1
    # Two attempts (a retry round), both failed.
    client = "gen_ai_client_operation_duration_seconds_count"
    assert total(samples, client, error_type="upstream_error", deployment="m/0") == 2
    assert total(samples, "nomoat_retries_total", model=MODEL) == 1
    assert total(samples, "nomoat_requests_in_flight") == 0


async def test_cooldowns_and_fallbacks_are_counted(start: Start) -> None:
    backends: dict[str, dict[str, object]] = {"a": {}, "b": {}, "f": {}}
    models: dict[str, dict[str, object]] = {
        MODEL: {
            "deployments": [{"backend": "a"}, {"backend": "b"}],
            "fallbacks": ["f"],
            "retries": 0,
        },
        "f": {"deployments": [{"backend": "f"}]},
    }
    async with start(config(backends, models)) as gw:
        gw.backend("a").script(Script(error=UpstreamError("down")))
        gw.backend("b").script(Script(error=UpstreamError("down")))
        response = await gw.http.post("/v1/chat/completions", json=chat_body())
        assert response.status_code == 200
        text, samples = await scrape(gw)
    assert_bounded(text)
    assert total(samples, "nomoat_cooldowns_total", model=MODEL, deployment="m/0") == 1
    assert total(samples, "nomoat_cooldowns_total", model=MODEL, deployment="m/1") == 1
    assert total(samples, "nomoat_deployment_cooling_down", deployment="m/0") == 1
    assert total(samples, "nomoat_fallbacks_total", model=MODEL, fallback="f") == 1
    assert total(samples, "nomoat_requests_total", model=MODEL, deployment="f/0") == 1


async def test_hook_time_is_observed_per_hook_and_stage(start: Start) -> None:
    hooks = [{"type": "shout", "name": "loud"}, {"type": "errors", "name": "watcher"}]
    async with start(pool("a", hooks=hooks)) as gw:
        assert (await gw.http.post("/v1/chat/completions", json=chat_body())).status_code == 200
        error_of(await gw.http.post("/v1/chat/completions", json={"model": MODEL}), 400)
        text, samples = await scrape(gw)
    assert_bounded(text)
    hook = "nomoat_hook_duration_seconds_count"
    assert total(samples, hook, hook="loud", stage="response") == 1
    assert total(samples, hook, hook="watcher", stage="error") == 1


async def test_a_stream_cut_by_the_client_is_a_499(start: Start) -> None:
    async with start(pool("a")) as gw:
        gw.backend("a").script(Script(stall_after=2))
        async with gw.http.stream(
            "POST", "/v1/chat/completions", json=chat_body(stream=True)
        ) as response:
            lines = response.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
        samples = await settled(gw, "nomoat_requests_total", 1, status_class="4xx")
        usage = {"include_usage": True}
        whole = await gw.http.post(
            "/v1/chat/completions", json=chat_body(stream=True, stream_options=usage)
        )
        events, done = sse_json(whole.content)
        assert done and events
        samples = await settled(gw, "nomoat_requests_total", 1, status_class="2xx")
    server = "gen_ai_server_request_duration_seconds_count"
    assert total(samples, server, error_type="client_closed_request") == 1
    # The cut stream's output tokens are counted (one content chunk reached
    # the client before the stall), its input tokens unknown; the whole
    # stream's come from its usage.
    tokens = "gen_ai_client_token_usage"
    assert total(samples, f"{tokens}_count", gen_ai_token_type="output") == 2
    assert total(samples, f"{tokens}_count", gen_ai_token_type="input") == 1
    whole_output = events[-1]["usage"]["completion_tokens"]
    assert total(samples, f"{tokens}_sum", gen_ai_token_type="output") == whole_output + 1
    # Time to first token: the whole stream only.
    assert total(samples, "gen_ai_server_time_to_first_token_seconds_count") == 1
    assert total(samples, "nomoat_requests_in_flight") == 0


async def test_the_metrics_can_be_switched_off(start: Start) -> None:
    async with start(pool("a") + "\n[metrics]\nenabled = false\n") as gw:
        assert (await gw.http.post("/v1/chat/completions", json=chat_body())).status_code == 200
        text, samples = await scrape(gw)
    assert "gen_ai_" not in text and "nomoat_requests_total" not in text
    # The server's state is still there.
    assert total(samples, "nomoat_deployment_up", deployment="m/0") == 1


async def test_an_answer_from_a_hook_counts_under_its_model_and_no_deployment(
    start: Start,
) -> None:
    hooks = [{"type": "answer-early", "options": {"text": "cached"}}]
    async with start(pool("a", hooks=hooks)) as gw:
        assert (await gw.http.post("/v1/chat/completions", json=chat_body())).status_code == 200
        streamed = await gw.http.post("/v1/chat/completions", json=chat_body(stream=True))
        assert streamed.status_code == 200
        samples = await settled(gw, "nomoat_requests_total", 2, status_class="2xx")
    assert total(samples, "nomoat_requests_total", model=MODEL, deployment="") == 2
    # No upstream was called.
    assert total(samples, "gen_ai_client_operation_duration_seconds_count") == 0
    assert gw.backend("a").calls == []
