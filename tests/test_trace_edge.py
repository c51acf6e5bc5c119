"""One trace across a gateway and a real `nomoat edge` node: the gateway
exports over http/protobuf, the node over grpc, both to one OTLP receiver
process; the node's SERVER span is a child of the gateway's attempt span,
and its engine's phases are below its own attempt. A stream the client cuts
short still records, on the node, the tokens actually generated."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.telemetry import semconv as names
from tests.conftest import API_KEY, MODEL, Server, config_with_key, running_server
from tests.otlp_receiver import Receiver, running_receiver
from tests.test_edge_routing import edge_node

pytestmark = pytest.mark.e2e

INTERNAL, SERVER, CLIENT = 1, 2, 3
TRACE_JSON = "a1f92f3577b34da6a3ce929d0e0e4736"
TRACE_CUT = "b2f92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
QUESTION = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    with running_receiver(tmp_path_factory.mktemp("otlp-edge")) as running:
        yield running


@pytest.fixture(scope="module")
def gateway(receiver: Receiver, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("edge-trace")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.grpc_endpoint)
        env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
        env.setenv("OTEL_SERVICE_NAME", "edge")
        with edge_node(tmp, "edge") as (port, _):
            env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.http_endpoint)
            env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
            env.setenv("OTEL_SERVICE_NAME", "gateway")
            extra = f"""
            [backends.node]
            type = "edge"
            base_url = "http://127.0.0.1:{port}/v1"
            models = ["{MODEL}"]

            [models.{MODEL}]
            deployments = [{{ backend = "node", model = "{MODEL}" }}]
            """
            with running_server(tmp, config_with_key(extra)) as live:
                yield live


def spans_of(receiver: Receiver, trace_id: str, count: int) -> list[dict[str, Any]]:
    def complete(spans: list[dict[str, Any]]) -> bool:
        return len([s for s in spans if s["trace_id"] == trace_id]) >= count

    return [s for s in receiver.wait_for(complete) if s["trace_id"] == trace_id]


def one(spans: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [s for s in spans if all(s.get(k) == v for k, v in match.items())]
    assert len(found) == 1, (match, [(s["service"], s["name"]) for s in spans])
    return found[0]


def headers(trace_id: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEY}", "traceparent": f"00-{trace_id}-{PARENT}-01"}


def test_the_edge_nodes_spans_continue_the_gateways_trace(
    gateway: Server, receiver: Receiver
) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 6, "temperature": 0}
    answer = httpx.post(
        f"{gateway.base_url}/chat/completions", json=body, headers=headers(TRACE_JSON), timeout=120
    )
    assert answer.status_code == 200, answer.text
    # Gateway: server, attempt; node: server, attempt, 3 phases.
    spans = spans_of(receiver, TRACE_JSON, 7)
    front = one(spans, service="gateway", name="POST /v1/chat/completions")
    assert front["parent_span_id"] == PARENT
    attempt = one(spans, service="gateway", name=f"chat {MODEL}")
    assert attempt["kind"] == CLIENT and attempt["parent_span_id"] == front["span_id"]
    assert attempt["attributes"][names.PROVIDER_NAME] == "llama.cpp"
    assert attempt["attributes"][names.SERVER_ADDRESS] == "127.0.0.1"
    node = one(spans, service="edge", name="POST /v1/chat/completions")
    assert node["kind"] == SERVER and node["parent_span_id"] == attempt["span_id"]
    # The node was sent the gateway's own id of the request (the answer's).
    assert node["attributes"][names.REQUEST_ID] == answer.json()["id"]
    assert front["attributes"][names.REQUEST_ID] == answer.headers["x-request-id"]
    engine = one(spans, service="edge", name=f"chat {MODEL}")
    assert engine["kind"] == INTERNAL and engine["parent_span_id"] == node["span_id"]
    phases = {s["name"] for s in spans if s["parent_span_id"] == engine["span_id"]}
    assert {names.ENGINE_QUEUE_SPAN, names.ENGINE_PROMPT_SPAN, names.ENGINE_DECODE_SPAN} <= phases
    usage = answer.json()["usage"]
    for side in (attempt, engine):
        assert side["attributes"][names.USAGE_OUTPUT_TOKENS] == usage["completion_tokens"]


def test_a_stream_cut_by_the_client_records_the_tokens_the_node_generated(
    gateway: Server, receiver: Receiver
) -> None:
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 400, "stream": True}
    with httpx.stream(
        "POST",
        f"{gateway.base_url}/chat/completions",
        json=body,
        headers=headers(TRACE_CUT),
        timeout=120,
    ) as response:
        assert response.status_code == 200
        events = 0
        for line in response.iter_lines():
            events += line.startswith("data: ")
            if events == 5:
                break
    left_at = time.time_ns()
    spans = spans_of(receiver, TRACE_CUT, 7)
    engine = one(spans, service="edge", name=f"chat {MODEL}")
    generated = engine["attributes"][names.USAGE_OUTPUT_TOKENS]
    # What the engine generated until the cut: at least what the client
    # read, far from the 400 asked for; counted by the engine, not estimated.
    assert 4 <= generated < 400
    assert names.USAGE_ESTIMATED not in engine["attributes"]
    decode = one(spans, service="edge", name=names.ENGINE_DECODE_SPAN)
    assert decode["end"] - left_at < 10 * 10**9
    front = one(spans, service="gateway", name=f"chat {MODEL}")
    assert front["attributes"][names.USAGE_OUTPUT_TOKENS] >= 4
