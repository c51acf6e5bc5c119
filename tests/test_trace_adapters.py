"""LoRA adapters on traces, with the real llama.cpp engine and a trained
marker adapter: the attempt span names the adapters and their scales, and
switching the engine's adapter set (loading the adapter) is a child span
of the attempt, exported over OTLP to a receiver process."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.telemetry import semconv as names
from tests.conftest import API_KEY, MODEL, Server, config_with_key, running_server
from tests.lora_assets import QUESTION, Assets
from tests.otlp_receiver import Receiver, running_receiver

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1200)]

TRACE = "d4f92f3577b34da6a3ce929d0e0e4736"


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Receiver]:
    with running_receiver(tmp_path_factory.mktemp("otlp-lora")) as running:
        yield running


@pytest.fixture(scope="module")
def gateway(
    assets: Assets, receiver: Receiver, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    extra = f"""
        [telemetry]
        endpoint = "{receiver.grpc_endpoint}"
        protocol = "grpc"

        [backends.local]
        type = "llamacpp"
        parallel = 2
        context_length = 2048
        smoke_test = false
        adapter_cache_dir = "{tmp_path_factory.mktemp("lora-gguf")}"

        [models.{MODEL}]
        deployments = [{{ backend = "local" }}]

        [lora]
        root = "{assets.root}"

        [lora.adapters.beta]
        base = "{MODEL}"
        path = "gguf/beta.gguf"
        sha256 = "{assets.sha("gguf/beta.gguf")}"
        """
    with pytest.MonkeyPatch.context() as env:
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            env.delenv(name, raising=False)
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
        with running_server(tmp_path_factory.mktemp("lora-trace"), config_with_key(extra)) as live:
            yield live


def test_an_adapter_load_is_a_child_span_of_the_attempt(
    gateway: Server, receiver: Receiver
) -> None:
    body = {"model": "beta", "messages": QUESTION, "max_tokens": 4, "temperature": 0}
    headers = {
        "Authorization": f"Bearer {API_KEY}",
        "traceparent": f"00-{TRACE}-00f067aa0ba902b7-01",
    }
    answer = httpx.post(
        f"{gateway.base_url}/chat/completions", json=body, headers=headers, timeout=300
    )
    assert answer.status_code == 200, answer.text

    def complete(spans: list[dict[str, Any]]) -> bool:
        return any(s["trace_id"] == TRACE and s["name"] == names.ENGINE_DECODE_SPAN for s in spans)

    spans = [s for s in receiver.wait_for(complete) if s["trace_id"] == TRACE]
    [attempt] = [s for s in spans if s["name"] == f"chat {MODEL}"]
    assert attempt["attributes"][names.ADAPTERS] == ["beta"]
    assert attempt["attributes"][names.ADAPTER_SCALES] == [1.0]
    [load] = [s for s in spans if s["name"] == names.ENGINE_ADAPTER_LOAD_SPAN]
    assert load["parent_span_id"] == attempt["span_id"]
    assert load["attributes"][names.ADAPTERS] == ["beta"]
    assert load["transport"] == "grpc"
    [queue] = [s for s in spans if s["name"] == names.ENGINE_QUEUE_SPAN]
    [prompt] = [s for s in spans if s["name"] == names.ENGINE_PROMPT_SPAN]
    # The worker switches adapter sets when the job's turn to step comes: once
    # it holds a sequence, before its prompt's first token.
    assert queue["end"] <= load["start"] <= load["end"] <= prompt["end"]
