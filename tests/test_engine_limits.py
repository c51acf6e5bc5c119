"""No request can starve the others on the real in-process engine, through
``nomoat serve`` and its HTTP API (the scheduler's rules one by one, without
a model, are in test_engine_starvation.py):

- a request refused by a full queue leaves none of its choices queued;
- one API key holds at most ``max_per_key`` generations: past it, 429;
- a client that stops reading a stream stops its generation (backpressure),
  and after ``stream_stall_seconds`` loses it;
- a client sending adapter scale variants does not hold other requests back;
- a chat request without max_tokens gets ``default_max_tokens``.

Evidence comes from the engine itself (``/metrics``: llama.cpp's own count
of decoded tokens, the queue and the running generations).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from conftest import API_KEY, MODEL, Server, running_server

from gateway.testing import gateway_config
from tests.lora_assets import Assets

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

OTHER_KEY = "sk-nomoat-test-other-0123456789ab"
# The model's end tokens are forbidden: a generation ends at its budget or
# when it is cancelled, never by itself.
NO_END = {"0": -100, "2": -100, "4": -100}
LONG_BUDGET = 1500
DEFAULT_BUDGET = 24
STALL_SECONDS = 4


def _config(assets: Assets, cache: str) -> str:
    return gateway_config(
        f"""
        [limits]
        # Linux would let a client that reads nothing park 4 MiB in the kernel
        # first (about 2,000 of these tokens with their logprobs).
        socket_send_buffer_bytes = 16384

        [backends.embedded]
        type = "llamacpp"
        threads = 1
        parallel = 2
        max_waiting = 2
        max_per_key = 3
        default_max_tokens = {DEFAULT_BUDGET}
        stream_buffer_tokens = 8
        stream_stall_seconds = {STALL_SECONDS}
        context_length = 2048
        smoke_test = false
        adapter_cache_dir = "{cache}"

        [models.{MODEL}]
        deployments = [{{ backend = "embedded" }}]

        [lora]
        root = "{assets.root}"

        [lora.adapters.alpha]
        base = "{MODEL}"
        path = "peft/alpha"
        sha256 = "{assets.sha("peft/alpha")}"
        """,
        api_keys=(API_KEY, OTHER_KEY),
    )


@pytest.fixture(scope="module")
def engine(assets: Assets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cache = tmp_path_factory.mktemp("gguf")
    config = _config(assets, str(cache))
    with running_server(tmp_path_factory.mktemp("limits"), config) as live:
        yield live


@pytest.fixture(autouse=True)
def idle_engine(engine: Server) -> Iterator[None]:
    """Each test starts, and leaves, with nothing running or waiting."""
    _wait_idle(engine)
    yield
    _wait_idle(engine)


# ------------------------------------------------------------------ helpers


def _metrics(server: Server) -> dict[str, int]:
    text = httpx.get(f"{server.root_url}/metrics", timeout=30).text
    values = {}
    for line in text.splitlines():
        if line.startswith("nomoat_engine_") and '{backend="embedded"}' in line:
            name, value = line.split('{backend="embedded"} ')
            values[name.removeprefix("nomoat_engine_")] = int(float(value))
    return values


def _wait_for(server: Server, what: str, wanted: int, limit: float = 60) -> None:
    deadline = time.monotonic() + limit
    while _metrics(server)[what] != wanted:
        assert time.monotonic() < deadline, f"{what} never became {wanted}: {_metrics(server)}"
        time.sleep(0.05)


def _wait_idle(server: Server) -> None:
    _wait_for(server, "requests_running", 0)
    _wait_for(server, "requests_waiting", 0)


def _long(model: str = MODEL, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "temperature": 0,
        "logit_bias": NO_END,
        "max_tokens": LONG_BUDGET,
        "stream": True,
        **extra,
    }


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@contextlib.contextmanager
def _streams(server: Server) -> Iterator[contextlib.ExitStack]:
    """Streams opened with ``_open`` stay open until the block ends."""
    with contextlib.ExitStack() as stack:
        yield stack


def _open(
    stack: contextlib.ExitStack, server: Server, key: str, body: dict[str, Any]
) -> httpx.Response:
    client = stack.enter_context(httpx.Client(timeout=120))
    response = stack.enter_context(
        client.stream("POST", f"{server.base_url}/chat/completions", json=body, headers=_auth(key))
    )
    assert response.status_code == 200, response.read()
    return response


# ----------------------------------------------------------------- all or none


def test_a_refused_request_leaves_none_of_its_choices_queued(engine: Server) -> None:
    """Before, the choices that fitted stayed queued (and then ran) after the
    client had its 503."""
    with _streams(engine) as stack:
        _open(stack, engine, API_KEY, _long())
        _open(stack, engine, OTHER_KEY, _long())
        _wait_for(engine, "requests_running", 2)
        _open(stack, engine, API_KEY, _long())
        _wait_for(engine, "requests_waiting", 1)
        body = {**_long(), "stream": False, "max_tokens": 8, "n": 2}
        refused = httpx.post(
            f"{engine.base_url}/chat/completions", json=body, headers=_auth(OTHER_KEY), timeout=60
        )
        assert refused.status_code == 503, refused.text
        assert refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "engine_overloaded"
        assert _metrics(engine)["requests_waiting"] == 1


# ------------------------------------------------------------------- per key


def test_one_key_cannot_fill_the_queue(engine: Server) -> None:
    """Before, one key's streams could take every running and waiting place."""
    with _streams(engine) as stack:
        for _ in range(3):
            _open(stack, engine, API_KEY, _long())
        _wait_for(engine, "requests_running", 2)
        _wait_for(engine, "requests_waiting", 1)
        sdk = openai.OpenAI(base_url=engine.base_url, api_key=API_KEY, max_retries=0)
        with pytest.raises(openai.RateLimitError) as caught:
            sdk.chat.completions.create(**{**_long(), "stream": False, "max_tokens": 4})
        assert caught.value.response.headers["retry-after"] == "1"
        assert caught.value.code == "rate_limit_exceeded"
        assert "at most 3" in caught.value.message
        # Another key still gets the place that is left.
        _open(stack, engine, OTHER_KEY, _long())
        _wait_for(engine, "requests_waiting", 2)


