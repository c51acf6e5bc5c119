"""Test helpers and pytest fixtures for plugin authors.

Registered as the pytest plugin ``nomoat`` (entry point ``pytest11``), so with
nomoat installed the fixtures below are available in any test, without a
``conftest.py``:

``nomoat_context``
    A :class:`~gateway.contract.RequestContext` (key ``"test-key"``).
``nomoat_hooks``
    ``nomoat_hooks(hook, ...)`` gives a :class:`HookRunner`: the hooks in a
    :class:`~gateway.hooks.HookChain`, exactly as the gateway runs them
    (config order, fail-open or fail-closed), callable from plain sync tests.
``nomoat_gateway``
    ``with nomoat_gateway(config_text) as gw:`` runs a real ``nomoat serve``
    (with the installed plugins) on a free loopback port, for end-to-end tests.

The plain functions build what the hooks and policies receive:
:func:`context`, :func:`chat_request`, :func:`completion_request`,
:func:`chat_completion`, :func:`completion`, :func:`candidates`; and they run
components the way the gateway does: :func:`build_hook` / :func:`build_policy`
validate options with the component's config model, :func:`rank` calls a
policy with fresh stats. Async tests can use :func:`hook_chain` directly.

Without an engine or a server: :class:`FakeBackend` (backend type ``"fake"``,
offered by :data:`fake_manifest`) answers from a :class:`Script` in OpenAI's
exact shape and records every call, and
:func:`gateway.testing.inprocess.in_process_gateway` runs the real gateway in
the test's event loop, with an ``httpx`` client and the ``openai`` SDK wired
to it.

A test that starts an engine or a server should be marked ``e2e`` (the marker
is registered here), so that ``pytest -m "not e2e"`` runs only the fast ones.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from pydantic import BaseModel

from gateway import wire
from gateway.auth import hash_api_key
from gateway.contract import (
    AnyChunk,
    AnyRequest,
    AnyResponse,
    Candidate,
    CandidateStats,
    GatewayError,
    HookType,
    PluginManifest,
    PolicyType,
    RankedCandidate,
    RequestContext,
    RoutingPolicy,
    Target,
)
from gateway.hooks import BoundHook, HookChain
from gateway.settings import EMBEDDED_MODEL
from gateway.testing.fake import FakeBackend, FakeBackendConfig, FakeCall, Script
from gateway.testing.fake import manifest as fake_manifest

__all__ = [
    "FakeBackend",
    "FakeBackendConfig",
    "FakeCall",
    "HookRunner",
    "LiveGateway",
    "Script",
    "bind",
    "build_hook",
    "build_policy",
    "candidates",
    "chat_completion",
    "chat_request",
    "completion",
    "completion_request",
    "context",
    "fake_manifest",
    "gateway_config",
    "hook_chain",
    "rank",
    "running_gateway",
]

T = TypeVar("T")
MODEL = EMBEDDED_MODEL
TEST_KEY = "sk-nomoat-plugin-test-0123456789"
STARTUP_SECONDS = 180.0

# ------------------------------------------------------------------ builders


def context(
    request_id: str = "chatcmpl-test", api_key_id: str | None = "test-key", **fields: Any
) -> RequestContext:
    """A request context; ``fields`` may set ``created`` and ``deadline``."""
    fields.setdefault("created", int(time.time()))
    return RequestContext(request_id=request_id, api_key_id=api_key_id, **fields)


def chat_request(
    content: str = "Hello", *, model: str = MODEL, **fields: Any
) -> wire.ChatCompletionRequest:
    """A chat request with one user message (or ``messages=[...]`` as JSON-like
    dicts), validated exactly as the gateway's decoder validates a body."""
    fields.setdefault("messages", [{"role": "user", "content": content}])
    body = msgspec.json.encode({"model": model, **fields})
    return wire.chat_request_decoder.decode(body)


def completion_request(
    prompt: str | Sequence[str | int | Sequence[int]] = "Hello",
    *,
    model: str = MODEL,
    **fields: Any,
) -> wire.CompletionRequest:
    body = msgspec.json.encode({"model": model, "prompt": prompt, **fields})
    return wire.completion_request_decoder.decode(body)


def _usage(prompt_tokens: int, completion_tokens: int) -> wire.Usage:
    total = prompt_tokens + completion_tokens
    return wire.Usage(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=total
    )


