"""Faults between the gateway and an upstream (issue 11, "Fault injection").

One real ``nomoat edge`` node (the embedded model, one thread) is reached by
the gateway twice: as ``faulty``, through ``loadtests/fault_proxy.py``, and
as ``direct``. Each model below lists ``faulty`` first (policy ``ordered``),
then ``direct``; each test has a model of its own, so the cooldown one test
leaves on ``faulty`` cannot steer another. Clients are the official openai
SDK (retries off, a 30 s timeout) and raw HTTP for the wire format.

The documented behaviour (README, "Engines and routing"): a failure before
the first byte moves on to the next deployment; after it, the stream ends
with ``data: {"error": ...}`` and no ``[DONE]``, which the SDK raises; an
upstream silent for longer than its ``first_token_timeout`` is a failure
like any other, so nothing hangs; and the gateway stays healthy.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import MODEL, Server, config_with_key, running_server

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "loadtests"))

from fault_proxy import Fault, FaultProxy  # noqa: E402
from soak import Proc, start_edge, wait_ready  # noqa: E402

# Starts an engine and servers. Every request below is bounded by the
# client's timeout (CLIENT_TIMEOUT, 30 s), and the tests assert how long the
# slow cases took, well under pytest's timeout (which also covers starting
# the node and the gateway, minutes on a busy machine).
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

CLIENT_TIMEOUT = 30.0
# The faulty backend's first_token_timeout: silence longer than this is a failure.
SILENCE = 10.0
MODELS = [
    "reset-chat",
    "reset-stream",
    "cut-chat",
    "cut-first-event",
    "stall-first-event",
    "slow-first-byte",
    "slow-answer",
    "cut-mid-stream",
    "reset-mid-stream",
    "stall-mid-stream",
]
# Long answers for the mid-stream faults: no end-of-text before max_tokens.
NO_END = {"0": -100, "2": -100, "4": -100}


@pytest.fixture(scope="module")
def edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proc]:
    node = start_edge("edge", tmp_path_factory.mktemp("fault-edge"))
    try:
        wait_ready(node, 180)
        yield node
    finally:
        node.stop()


@pytest.fixture(scope="module")
def proxy(edge: Proc) -> Iterator[FaultProxy]:
    with FaultProxy(edge.port).running() as running:
        yield running


@pytest.fixture(autouse=True)
def no_fault_left(proxy: FaultProxy) -> Iterator[None]:
    proxy.inject(Fault())
    yield
    proxy.inject(Fault())


def _config(edge_port: int, proxy_port: int) -> str:
    extra = f"""
        [backends.faulty]
        type = "edge"
        base_url = "http://127.0.0.1:{proxy_port}/v1"
        probe_interval = 0.5
        connect_timeout = 2
        first_token_timeout = {SILENCE}

        [backends.direct]
        type = "edge"
        base_url = "http://127.0.0.1:{edge_port}/v1"
        probe_interval = 0.5
        connect_timeout = 2

        # Through the proxy too, but waiting a minute for a first byte: a
        # client that leaves must not depend on this timeout to be noticed.
        [backends.patient]
        type = "edge"
        base_url = "http://127.0.0.1:{proxy_port}/v1"
        probe_interval = 0.5
        first_token_timeout = 60

        [models.left-before-first-chunk]
        retries = 0
        deployments = [{{ backend = "patient", model = "{MODEL}" }}]

        [models.faulty-only]
        retry_backoff_seconds = 0.1
        deployments = [{{ backend = "faulty", model = "{MODEL}" }}]
        """
    for name in MODELS:
        extra += f"""
        [models.{name}]
        policy = "ordered"
        deployments = [
          {{ backend = "faulty", model = "{MODEL}" }},
          {{ backend = "direct", model = "{MODEL}" }},
        ]
        """
    return config_with_key(extra).replace("[server]\n", "[server]\nroute_header = true\n")


@pytest.fixture(scope="module")
def gateway(
    edge: Proc, proxy: FaultProxy, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    config = _config(edge.port, proxy.port)
    with running_server(tmp_path_factory.mktemp("fault-gateway"), config) as live:
        yield live


@pytest.fixture
def client(gateway: Server) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gateway.base_url,
        api_key=gateway.api_key,
        max_retries=0,
        timeout=CLIENT_TIMEOUT,
    )


def route(raw: object) -> dict[str, str]:
    header = raw.headers["x-nomoat-route"]  # type: ignore[attr-defined]
    return dict(part.strip().split("=", 1) for part in str(header).split(";"))


def chat(client: openai.OpenAI, model: str, max_tokens: int = 4) -> dict[str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=max_tokens
    )
    assert raw.parse().choices[0].message.content is not None
    return route(raw)


def stream_body(model: str, max_tokens: int = 24) -> dict[str, object]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Tell a long story."}],
        "max_tokens": max_tokens,
        "logit_bias": NO_END,
        "stream": True,
    }


@dataclass
class Read:
    """A stream read raw to its end: its ``data:`` payloads, its route, when
    its first payload came (seconds after sending) and how long the last one
    took after the one before it."""

    payloads: list[bytes]
    route: dict[str, str]
    first: float
    last_gap: float


def read_stream(gateway: Server, body: dict[str, object]) -> Read:
    headers = {"Authorization": f"Bearer {gateway.api_key}"}
    url = f"{gateway.base_url}/chat/completions"
    began = time.monotonic()
    times: list[float] = []
    payloads: list[bytes] = []
    with httpx.stream("POST", url, json=body, headers=headers, timeout=CLIENT_TIMEOUT) as answer:
        assert answer.status_code == 200, answer.read()
        for line in answer.iter_lines():
            if line.startswith("data:"):
                times.append(time.monotonic())
                payloads.append(line[5:].strip().encode())
        gap = times[-1] - times[-2] if len(times) > 1 else 0.0
        return Read(payloads, route(answer), times[0] - began, gap)


def assert_ends_with_error_event(payloads: list[bytes]) -> dict[str, object]:
    """Some content, then an OpenAI-shaped error event as the last, no [DONE]."""
    assert b"[DONE]" not in payloads, payloads[-3:]
    assert len(payloads) >= 2, payloads
    error = json.loads(payloads[-1])["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    contents = [json.loads(p)["choices"] for p in payloads[:-1]]
    assert any(choice and choice[0]["delta"].get("content") for choice in contents)
    return dict(error)


def sdk_stream_raises(client: openai.OpenAI, model: str) -> float:
    """Stream with the SDK until it raises (it must); the seconds between its
    last chunk and the error."""
    chunks = 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": "Tell a long story."}],
        max_tokens=24,
        logit_bias=NO_END,
        stream=True,
    )
    last = time.monotonic()
    with pytest.raises(openai.APIError) as raised:
        for _ in stream:
            chunks += 1
            last = time.monotonic()
    assert chunks >= 1
    assert not isinstance(raised.value, openai.APITimeoutError), "the client timed out: a hang"
    return time.monotonic() - last


# ------------------------------------------------------- before the first byte


def test_a_reset_before_the_answer_is_retried_on_the_other_deployment(
    client: openai.OpenAI, proxy: FaultProxy
) -> None:
    proxy.inject(Fault("reset", times=1))
    assert chat(client, "reset-chat") | {"score": ""} == {
        "deployment": "reset-chat/1",
        "backend": "direct",
        "score": "",
        "policy": "ordered",
        "tried": "2",
    }
    assert proxy.counters.injected["reset"] >= 1


def test_a_reset_before_a_stream_starts_is_retried(gateway: Server, proxy: FaultProxy) -> None:
    proxy.inject(Fault("reset", times=1))
    read = read_stream(gateway, stream_body("reset-stream"))
    assert read.payloads[-1] == b"[DONE]"
    assert (read.route["backend"], read.route["tried"]) == ("direct", "2")


def test_an_answer_cut_in_its_body_is_retried(client: openai.OpenAI, proxy: FaultProxy) -> None:
    # A JSON answer is sent to the client only once whole: cut anywhere, it
    # is still before the client's first byte.
    proxy.inject(Fault("cut", times=1, marker=b'"choices"', offset=4))
    where = chat(client, "cut-chat")
    assert (where["backend"], where["tried"]) == ("direct", "2")
    assert proxy.counters.injected["cut"] >= 1


def test_a_stream_cut_inside_its_first_event_is_retried(gateway: Server, proxy: FaultProxy) -> None:
    proxy.inject(Fault("cut", times=1, skip=0, offset=12))
    read = read_stream(gateway, stream_body("cut-first-event"))
    assert read.payloads[-1] == b"[DONE]"
    assert all(b'"error"' not in p for p in read.payloads)
    assert (read.route["backend"], read.route["tried"]) == ("direct", "2")


def test_a_stream_whose_first_event_never_comes_is_retried(
    gateway: Server, proxy: FaultProxy
) -> None:
    # The answer's headers pass, then silence: the stream has not started
    # for the client, so after first_token_timeout it goes elsewhere.
    proxy.inject(Fault("stall", times=1, skip=0, offset=0))
    read = read_stream(gateway, stream_body("stall-first-event"))
    # Its first event came from `direct`, after the silence, not a minute later.
    assert SILENCE <= read.first < SILENCE + 25, read.first
    assert read.payloads[-1] == b"[DONE]"
    assert (read.route["backend"], read.route["tried"]) == ("direct", "2")


def test_latency_under_the_timeout_only_slows_the_answer(
    client: openai.OpenAI, proxy: FaultProxy
) -> None:
    proxy.inject(Fault("delay", times=1, seconds=1.0))
    began = time.monotonic()
    where = chat(client, "slow-answer")
    assert time.monotonic() - began >= 1.0
    assert (where["backend"], where["tried"]) == ("faulty", "1")


def test_an_upstream_silent_past_its_timeout_is_left_for_the_other(
    client: openai.OpenAI, proxy: FaultProxy
) -> None:
    proxy.inject(Fault("delay", times=1, seconds=60))
    began = time.monotonic()
    where = chat(client, "slow-first-byte")
    took = time.monotonic() - began
    assert (where["backend"], where["tried"]) == ("direct", "2")
    # Given up after the faulty backend's first_token_timeout, not after the delay.
    assert SILENCE <= took < SILENCE + 25, took


def test_with_no_deployment_left_the_client_gets_a_502(
    client: openai.OpenAI, proxy: FaultProxy
) -> None:
    proxy.inject(Fault("reset"))
    began = time.monotonic()
    with pytest.raises(openai.APIStatusError) as raised:
        chat(client, "faulty-only")
    assert raised.value.status_code == 502
    body = raised.value.body
    assert isinstance(body, dict) and set(body) == {"message", "type", "param", "code"}, body
    # Every round tried (retries = 1): two resets, then the answer, at once.
    assert proxy.counters.injected["reset"] >= 2
    assert time.monotonic() - began < 10


# -------------------------------------------------------- after the first byte


def test_a_stream_cut_in_the_middle_of_an_event_ends_with_an_error_event(
    gateway: Server, client: openai.OpenAI, proxy: FaultProxy
) -> None:
    proxy.inject(Fault("cut", times=1, skip=3, offset=10))
    read = read_stream(gateway, stream_body("cut-mid-stream"))
    assert (read.route["backend"], read.route["tried"]) == ("faulty", "1")
    error = assert_ends_with_error_event(read.payloads)
    assert error["type"] == "upstream_error" or error["code"], error
    proxy.inject(Fault("cut", times=1, skip=3, offset=10))
    sdk_stream_raises(client, "cut-mid-stream")


def test_a_stream_reset_mid_way_ends_with_an_error_event(
    gateway: Server, client: openai.OpenAI, proxy: FaultProxy
) -> None:
    proxy.inject(Fault("reset-mid", times=1, skip=3, offset=0))
    assert_ends_with_error_event(read_stream(gateway, stream_body("reset-mid-stream")).payloads)
    proxy.inject(Fault("reset-mid", times=1, skip=3, offset=0))
    sdk_stream_raises(client, "reset-mid-stream")


def test_a_stream_that_stalls_ends_with_an_error_event_not_a_hang(
    gateway: Server, client: openai.OpenAI, proxy: FaultProxy
) -> None:
    proxy.inject(Fault("stall", times=1, skip=3, offset=10))
    read = read_stream(gateway, stream_body("stall-mid-stream"))
    # The error event came the backend's first_token_timeout after the last
    # chunk: not at once, not never.
    assert SILENCE / 2 <= read.last_gap < SILENCE + 15, read.last_gap
    assert_ends_with_error_event(read.payloads)
    proxy.inject(Fault("stall", times=1, skip=3, offset=10))
    assert SILENCE / 2 <= sdk_stream_raises(client, "stall-mid-stream") < SILENCE + 15


def engine_running(edge: Proc) -> float:
    text = httpx.get(f"{edge.root_url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("nomoat_engine_requests_running")
    )


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_a_client_that_leaves_before_the_first_chunk_stops_the_upstream_generation(
    gateway: Server, proxy: FaultProxy, edge: Proc
) -> None:
    # The node generates (2,000 tokens: a minute or more on one thread) while
    # the proxy holds its answer back: the client has received nothing, not
    # even the status line, when it leaves.
    proxy.inject(Fault("delay", times=1, seconds=120))
    assert wait_until(lambda: engine_running(edge) == 0, 20), "the node is busy"
    payload = json.dumps(stream_body("left-before-first-chunk", 2000)).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {gateway.api_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    ).encode()
    port = int(gateway.root_url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=CLIENT_TIMEOUT) as client:
        client.sendall(head + payload)
        assert wait_until(lambda: engine_running(edge) == 1, 20), "the node never started"
    left = time.monotonic()
    # The gateway closes its upstream connection at once (not after the
    # backend's 60 s first_token_timeout); the node notices and stops, long
    # before its 2,000 tokens.
    assert wait_until(lambda: engine_running(edge) == 0, 10), "still generating"
    assert time.monotonic() - left < 10


# --------------------------------------------------------------- afterwards


def test_the_gateway_and_the_engine_are_healthy_afterwards(
    gateway: Server, client: openai.OpenAI, proxy: FaultProxy, edge: Proc
) -> None:
    assert gateway.process.poll() is None
    assert httpx.get(f"{gateway.root_url}/health", timeout=10).status_code == 200
    assert httpx.get(f"{gateway.root_url}/ready", timeout=10).status_code == 200
    # Every cut connection was closed upstream: the node stopped generating.
    deadline = time.monotonic() + 20
    while engine_running(edge) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert engine_running(edge) == 0
    # The faulty path serves again (a one-deployment pool is never left out).
    assert chat(client, "faulty-only")["backend"] == "faulty"
    read = read_stream(gateway, stream_body("faulty-only", 6))
    assert read.payloads[-1] == b"[DONE]" and read.route["backend"] == "faulty"
    # A failing upstream is the operator's news, not a crash: no traceback.
    assert "Traceback" not in gateway.log()