# -------------------------------------------------------------- backpressure


def _unread_stream(server: Server) -> socket.socket:
    """A streamed request whose client then reads nothing (a small receive
    buffer, so the server's writes back up quickly)."""
    body = json.dumps(_long(logprobs=True, top_logprobs=20)).encode()
    host, port = server.root_url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((host, int(port)))
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
        f"Authorization: Bearer {API_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    sock.sendall(head.encode() + body)
    assert sock.recv(1024).startswith(b"HTTP/1.1 200 ")
    return sock


def _decoded_when_still(server: Server, quiet: float = 1.5, limit: float = 90) -> int:
    """The decoded-token count once it stops moving for ``quiet`` seconds."""
    deadline = time.monotonic() + limit
    last, since = _metrics(server)["decoded_tokens_total"], time.monotonic()
    while time.monotonic() - since < quiet:
        assert time.monotonic() < deadline, "the engine never stopped decoding"
        time.sleep(0.1)
        now = _metrics(server)["decoded_tokens_total"]
        if now != last:
            last, since = now, time.monotonic()
    return last


def test_a_client_that_stops_reading_stops_its_generation_then_loses_it(
    engine: Server,
) -> None:
    """Before, the engine went on generating into memory for a client that
    read nothing, to the end of its budget."""
    before = _metrics(engine)["decoded_tokens_total"]
    sock = _unread_stream(engine)
    try:
        _wait_for(engine, "requests_running", 1)
        paused_at = _decoded_when_still(engine)
        # Paused far short of its budget, still holding its sequence...
        assert paused_at - before < LONG_BUDGET // 2, paused_at - before
        # ...until it has been stalled for stream_stall_seconds.
        _wait_for(engine, "requests_running", 0, limit=STALL_SECONDS + 10)
        assert _metrics(engine)["decoded_tokens_total"] == paused_at
    finally:
        sock.close()


# ------------------------------------------------------------ adapter variety


def test_adapter_scale_variants_do_not_hold_back_other_requests(engine: Server) -> None:
    """Before, a request with another adapter set waited until the running
    batch had drained: here, until the whole long stream had ended."""
    finished = threading.Event()
    with _streams(engine) as stack:
        scaled = _open(stack, engine, API_KEY, _long(f"{MODEL}:alpha@0.71"))

        def read_to_the_end() -> None:
            with contextlib.suppress(httpx.HTTPError):  # closed by the test
                for _ in scaled.iter_lines():
                    pass
                finished.set()

        reader = threading.Thread(target=read_to_the_end, daemon=True)
        reader.start()
        _wait_for(engine, "requests_running", 1)
        sdk = openai.OpenAI(base_url=engine.base_url, api_key=OTHER_KEY, max_retries=0)
        started = time.monotonic()
        answer = sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Say hello."}],
            temperature=0,
            max_tokens=16,
        )
        took = time.monotonic() - started
        assert not finished.is_set(), "the scaled stream ended first"
        assert answer.usage is not None and answer.usage.completion_tokens > 0
        assert took < 20, f"the base-model request took {took:.1f} s"
        scaled.close()
        reader.join(10)


# ---------------------------------------------------------- default budget


def test_a_chat_without_max_tokens_gets_the_default_budget(engine: Server) -> None:
    """Before, it could generate for the whole rest of the context."""
    sdk = openai.OpenAI(base_url=engine.base_url, api_key=API_KEY, max_retries=0)
    request: dict[str, Any] = {**_long(), "stream": False}
    del request["max_tokens"]
    answer = sdk.chat.completions.create(**request)
    assert answer.usage is not None and answer.usage.completion_tokens == DEFAULT_BUDGET
    assert answer.choices[0].finish_reason == "length"
    explicit = sdk.chat.completions.create(**{**request, "max_tokens": DEFAULT_BUDGET + 8})
    assert explicit.usage is not None
    assert explicit.usage.completion_tokens == DEFAULT_BUDGET + 8