def chat_completion(
    content: str = "Hi!", *, id: str = "chatcmpl-test", model: str = MODEL, created: int = 0
) -> wire.ChatCompletion:
    """A one-choice chat response, as a backend would return it."""
    message = wire.ResponseMessage(role="assistant", content=content, refusal=None)
    choice = wire.ChatChoice(index=0, message=message, logprobs=None, finish_reason="stop")
    return wire.ChatCompletion(
        id=id,
        object="chat.completion",
        created=created,
        model=model,
        choices=[choice],
        usage=_usage(5, 2),
    )


def completion(
    text: str = "Hi!", *, id: str = "cmpl-test", model: str = MODEL, created: int = 0
) -> wire.Completion:
    choice = wire.CompletionChoice(index=0, text=text, logprobs=None, finish_reason="stop")
    return wire.Completion(
        id=id,
        object="text_completion",
        created=created,
        model=model,
        choices=[choice],
        usage=_usage(5, 2),
    )


def candidates(count: int = 2, model: str = MODEL, backend: str = "embedded") -> list[Candidate]:
    """``count`` deployments of ``model``, with ids ``"<model>/<index>"``."""
    return [Candidate(Target(model, model, f"{model}/{index}"), backend) for index in range(count)]


# ------------------------------------------------------- components, as configured


def build_hook(
    hook: HookType[Any] | PluginManifest, options: Mapping[str, Any] | None = None, name: str = ""
) -> object:
    """Validate ``options`` with the hook's config model and build it, as
    ``[[hooks]]`` does. Pass a manifest and the hook's ``name`` to build it
    through the manifest (which also checks the manifest offers it)."""
    hook_type = hook.hooks[name] if isinstance(hook, PluginManifest) else hook
    return hook_type.factory(hook_type.config_model.model_validate(dict(options or {})))


def build_policy(
    policy: PolicyType[Any] | PluginManifest,
    options: Mapping[str, Any] | None = None,
    name: str = "",
) -> RoutingPolicy:
    """Like :func:`build_hook`, for ``policy`` / ``policy_options``."""
    policy_type = policy.policies[name] if isinstance(policy, PluginManifest) else policy
    config: BaseModel = policy_type.config_model.model_validate(dict(options or {}))
    return policy_type.factory(config)


def rank(
    policy: RoutingPolicy,
    pool: Iterable[Candidate] | None = None,
    request: AnyRequest | None = None,
    ctx: RequestContext | None = None,
    stats: Mapping[str, CandidateStats] | None = None,
) -> list[RankedCandidate]:
    """``policy.rank`` with defaults: two candidates, idle stats."""
    pool = list(candidates() if pool is None else pool)
    known = dict(stats or {})
    for candidate in pool:
        known.setdefault(candidate.target.deployment, CandidateStats())
    return policy.rank(request or chat_request(), ctx or context(), pool, known)


def bind(hook: object, label: str = "", fail_open: bool = False) -> BoundHook:
    """A hook as a ``[[hooks]]`` entry binds it (label defaults to its class)."""
    return BoundHook(label or type(hook).__name__, fail_open, hook)


def hook_chain(*hooks: object, fail_open: bool = False) -> HookChain:
    """A chain of hooks (plain objects or :func:`bind` results), in order."""
    return HookChain(
        [h if isinstance(h, BoundHook) else bind(h, fail_open=fail_open) for h in hooks]
    )


class HookRunner:
    """A :class:`HookChain` and an event loop: run hooks from sync tests.

    Every call runs on the same loop, so a hook may keep loop-bound state.
    """

    def __init__(self, chain: HookChain, runner: asyncio.Runner) -> None:
        self.chain = chain
        self._runner = runner

    def run(self, awaitable: Awaitable[T]) -> T:
        async def wait() -> T:
            return await awaitable

        return self._runner.run(wait())

    def on_request(
        self, request: AnyRequest, ctx: RequestContext | None = None
    ) -> AnyRequest | AnyResponse:
        return self.run(self.chain.on_request(request, ctx or context()))

    def on_response(
        self, request: AnyRequest, response: AnyResponse, ctx: RequestContext | None = None
    ) -> AnyResponse:
        return self.run(self.chain.on_response(request, response, ctx or context()))

    def on_stream(
        self, request: AnyRequest, chunks: Iterable[AnyChunk], ctx: RequestContext | None = None
    ) -> list[AnyChunk]:
        """Feed ``chunks`` through the stream hooks; what the client would get."""

        async def source() -> AsyncIterator[AnyChunk]:
            for chunk in chunks:
                yield chunk

        async def collect() -> list[AnyChunk]:
            stream = self.chain.on_stream(request, source(), ctx or context())
            return [chunk async for chunk in stream]

        return self.run(collect())

    def on_error(
        self, request: AnyRequest | None, error: GatewayError, ctx: RequestContext | None = None
    ) -> None:
        self.run(self.chain.on_error(request, error, ctx or context()))


