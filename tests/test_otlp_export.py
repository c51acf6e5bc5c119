"""A real `nomoat serve` (the embedded llama.cpp engine) exporting its traces
over OTLP, http/protobuf and grpc, to a receiver process that decodes the
protobuf (tests/otlp_receiver.py): configured only by the standard OTEL_*
variables, the trace continues the client's traceparent, and the engine's
phases (queue wait, prompt evaluation with the prompt cache's tokens,
decoding) are children of the INTERNAL attempt span."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.telemetry import semconv as names
from tests.conftest import API_KEY, MODEL, config_with_key, running_server
from tests.otlp_receiver import Receiver, running_receiver

pytestmark = pytest.mark.e2e

# OTLP's span kinds.
INTERNAL, SERVER, CLIENT = 1, 2, 3
# One trace id per protocol: the receiver is shared.
CLIENT_TRACES = {
    "http/protobuf": "4bf92f3577b34da6a3ce929d0e0e4736",
    "grpc": "5cf92f3577b34da6a3ce929d0e0e4737",
}
CLIENT_SPAN = "00f067aa0ba902b7"
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow, please."}]


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    with running_receiver(tmp_path_factory.mktemp("otlp")) as running:
        yield running


def children(spans: list[dict[str, Any]], parent: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in spans if s["parent_span_id"] == parent["span_id"]]


def one(spans: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [s for s in spans if all(s.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, [(s["name"], s["service"]) for s in spans])
    return found[0]


@pytest.mark.parametrize("protocol", ["http/protobuf", "grpc"])
def test_traces_reach_an_otlp_receiver_with_the_engines_phases(
    protocol: str,
    receiver: Receiver,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    service = f"nomoat-{protocol.split('/')[0]}"
    client_trace = CLIENT_TRACES[protocol]
    endpoint = receiver.http_endpoint if protocol == "http/protobuf" else receiver.grpc_endpoint
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
    monkeypatch.setenv("OTEL_SERVICE_NAME", service)
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment.name=test")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 8, "temperature": 0}
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with running_server(tmp_path, config_with_key()) as server:
        url = f"{server.base_url}/chat/completions"
        first = httpx.post(url, json=body, headers=headers, timeout=120)
        assert first.status_code == 200, first.text
        traced = {**headers, "traceparent": f"00-{client_trace}-{CLIENT_SPAN}-01"}
        # The same prompt again: its prompt comes from the prompt cache.
        second = httpx.post(url, json=body, headers=traced, timeout=120)
        assert second.status_code == 200, second.text

        def complete(spans: list[dict[str, Any]]) -> bool:
            mine = [s for s in spans if s["trace_id"] == client_trace]
            return len(mine) >= 5

        spans = receiver.wait_for(complete)
    mine = [s for s in spans if s["trace_id"] == client_trace]
    assert all(s["transport"] == protocol and s["service"] == service for s in mine)
    assert all(s["resource"]["deployment.environment.name"] == "test" for s in mine)
    server_span = one(mine, name="POST /v1/chat/completions")
    assert server_span["kind"] == SERVER and server_span["parent_span_id"] == CLIENT_SPAN
    assert server_span["attributes"][names.REQUEST_ID] == second.headers["x-request-id"]
    attempt = one(mine, name=f"chat {MODEL}")
    assert attempt["parent_span_id"] == server_span["span_id"]
    assert attempt["kind"] == INTERNAL  # the engine runs in the gateway's process
    assert attempt["schema_url"] == names.SCHEMA_URL
    on_attempt = attempt["attributes"]
    assert on_attempt[names.PROVIDER_NAME] == "llama.cpp"
    assert on_attempt[names.REQUEST_MODEL] == MODEL
    usage = second.json()["usage"]
    assert on_attempt[names.USAGE_INPUT_TOKENS] == usage["prompt_tokens"]
    assert on_attempt[names.USAGE_OUTPUT_TOKENS] == usage["completion_tokens"]
    cached = on_attempt[names.USAGE_CACHE_READ_INPUT_TOKENS]
    assert 0 < cached < usage["prompt_tokens"]
    phases = {s["name"]: s for s in children(mine, attempt)}
    assert {names.ENGINE_QUEUE_SPAN, names.ENGINE_PROMPT_SPAN, names.ENGINE_DECODE_SPAN} <= set(
        phases
    )
    prompt = phases[names.ENGINE_PROMPT_SPAN]
    assert prompt["attributes"][names.ENGINE_CACHED_TOKENS] == cached
    decode = phases[names.ENGINE_DECODE_SPAN]
    assert decode["attributes"][names.ENGINE_OUTPUT_TOKENS] == usage["completion_tokens"]
    # In order, inside the attempt.
    queue = phases[names.ENGINE_QUEUE_SPAN]
    assert attempt["start"] <= queue["start"] <= queue["end"] <= prompt["start"]
    assert prompt["end"] <= decode["start"] <= decode["end"] <= attempt["end"]
