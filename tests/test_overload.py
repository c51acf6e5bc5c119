"""Overload: what clients can hold or send before a request reaches the
gateway's application, against a real ``nomoat serve`` on loopback.

- 2,000 idle connections and a slow-header client (slowloris) held open do
  not stop ``/health``: p99 under 100 ms while they are held;
- a burst far past capacity is shed with 503 + Retry-After (OpenAI-shaped),
  and the gateway serves again at once when it ends;
- oversized request heads get 431 / 414, a head that takes too long 408, a
  body that stops arriving 408; connections past ``max_connections`` take
  the place of the longest idle one, or get 503 + Retry-After in a burst.

Every count and duration is bounded; nothing leaves loopback. The test
process holds 2,000 sockets: its soft open-files limit is raised to its
hard limit if lower (the gateway, started from it, inherits it and raises
its own as needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import socket
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import pytest
from conftest import API_KEY, MODEL, Server, config_with_key, running_server

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

IDLE_CONNECTIONS = 2000
HEALTH_PROBES = 200
BURST = 400
AUTH = {"Authorization": f"Bearer {API_KEY}"}
ENGINE = """
    [backends.embedded]
    type = "llamacpp"
    threads = 1
    parallel = 1
    max_waiting = 2
    context_length = 1024
    smoke_test = false
"""
# Headers may take 30 s here: the idle connections and the slowloris stay
# open while /health is measured.
HOLDING = config_with_key(
    """
    [limits]
    header_timeout_seconds = 30
    max_requests = 16
    """
    + ENGINE
)
# Short timeouts and few connections, to see each refusal.
STRICT = config_with_key(
    """
    [limits]
    header_timeout_seconds = 3
    body_timeout_seconds = 1
    max_connections = 20
    max_header_count = 20
    max_header_bytes = 4096
    max_url_bytes = 1024
    """
    + ENGINE
)


def _enough_files(wanted: int) -> None:
    """Raise this process's soft open-files limit to ``wanted`` if lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the hard open-files limit ({hard}) is below the {wanted} this test needs")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


@pytest.fixture(scope="module")
def holding(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # The idle connections, the burst's, the probes'; the gateway inherits it.
    _enough_files(IDLE_CONNECTIONS + BURST + 1024)
    with running_server(tmp_path_factory.mktemp("holding"), HOLDING) as live:
        yield live


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with running_server(tmp_path_factory.mktemp("strict"), STRICT) as live:
        yield live


def _address(server: Server) -> tuple[str, int]:
    host, port = server.root_url.removeprefix("http://").split(":")
    return host, int(port)


def _raw(server: Server, data: bytes, timeout: float = 10) -> bytes:
    """Send ``data`` on a new connection; everything the server answers."""
    with socket.create_connection(_address(server), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def _status_and_error(response: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


async def _health_latencies(server: Server, probes: int) -> list[float]:
    """``probes`` GET /health, one after another, each on a new connection
    (as a kubelet probes)."""
    host, port = _address(server)
    latencies = []
    for _ in range(probes):
        started = time.perf_counter()
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        latencies.append(time.perf_counter() - started)
        writer.close()
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:100]
    return latencies


async def _slowloris(server: Server, stop: asyncio.Event) -> int:
    """A request head sent one header line every 0.2 s, never finished;
    the lines it got out before ``stop``."""
    host, port = _address(server)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: gateway\r\n")
    sent = 0
    while not stop.is_set():
        writer.write(b"X-Slow-%d: %s\r\n" % (sent, b"x" * 16))
        await writer.drain()
        sent += 1
        await asyncio.sleep(0.2)
    assert not reader.at_eof()  # still held
    writer.close()
    return sent


def test_idle_connections_and_a_slow_header_client_do_not_stop_health(holding: Server) -> None:
    async def scenario() -> tuple[list[float], int, int]:
        host, port = _address(holding)
        idle = [await asyncio.open_connection(host, port) for _ in range(IDLE_CONNECTIONS)]
        stop = asyncio.Event()
        slow = asyncio.ensure_future(_slowloris(holding, stop))
        await asyncio.sleep(1.0)
        latencies = await _health_latencies(holding, HEALTH_PROBES)
        stop.set()
        lines = await slow
        # Every idle connection was held open (no answer, no close) meanwhile.
        await asyncio.sleep(0.1)
        still_open = sum(1 for reader, _ in idle if not reader.at_eof())
        for _, writer in idle:
            writer.close()
        return latencies, lines, still_open

    latencies, lines, still_open = asyncio.run(scenario())
    assert still_open == IDLE_CONNECTIONS
    assert lines >= 5
    p99 = sorted(latencies)[int(len(latencies) * 0.99) - 1]
    assert p99 < 0.1, f"/health p99 {p99 * 1000:.1f} ms with {IDLE_CONNECTIONS} idle connections"


def test_a_burst_far_past_capacity_is_shed_and_the_gateway_recovers_at_once(
    holding: Server,
) -> None:
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}

    async def scenario() -> tuple[list[httpx.Response], float]:
        limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=0)
        async with httpx.AsyncClient(
            base_url=holding.root_url, headers=AUTH, limits=limits, timeout=120
        ) as client:
            answers = await asyncio.gather(
                *(client.post("/v1/chat/completions", json=body) for _ in range(BURST))
            )
            # Straight after the burst: served, not shed.
            started = time.monotonic()
            after = await client.post("/v1/chat/completions", json=body)
            assert after.status_code == 200, after.text
            return answers, time.monotonic() - started

    started = time.monotonic()
    answers, recovery = asyncio.run(scenario())
    assert time.monotonic() - started < 120
    statuses = Counter(answer.status_code for answer in answers)
    assert set(statuses) == {200, 503}, statuses
    assert statuses[503] >= BURST // 2, statuses
    for answer in answers:
        if answer.status_code == 503:
            assert answer.headers["retry-after"] == "1"
            error = answer.json()["error"]
            assert error["type"] == "server_error"
            assert error["code"] in ("server_overloaded", "engine_overloaded")
    assert recovery < 10, f"the first request after the burst took {recovery:.1f} s"
    metrics = httpx.get(f"{holding.root_url}/metrics", timeout=10).text
    assert 'nomoat_engine_requests_waiting{backend="embedded"} 0.0' in metrics
    assert 'nomoat_engine_requests_running{backend="embedded"} 0.0' in metrics


