"""Two real `nomoat edge` nodes behind a gateway: the split a policy makes,
session affinity, and an edge node killed before and during a stream."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import MODEL, Server, config_with_key, free_port, running_server
from tests.lora_assets import metric

# Starts an engine or a server: not part of the fast layer.
pytestmark = pytest.mark.e2e

NO_END = {"0": -100, "2": -100, "4": -100}


@contextmanager
def edge_node(
    tmp_path: Path, name: str, *extra_args: str
) -> Iterator[tuple[int, subprocess.Popen[bytes]]]:
    """`nomoat edge` on one thread and two sequences; its port and process."""
    port = free_port()
    log = (tmp_path / f"{name}.log").open("wb")
    command = [sys.executable, "-m", "gateway.cli", "edge", "--port", str(port)]
    command += ["--threads", "1", "--parallel", "2", *extra_args]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / f"{name}.log").read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.25)
        yield port, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        log.close()


@pytest.fixture(scope="module")
def edges(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[list[tuple[int, subprocess.Popen[bytes]]]]:
    tmp = tmp_path_factory.mktemp("edges")
    with edge_node(tmp, "a") as a, edge_node(tmp, "b") as b:
        yield [a, b]


@pytest.fixture(scope="module")
def gateway(
    edges: list[tuple[int, subprocess.Popen[bytes]]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    (port_a, _), (port_b, _) = edges
    extra = f"""
        [backends.edge-a]
        type = "edge"
        base_url = "http://127.0.0.1:{port_a}/v1"
        probe_interval = 0.5
        connect_timeout = 1

        [backends.edge-b]
        type = "edge"
        base_url = "http://127.0.0.1:{port_b}/v1"
        probe_interval = 0.5
        connect_timeout = 1

        [models.split]
        policy = "weighted-round-robin"
        deployments = [
          {{ backend = "edge-a", model = "{MODEL}" }},
          {{ backend = "edge-b", model = "{MODEL}" }},
        ]

        [models.sticky]
        policy = "session-affinity"
        deployments = [
          {{ backend = "edge-a", model = "{MODEL}" }},
          {{ backend = "edge-b", model = "{MODEL}" }},
        ]

        [models.cheap]
        policy = "lowest-cost"
        deployments = [
          {{ backend = "edge-a", model = "{MODEL}", input_usd_per_million = 1.0, \
output_usd_per_million = 1.0 }},
          {{ backend = "edge-b", model = "{MODEL}", input_usd_per_million = 0.5, \
output_usd_per_million = 0.5 }},
        ]

        [models.least]
        policy = "least-outstanding"
        deployments = [
          {{ backend = "edge-a", model = "{MODEL}" }},
          {{ backend = "edge-b", model = "{MODEL}" }},
        ]

        [models.short-queue]
        policy = "shortest-queue"
        deployments = [
          {{ backend = "edge-a", model = "{MODEL}" }},
          {{ backend = "edge-b", model = "{MODEL}" }},
        ]

        [models.fastest]
        policy = "lowest-latency"
        deployments = [
          {{ backend = "edge-a", model = "{MODEL}" }},
          {{ backend = "edge-b", model = "{MODEL}" }},
        ]
        """
    config = config_with_key(extra).replace("[server]\n", "[server]\nroute_header = true\n")
    with running_server(tmp_path_factory.mktemp("edge-gateway"), config) as live:
        yield live


@pytest.fixture
def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=gateway.api_key, max_retries=0)


def backend_of(raw: object) -> str:
    route = raw.headers["x-nomoat-route"]  # type: ignore[attr-defined]
    return str(route.split("backend=")[1].split(";")[0])


def ask(client: openai.OpenAI, model: str, user: str | None = None) -> str:
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        user=user or openai.NOT_GIVEN,
    )
    assert raw.parse().choices[0].message.content is not None
    return backend_of(raw)


def test_weighted_round_robin_splits_evenly_across_two_edges(client: openai.OpenAI) -> None:
    split = Counter(ask(client, "split") for _ in range(8))
    assert split == {"edge-a": 4, "edge-b": 4}


def test_session_affinity_keeps_each_user_on_one_edge(client: openai.OpenAI) -> None:
    placed = {
        user: ask(client, "sticky", user) for user in ("ann", "bob", "cy", "dee", "eve", "fay")
    }
    assert {user: ask(client, "sticky", user) for user in placed} == placed
    assert set(placed.values()) == {"edge-a", "edge-b"}


def test_lowest_cost_sends_everything_to_the_cheaper_edge(client: openai.OpenAI) -> None:
    assert Counter(ask(client, "cheap") for _ in range(6)) == {"edge-b": 6}


def _long_stream(client: openai.OpenAI, model: str, start: threading.Barrier) -> str:
    start.wait()
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": "Tell a story."}],
        max_tokens=64,
        logit_bias=NO_END,
        stream=True,
    )
    for _ in raw.parse():
        pass
    return backend_of(raw)


def test_least_outstanding_spreads_concurrent_requests(client: openai.OpenAI) -> None:
    start = threading.Barrier(6)
    with ThreadPoolExecutor(max_workers=6) as pool:
        split = Counter(pool.map(lambda _: _long_stream(client, "least", start), range(6)))
    # In flight at once, they alternate: 3 and 3 (2 and 4 if one ends early).
    assert min(split["edge-a"], split["edge-b"]) >= 2, split


@contextmanager
def busy(port: int, gateway: Server, backend: str, streams: int = 2) -> Iterator[None]:
    """Keep an edge node's slots full with long generations sent to it
    directly (the gateway does not see them in flight: only the node's own
    /metrics and its slower answers tell), until the gateway's probe has
    seen them all running."""
    stop = threading.Event()

    def generate() -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell a very long story."}],
            "max_tokens": 400,
            "logit_bias": NO_END,
            "stream": True,
        }
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        while not stop.is_set():
            with httpx.stream("POST", url, json=body, timeout=120) as answer:
                for _ in answer.iter_lines():
                    if stop.is_set():
                        break

    workers = [threading.Thread(target=generate, daemon=True) for _ in range(streams)]
    for worker in workers:
        worker.start()
    try:
        # The probe scrapes the node's /metrics every 0.5 s: wait for what it
        # saw, not for a time that may be too short on a busy machine.
        deadline = time.monotonic() + 30
        while metric(gateway, "nomoat_engine_requests_running", backend=backend) < streams:
            assert time.monotonic() < deadline, f"the gateway never saw {backend} busy"
            time.sleep(0.1)
        yield
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)


def test_shortest_queue_avoids_the_edge_whose_engine_is_busy(
    client: openai.OpenAI, edges: list[tuple[int, subprocess.Popen[bytes]]], gateway: Server
) -> None:
    with busy(edges[0][0], gateway, "edge-a"):
        split = Counter(ask(client, "short-queue") for _ in range(6))
    assert split["edge-b"] >= 5, split


def test_lowest_latency_learns_to_avoid_the_slow_edge(
    client: openai.OpenAI, edges: list[tuple[int, subprocess.Popen[bytes]]], gateway: Server
) -> None:
    with busy(edges[0][0], gateway, "edge-a"):
        # Each edge is measured first (one request each), then the fast one wins.
        split = Counter(ask(client, "fastest") for _ in range(8))
    assert split["edge-b"] >= 6, split


def test_an_edge_killed_mid_stream_and_then_skipped(
    client: openai.OpenAI, edges: list[tuple[int, subprocess.Popen[bytes]]], gateway: Server
) -> None:
    # Find which edge serves the next "split" request, then stream from it and kill it.
    stream = client.chat.completions.with_raw_response.create(
        model="split",
        messages=[{"role": "user", "content": "Tell a very long story."}],
        max_tokens=400,
        logit_bias=NO_END,
        stream=True,
    )
    victim = backend_of(stream)
    process = edges[0][1] if victim == "edge-a" else edges[1][1]
    chunks = stream.parse()
    got = 0
    with pytest.raises(openai.APIError):
        for chunk in chunks:
            if chunk.choices and chunk.choices[0].delta.content:
                got += 1
                if got == 5:
                    process.send_signal(signal.SIGKILL)
    assert got >= 5
    # Afterwards every request succeeds on the other edge: none fails before its first byte.
    survivor = "edge-b" if victim == "edge-a" else "edge-a"
    assert [ask(client, "split") for _ in range(6)] == [survivor] * 6
    # The status shows it once an active probe (every 0.5 s) has found it
    # gone: the six answers above can take less than that.
    headers = {"Authorization": f"Bearer {gateway.api_key}"}
    deadline = time.monotonic() + 10
    while True:
        status = httpx.get(f"{gateway.root_url}/status", headers=headers, timeout=10).json()
        up = {d["backend"]: d["ready"] for d in status["models"]["split"]}
        if up == {victim: False, survivor: True} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert up == {victim: False, survivor: True}
