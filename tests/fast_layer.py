"""The fast layer's guard: a run that selects no ``e2e`` test must start no
engine and no server. While it is on, a test that starts one by accident
(a fixture it did not know was live, a helper that spawns ``nomoat serve``)
fails at once with :class:`FastLayerError`, telling to mark it ``e2e``.

What counts as starting one:

- a child process that serves or runs an engine: ``nomoat serve``, ``edge``
  or ``doctor``, anything given a ``--port``, vLLM, ``llama-server``, the
  llama.cpp smoke test;
- a socket that listens, in this process (an HTTP server of a test's own);
- a llama.cpp model loaded in this process (``NativeModel``, ``llama_cpp.Llama``).
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Callable, Sequence
from pathlib import PurePath
from typing import Any

import pytest

HINT = "mark the test `e2e` (pytestmark = pytest.mark.e2e, or @pytest.mark.e2e)"
_SERVING_COMMANDS = frozenset({"serve", "edge", "doctor", "llama-server", "gateway.engine.smoke"})


class FastLayerError(RuntimeError):
    """A test outside the e2e layer started an engine or a server."""


def launches_engine_or_server(argv: Sequence[str]) -> str | None:
    """What ``argv`` would start, if it is an engine or a server."""
    words = [PurePath(str(word)).name for word in argv]
    for word in words:
        if word in _SERVING_COMMANDS:
            return f"`{word}`"
        if word == "--port" or word.startswith("--port="):
            return "a server (--port)"
        if "vllm" in word:
            return "vLLM"
    return None


def _refused(what: str) -> FastLayerError:
    test = os.environ.get("PYTEST_CURRENT_TEST", "a test").rsplit(" ", 1)[0]
    return FastLayerError(f"{test} started {what} in a fast run (-m 'not e2e'): {HINT}")


class _GuardedPopen(subprocess.Popen):  # type: ignore[type-arg]
    def __init__(self, args: Any, *rest: Any, **options: Any) -> None:
        argv = [args] if isinstance(args, str | bytes | os.PathLike) else list(args)
        if options.get("shell") and argv:
            argv = str(argv[0]).split()
        what = launches_engine_or_server([os.fsdecode(a) for a in argv])
        if what is not None:
            raise _refused(what)
        super().__init__(args, *rest, **options)


def _refuse(what: str) -> Callable[..., None]:
    def refuse(*args: object, **kwargs: object) -> None:
        raise _refused(what)

    return refuse


def install(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refuse engines and servers until ``monkeypatch`` is undone."""
    monkeypatch.setattr(subprocess, "Popen", _GuardedPopen)
    monkeypatch.setattr(socket.socket, "listen", _refuse("a listening socket"))
    from gateway.engine.native import NativeModel

    monkeypatch.setattr(NativeModel, "__init__", _refuse("a llama.cpp model (NativeModel)"))
    import llama_cpp

    monkeypatch.setattr(llama_cpp.Llama, "__init__", _refuse("a llama.cpp model (Llama)"))


def guard_if_fast(session: pytest.Session) -> None:
    """On when the selected tests are all fast; undone when the run ends."""
    if not session.items or any(item.get_closest_marker("e2e") for item in session.items):
        return
    monkeypatch = pytest.MonkeyPatch()
    install(monkeypatch)
    session.config.add_cleanup(monkeypatch.undo)