# ------------------------------------------------------------ strict limits


def test_too_many_headers_too_large_headers_and_a_long_url_are_refused(strict: Server) -> None:
    many = b"".join(b"X-H-%d: y\r\n" % i for i in range(25))
    status, error = _status_and_error(_raw(strict, b"GET /health HTTP/1.1\r\n" + many + b"\r\n"))
    assert (status, error["code"]) == (431, "request_too_large")
    assert "20 headers" in str(error["message"])
    big = b"X-Big: " + b"a" * 5000 + b"\r\n"
    status, error = _status_and_error(_raw(strict, b"GET /health HTTP/1.1\r\n" + big + b"\r\n"))
    assert (status, error["type"]) == (431, "invalid_request_error")
    # Sent in pieces: refused once the bytes pile up, before the head ends.
    with socket.create_connection(_address(strict), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nX-Endless: ")
        for _ in range(10):
            sock.sendall(b"a" * 1000)
        answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 431 ")
    long_url = b"GET /health?" + b"q" * 2000 + b" HTTP/1.1\r\nHost: g\r\n\r\n"
    status, error = _status_and_error(_raw(strict, long_url))
    assert (status, error["code"]) == (414, "request_too_large")


def test_a_slow_head_and_a_stalled_body_are_cut_off(strict: Server) -> None:
    started = time.monotonic()
    with socket.create_connection(_address(strict), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: g\r\n")
        answer = b""
        while not answer:
            time.sleep(0.2)
            try:
                sock.sendall(b"X-Slow: a\r\n")
            except OSError:
                break
            sock.settimeout(0.01)
            with contextlib.suppress(TimeoutError):
                answer = sock.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:100]
    assert 2.9 < time.monotonic() - started < 8
    # A connection that sends nothing is closed too, without an answer.
    started = time.monotonic()
    assert _raw(strict, b"") == b""
    assert 2.9 < time.monotonic() - started < 8
    # A body that stops: 408.
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: g\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 1000\r\n\r\n{"
    )
    status, error = _status_and_error(_raw(strict, head))
    assert (status, error["code"]) == (408, "request_timeout")


def test_connections_past_the_limit_replace_idle_ones_or_are_shed(strict: Server) -> None:
    host, port = _address(strict)

    async def scenario() -> tuple[list[bytes], list[float], int]:
        opened = [await asyncio.open_connection(host, port) for _ in range(40)]
        # A burst: the connections just opened are kept, the rest refused.
        refused = [await asyncio.wait_for(reader.read(), 5) for reader, _ in opened[20:]]
        # Once they have been idle a second, the longest idle ones make room
        # for new connections (before the 3 s header timeout closes them all).
        await asyncio.sleep(1.2)
        latencies = await _health_latencies(strict, 5)
        await asyncio.sleep(0.1)
        closed = sum(1 for reader, _ in opened[:20] if reader.at_eof())
        for _, writer in opened:
            writer.close()
        return refused, latencies, closed

    refused, latencies, closed = asyncio.run(scenario())
    for answer in refused:
        assert answer.startswith(b"HTTP/1.1 503 "), answer[:80]
        assert b"retry-after: 1\r\n" in answer
        assert b'"code":"server_overloaded"' in answer
    assert max(latencies) < 1
    # The first probe took the longest idle connection's place; it left
    # room behind it for the next ones.
    assert closed == 1
