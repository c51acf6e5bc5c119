"""Fixtures: a live `nomoat serve` process with the real embedded model.

Tests talk to it over loopback exactly as users do: with the official `openai`
SDK (retries off) or raw HTTP.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from gateway.settings import hash_api_key

MODEL = "smollm2-135m-instruct"
API_KEY = "sk-nomoat-test-0123456789abcdef"
STARTUP_SECONDS = 180


@dataclass(frozen=True)
class Server:
    base_url: str  # ends in /v1
    root_url: str
    api_key: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def config_with_key(extra: str = "") -> str:
    """A config that serves the embedded model with API_KEY required."""
    return textwrap.dedent(
        f"""
        [server]
        api_key_hashes = ["{hash_api_key(API_KEY)}"]
        shutdown_grace_seconds = 20
        """
    ) + textwrap.dedent(extra)


@contextmanager
def running_server(tmp_path: Path, config_text: str, *args: str) -> Iterator[Server]:
    """Start `nomoat serve` with this config; wait until /ready; stop it after."""
    config = tmp_path / "nomoat.toml"
    config.write_text(config_text)
    port = free_port()
    log_path = tmp_path / "server.log"
    command = [sys.executable, "-m", "gateway.cli", "serve", "--config", str(config)]
    command += ["--port", str(port), *args]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    root = f"http://127.0.0.1:{port}"
    server = Server(f"{root}/v1", root, API_KEY, process, log_path)
    try:
        _wait_ready(server)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_ready(server: Server) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"nomoat serve exited early:\n{server.log()}")
        try:
            if httpx.get(f"{server.root_url}/ready", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"nomoat serve not ready after {STARTUP_SECONDS}s:\n{server.log()}")


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One shared gateway for the whole run (the model loads once)."""
    with running_server(tmp_path_factory.mktemp("gateway"), config_with_key()) as live:
        yield live


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)


@pytest.fixture
def async_client(server: Server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key=server.api_key, max_retries=0)


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    """Raw HTTP with the API key, for wire-format checks."""
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.Client(base_url=server.root_url, headers=headers, timeout=120) as raw:
        yield raw


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
