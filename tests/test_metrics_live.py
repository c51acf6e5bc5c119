"""/metrics and the access log of a real ``nomoat serve`` with the embedded
llama.cpp engine: the GenAI histograms count the requests and add up the
tokens the engine reported (and those a cut stream generated), the engine's
own gauges are there, no label is outside the allowed set, and the access log
has one line per request."""

from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.telemetry.semconv import GENAI_LABELS, NOMOAT_LABELS
from tests.conftest import MODEL, Server, config_with_key, running_server

pytestmark = pytest.mark.e2e

Samples = dict[str, list[tuple[dict[str, str], float]]]
QUESTION = [{"role": "user", "content": "Count from one to twenty, in words."}]


def scrape(server: Server) -> Samples:
    text = httpx.get(f"{server.root_url}/metrics", timeout=30).text
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            assert set(sample.labels) <= {*GENAI_LABELS, *NOMOAT_LABELS, "le"}, sample
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    return sum(
        value
        for found, value in samples.get(name, [])
        if all(found.get(key) == wanted for key, wanted in labels.items())
    )


def wait_for(server: Server, name: str, value: float, **labels: str) -> Samples:
    deadline = time.monotonic() + 30
    while True:
        samples = scrape(server)
        if total(samples, name, **labels) == value or time.monotonic() > deadline:
            return samples
        time.sleep(0.1)


def test_metrics_and_access_log_of_the_embedded_engine(tmp_path: Path) -> None:
    log = tmp_path / "access.jsonl"
    config = config_with_key(f'\n[access_log]\nenabled = true\npath = "{log}"\n')
    with running_server(tmp_path, config) as server:
        sdk = openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)
        answer = sdk.chat.completions.create(
            model=MODEL,
            messages=QUESTION,
            max_tokens=8,
            temperature=0,  # type: ignore[arg-type]
        )
        chunks = list(
            sdk.chat.completions.create(
                model=MODEL,
                messages=QUESTION,  # type: ignore[arg-type]
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        stream_usage = chunks[-1].usage
        assert answer.usage is not None and stream_usage is not None
        # A stream the client leaves after its first content chunk.
        with sdk.chat.completions.create(
            model=MODEL,
            messages=QUESTION,  # type: ignore[arg-type]
            max_tokens=64,
            temperature=0,
            stream=True,
        ) as cut:
            for chunk in cut:
                if chunk.choices and chunk.choices[0].delta.content:
                    break
        samples = wait_for(server, "nomoat_requests_total", 1, status_class="4xx")
        deadline = time.monotonic() + 10
        while len(log.read_text().splitlines() if log.exists() else []) < 3:
            assert time.monotonic() < deadline, "the access log was not written"
            time.sleep(0.1)
        lines = [json.loads(line) for line in log.read_text().splitlines()]
    assert total(samples, "nomoat_requests_total", model=MODEL, status_class="2xx") == 2
    server_count = "gen_ai_server_request_duration_seconds_count"
    assert total(samples, server_count, gen_ai_request_model=MODEL) == 3
    assert total(samples, "gen_ai_server_time_to_first_token_seconds_count") == 1
    client = "gen_ai_client_operation_duration_seconds_count"
    assert total(samples, client, gen_ai_provider_name="llama.cpp", backend="embedded") == 3
    tokens = "gen_ai_client_token_usage_sum"
    prompt = answer.usage.prompt_tokens + stream_usage.prompt_tokens
    assert total(samples, tokens, gen_ai_token_type="input") == prompt
    output = total(samples, tokens, gen_ai_token_type="output")
    generated = answer.usage.completion_tokens + stream_usage.completion_tokens
    # The cut stream generated at least the chunk the client read.
    assert generated + 1 <= output <= generated + 64
    assert total(samples, "nomoat_engine_requests_running", backend="embedded") >= 0
    assert "nomoat_engine_decoded_tokens_total" in samples
    assert total(samples, "nomoat_requests_in_flight") == 0
    assert [line["status"] for line in lines] == [200, 200, 499]
    assert lines[0]["completion_tokens"] == answer.usage.completion_tokens
    assert lines[1]["ttft_ms"] is not None and lines[1]["stream"] is True
    # The cut stream's tokens are the engine's own (reported once it stopped
    # the generation), not counted on the stream.
    assert lines[2]["tokens_estimated"] is False and lines[2]["completion_tokens"] >= 1
    assert lines[2]["prompt_tokens"] == stream_usage.prompt_tokens
    assert all(line["backend"] == "embedded" and line["key_id"] for line in lines)
