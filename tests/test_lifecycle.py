"""Server lifecycle: liveness, readiness, and graceful shutdown on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import httpx
import msgspec
import pytest
import uvicorn
from conftest import API_KEY, MODEL, Server, config_with_key, running_server

from gateway.app import Runtime, _readiness
from gateway.catalog import plan
from gateway.cli import _Server
from gateway.contract import BackendHealth
from gateway.registry import discover
from gateway.settings import load_settings

NO_END = {"0": -100, "2": -100, "4": -100}
BACKEND = f"""
[backends.embedded]
type = "llamacpp"
threads = 1

[models.{MODEL}]
deployments = [{{ backend = "embedded" }}]
"""
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def stream_body(max_tokens: int) -> dict[str, object]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Write a very long story about a dragon."}],
        "temperature": 0,
        "logit_bias": NO_END,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def refused(root_url: str) -> bool:
    try:
        httpx.get(f"{root_url}/health", timeout=2)
    except httpx.ConnectError:
        return True
    except httpx.TransportError:
        return False
    return False


# ------------------------------------------------------- health, readiness


@pytest.mark.e2e
def test_health_is_ok_without_a_key(server: Server) -> None:
    response = httpx.get(f"{server.root_url}/health", timeout=30)
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


@pytest.mark.e2e
def test_ready_once_the_model_is_loaded(server: Server) -> None:
    response = httpx.get(f"{server.root_url}/ready", timeout=30)
    assert response.status_code == 200
    assert response.json() == {"status": "ready"}


def _runtime() -> Runtime:
    settings = load_settings(None)
    return Runtime(settings, plan(settings, discover()))


def _status(runtime: Runtime) -> tuple[int, object]:
    response = asyncio.run(_readiness(runtime))
    body = response.content
    assert isinstance(body, bytes)
    assert response.status_code is not None
    return response.status_code, msgspec.json.decode(body)


class _Backend:
    def __init__(self, ready: bool) -> None:
        self.ready = ready

    async def health(self) -> BackendHealth:
        return BackendHealth(ready=self.ready, detail="" if self.ready else "warming up")


def test_readiness_states() -> None:
    runtime = _runtime()
    assert _status(runtime) == (503, {"status": "starting"})
    runtime.pipeline = object()  # type: ignore[assignment]
    runtime.backends["embedded"] = _Backend(ready=False)  # type: ignore[assignment]
    code, _ = _status(runtime)
    assert code == 503
    runtime.backends["embedded"] = _Backend(ready=True)  # type: ignore[assignment]
    assert _status(runtime) == (200, {"status": "ready"})
    runtime.draining = True
    assert _status(runtime) == (503, {"status": "draining"})


def test_a_shutdown_signal_marks_the_runtime_draining() -> None:
    runtime = _runtime()
    server = _Server(uvicorn.Config(app=lambda *args: None), runtime)
    assert not runtime.draining
    server.handle_exit(signal.SIGTERM, None)
    assert runtime.draining
    assert server.should_exit


# ------------------------------------------------------- graceful shutdown


@pytest.mark.e2e
def test_sigterm_lets_a_running_stream_finish_then_exits_0(tmp_path: Path) -> None:
    # config_with_key sets shutdown_grace_seconds = 20.
    with running_server(tmp_path, config_with_key(BACKEND)) as live:
        url = f"{live.base_url}/chat/completions"
        events: list[str] = []
        signalled_at = 0.0
        refused_while_draining = False
        with (
            httpx.Client(timeout=120) as client,
            client.stream("POST", url, json=stream_body(150), headers=AUTH) as response,
        ):
            assert response.status_code == 200
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                events.append(line.removeprefix("data: "))
                if len(events) == 3:
                    live.process.send_signal(signal.SIGTERM)
                    signalled_at = time.monotonic()
                    # New connections are refused while this stream drains.
                    deadline = signalled_at + 10
                    while not refused_while_draining and time.monotonic() < deadline:
                        refused_while_draining = refused(live.root_url)
                        time.sleep(0.05)
        exit_code = live.process.wait(timeout=30)
        exited_after = time.monotonic() - signalled_at
        log = live.log()

    assert signalled_at, "the stream ended before three events"
    assert refused_while_draining, "new connections were still accepted after SIGTERM"
    assert events[-1] == "[DONE]", f"the stream was cut short: {events[-3:]}\n{log}"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "error" not in chunks[-1]
    usage = chunks[-1]["usage"]
    assert usage["completion_tokens"] == 150
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish[-1] == "length"
    assert exit_code == 0, log
    assert exited_after < 20, f"exited {exited_after:.1f}s after SIGTERM (grace 20s)"
    assert "Waiting for connections to close" in log


@pytest.mark.e2e
def test_sigterm_ends_streams_that_outlast_the_grace_period(tmp_path: Path) -> None:
    config = "[server]\nshutdown_grace_seconds = 2\n" + BACKEND
    with running_server(tmp_path, config) as live:
        url = f"{live.base_url}/chat/completions"
        events: list[str] = []
        signalled_at = 0.0
        outcome: list[BaseException] = []

        def read() -> None:
            try:
                with (
                    httpx.Client(timeout=120) as client,
                    client.stream("POST", url, json=stream_body(2000)) as response,
                ):
                    for line in response.iter_lines():
                        if line.startswith("data: "):
                            events.append(line.removeprefix("data: "))
            except httpx.HTTPError as error:
                outcome.append(error)

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        deadline = time.monotonic() + 60
        while len(events) < 3:
            assert time.monotonic() < deadline, "the stream did not start"
            time.sleep(0.02)
        live.process.send_signal(signal.SIGTERM)
        signalled_at = time.monotonic()
        exit_code = live.process.wait(timeout=60)
        exited_after = time.monotonic() - signalled_at
        reader.join(timeout=30)
        log = live.log()

    assert not reader.is_alive()
    assert exit_code == 0, log
    # The grace period (2s) bounds the wait; a 2000-token answer takes far longer here.
    assert exited_after < 2 + 15, f"exited {exited_after:.1f}s after SIGTERM"
    assert "timeout graceful shutdown exceeded" in log
    # A cut stream never ends with [DONE]: the client knows it is incomplete.
    assert events[-1] != "[DONE]"
    assert len(events) < 2000
