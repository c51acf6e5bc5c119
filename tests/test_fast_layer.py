"""The guard of the fast layer (tests/fast_layer.py) refuses what it must."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.fast_layer import FastLayerError, install, launches_engine_or_server


@pytest.mark.parametrize(
    ("argv", "what"),
    [
        ([sys.executable, "-m", "gateway.cli", "serve", "--config", "x.toml"], "`serve`"),
        (["/venv/bin/nomoat", "edge", "--threads", "1"], "`edge`"),
        (["nomoat", "doctor"], "`doctor`"),
        ([sys.executable, "-m", "gateway.engine.smoke", "m.gguf"], "`gateway.engine.smoke`"),
        ([sys.executable, "loadtests/fake_upstream.py", "--port", "9000"], "a server (--port)"),
        (["vllm", "serve", "model"], "vLLM"),
        (["/opt/vllm-env/bin/python", "-m", "vllm.entrypoints.openai.api_server"], "vLLM"),
        (["llama-server", "-m", "x.gguf"], "`llama-server`"),
    ],
)
def test_servers_and_engines_are_recognised(argv: list[str], what: str) -> None:
    assert launches_engine_or_server(argv) == what


@pytest.mark.parametrize(
    "argv",
    [
        [sys.executable, "-m", "gateway.cli", "check-config", "x.toml"],
        [sys.executable, "-m", "pip", "--version"],
        ["git", "status"],
    ],
)
def test_other_commands_are_not(argv: list[str]) -> None:
    assert launches_engine_or_server(argv) is None


@pytest.fixture
def guarded() -> Iterator[None]:
    monkeypatch = pytest.MonkeyPatch()
    install(monkeypatch)
    yield
    monkeypatch.undo()


@pytest.mark.usefixtures("guarded")
def test_the_guard_refuses_a_server_and_lets_a_command_run() -> None:
    with pytest.raises(FastLayerError, match="mark the test `e2e`"):
        subprocess.run([sys.executable, "-m", "gateway.cli", "serve"], check=False)
    done = subprocess.run([sys.executable, "-c", "print(7)"], capture_output=True, check=True)
    assert done.stdout == b"7\n"


@pytest.mark.usefixtures("guarded")
def test_the_guard_refuses_a_listening_socket_and_a_model() -> None:
    with socket.socket() as sock, pytest.raises(FastLayerError, match="listening socket"):
        sock.bind(("127.0.0.1", 0))
        sock.listen()
    from gateway.engine.native import NativeModel

    with pytest.raises(FastLayerError, match="NativeModel"):
        NativeModel("/nowhere.gguf")  # type: ignore[arg-type]