# ------------------------------------------------------------------ live gateway


@dataclass(frozen=True)
class LiveGateway:
    base_url: str  # ends in /v1: give it to the openai SDK
    root_url: str
    api_key: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def gateway_config(extra: str = "", api_keys: Iterable[str] = (TEST_KEY,)) -> str:
    """A config serving the embedded model, requiring ``api_keys``; ``extra``
    (TOML, dedented) is appended: ``[[hooks]]`` entries, models, etc."""
    hashes = ", ".join(f'"{hash_api_key(key)}"' for key in api_keys)
    head = f"[server]\napi_key_hashes = [{hashes}]\nshutdown_grace_seconds = 20\n"
    return head + textwrap.dedent(extra)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def running_gateway(
    directory: Path,
    config_text: str,
    *,
    api_key: str = TEST_KEY,
    command: list[str] | None = None,
    startup_seconds: float = STARTUP_SECONDS,
    extra_args: Sequence[str] = (),
) -> Iterator[LiveGateway]:
    """Run ``nomoat serve`` with this config until the block ends.

    ``command`` replaces ``[python, -m, gateway.cli]`` (e.g. another venv's
    ``nomoat``); the config and port arguments, then ``extra_args``, are appended.
    """
    config = directory / "nomoat.toml"
    config.write_text(config_text)
    port = _free_port()
    log_path = directory / "server.log"
    argv = [*(command or [sys.executable, "-m", "gateway.cli"]), "serve"]
    argv += ["--config", str(config), "--port", str(port), *extra_args]
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=isolated_environment(directory)
        )
    root = f"http://127.0.0.1:{port}"
    live = LiveGateway(f"{root}/v1", root, api_key, process, log_path)
    try:
        _wait_ready(live, startup_seconds)
        yield live
    finally:
        _stop(process)


def isolated_environment(directory: Path) -> dict[str, str]:
    """This environment, with the user's data directory moved under
    ``directory``: a gateway's default accounting database (SQLite in
    $XDG_DATA_HOME/nomoat) is the test's, never the real user's."""
    return {**os.environ, "XDG_DATA_HOME": str(directory / "data")}


# Straight to loopback, whatever proxy the environment names.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _wait_ready(live: LiveGateway, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if live.process.poll() is not None:
            raise RuntimeError(f"nomoat serve exited early:\n{live.log()}")
        try:
            with _DIRECT.open(f"{live.root_url}/ready", timeout=2) as reply:
                if reply.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"nomoat serve not ready after {seconds:g}s:\n{live.log()}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


# ---------------------------------------------------------------------- fixtures

E2E_MARKER = "e2e: starts an engine or a server; the fast layer is -m 'not e2e'"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", E2E_MARKER)


@pytest.fixture
def nomoat_context() -> RequestContext:
    return context()


@pytest.fixture
def nomoat_hooks() -> Iterator[Callable[..., HookRunner]]:
    """``nomoat_hooks(hook, ..., fail_open=False) -> HookRunner``."""
    with asyncio.Runner() as runner:

        def make(*hooks: object, fail_open: bool = False) -> HookRunner:
            return HookRunner(hook_chain(*hooks, fail_open=fail_open), runner)

        yield make


@pytest.fixture
def nomoat_gateway(
    tmp_path: Path,
) -> Callable[..., AbstractContextManager[LiveGateway]]:
    """``with nomoat_gateway(config_text, api_key=TEST_KEY) as gw:``; see
    :func:`running_gateway` and :func:`gateway_config`."""

    def start(config_text: str, **options: Any) -> AbstractContextManager[LiveGateway]:
        return running_gateway(tmp_path, config_text, **options)

    return start
