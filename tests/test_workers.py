"""``nomoat serve --workers 2``: two processes on one port, each a whole
gateway, in front of loadtests/fake_upstream.py (an HTTP upstream shaped like
vLLM; the embedded engine is refused with more than one worker).

Checked with both workers answering: API-key auth, routing (a model, an
unknown model), streams (many at once, each complete), /status naming its
worker, and a graceful shutdown (SIGTERM to the parent: a running stream
finishes, then every process exits 0).
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.auth import hash_api_key
from gateway.testing import LiveGateway, running_gateway
from tests.conftest import Cli, free_port

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-workers-test-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHUNKS = 8
DELAY_MS = 100


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    port = free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "loadtests" / "fake_upstream.py"),
            *("--port", str(port), "--chunks", str(CHUNKS), "--chunk-delay-ms", str(DELAY_MS)),
        ],
        stdout=subprocess.PIPE,
    )
    assert process.stdout is not None
    assert b"listening" in process.stdout.readline()
    try:
        yield port
    finally:
        process.terminate()
        process.wait(10)


def config(upstream_port: int) -> str:
    return f"""
[server]
api_key_hashes = ["{hash_api_key(KEY)}"]
shutdown_grace_seconds = 20

[plugins]
disabled = ["llamacpp"]

[backends.fake-a]
type = "vllm"
base_url = "http://127.0.0.1:{upstream_port}/v1"
models = ["fake-model", "fake-slow-model"]

[backends.fake-b]
type = "vllm"
base_url = "http://127.0.0.1:{upstream_port}/v1"
models = ["fake-model", "fake-slow-model"]

[models.chat]
policy = "least-outstanding"
deployments = [
  {{ backend = "fake-a", model = "fake-model" }},
  {{ backend = "fake-b", model = "fake-model" }},
]

[models.slow]
deployments = [{{ backend = "fake-a", model = "fake-slow-model" }}]
"""


@pytest.fixture(scope="module")
def live(upstream: int, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    directory = tmp_path_factory.mktemp("workers")
    with running_gateway(
        directory, config(upstream), api_key=KEY, extra_args=("--workers", "2")
    ) as gateway:
        yield gateway


def new_client(live: LiveGateway) -> httpx.Client:
    # No keep-alive: each request a new connection, for either worker to take.
    return httpx.Client(
        base_url=live.root_url,
        timeout=60,
        limits=httpx.Limits(max_keepalive_connections=0),
    )


@pytest.mark.e2e
def test_both_workers_answer_and_say_which_they_are(live: LiveGateway) -> None:
    seen: set[int] = set()
    with new_client(live) as client:
        for _ in range(200):
            status = client.get("/status", headers=AUTH).json()
            assert status["workers"] == 2
            seen.add(status["worker"])
            if seen == {0, 1}:
                break
        metrics = client.get("/metrics", headers=AUTH).text
    assert seen == {0, 1}
    assert 'nomoat_worker_info{worker="' in metrics and "nomoat_workers 2.0" in metrics


@pytest.mark.e2e
def test_every_worker_checks_the_key(live: LiveGateway) -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    with new_client(live) as client:
        for _ in range(10):
            missing = client.post("/v1/chat/completions", json=body)
            wrong = client.post(
                "/v1/chat/completions", json=body, headers={"Authorization": "Bearer sk-wrong"}
            )
            assert missing.status_code == 401 and wrong.status_code == 401
            assert missing.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.e2e
def test_every_worker_routes(live: LiveGateway) -> None:
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    with new_client(live) as client:
        for _ in range(10):
            answer = client.post("/v1/chat/completions", json=body, headers=AUTH)
            assert answer.status_code == 200, answer.text
            assert answer.json()["model"] == "chat"
            assert answer.json()["choices"][0]["message"]["content"]
            unknown = client.post(
                "/v1/chat/completions", json={**body, "model": "nope"}, headers=AUTH
            )
            assert unknown.status_code == 404
            assert unknown.json()["error"]["code"] == "model_not_found"


def stream(live: LiveGateway, model: str, under_way: threading.Event | None = None) -> list[str]:
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    events = []
    with (
        new_client(live) as client,
        client.stream("POST", "/v1/chat/completions", json=body, headers=AUTH) as response,
    ):
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(line.removeprefix("data: "))
                if under_way is not None:
                    under_way.set()
    return events


@pytest.mark.e2e
def test_streams_on_both_workers_arrive_whole(live: LiveGateway) -> None:
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda _: stream(live, "chat"), range(32)))
    for events in results:
        assert events[-1] == "[DONE]"
        chunks = [json.loads(event) for event in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert len([c for c in chunks if c["choices"]]) == CHUNKS + 2  # role, content, finish
        assert text and all(c["model"] == "chat" for c in chunks)


@pytest.mark.e2e
def test_sigterm_lets_running_streams_finish_then_every_worker_exits_0(
    upstream: int, tmp_path: Path
) -> None:
    with running_gateway(
        tmp_path, config(upstream), api_key=KEY, extra_args=("--workers", "2")
    ) as gateway:
        workers = _children(gateway.process.pid)
        assert len(workers) == 2
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            under_way = [threading.Event() for _ in range(4)]
            running = [pool.submit(stream, gateway, "slow", event) for event in under_way]
            assert all(event.wait(30) for event in under_way)
            gateway.process.send_signal(signal.SIGTERM)
            results = [future.result(timeout=60) for future in running]
        code = gateway.process.wait(timeout=30)
        log = gateway.log()
    for events in results:
        assert events[-1] == "[DONE]", f"a stream was cut: {events[-2:]}\n{log}"
    assert code == 0, log
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers), "a worker outlived it"


def _children(pid: int) -> list[int]:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        if len(found) >= 2:
            return [int(child) for child in found]
        time.sleep(0.05)
    return []


def test_the_embedded_engine_is_refused_with_more_than_one_worker(cli: Cli) -> None:
    ran = cli("serve", "--workers", "2")
    assert ran.returncode == 2
    assert "--workers 2 cannot serve the embedded engine" in ran.stderr
    assert "nomoat edge" in ran.stderr
