"""``nomoat serve --workers N``: N processes serving one port.

The parent binds the listening socket, forks the workers (each inherits the
socket and the kernel spreads connections between them), and then only waits:
SIGTERM or SIGINT is passed on to every worker (as SIGTERM), each drains its own streams
(``server.shutdown_grace_seconds``), and the parent exits once they all have,
0 if every worker exited 0. A worker that dies on its own takes the others
down with it (SIGTERM, so they drain): a supervisor (systemd, Kubernetes)
restarts the whole gateway, rather than the parent running one worker short
without anyone knowing.

Each worker is a whole gateway: its own backends, connection pools, probes,
routing state (in-flight counts, latency averages, cooldowns, round-robin
positions) and limits (``limits.max_requests``, ``limits.max_connections``
and every ``max_concurrency`` apply per worker). Nothing is shared between
workers today; what must be (accounting, once there is any) needs a store of
its own that every worker writes to. The embedded engine
(``llamacpp`` backends, the model inside the process) is refused with more
than one worker: each worker would load its own copy of the model and the
copies would fight over the same cores; run it as ``nomoat edge`` and route to
it as an ``edge`` backend. ``/status`` and ``/metrics`` answer for the worker
that took the connection (``worker`` and ``workers`` in ``/status``,
``nomoat_worker_info{worker}`` and ``nomoat_workers`` in ``/metrics``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
from collections.abc import Callable
from types import FrameType

_log = logging.getLogger(__name__)
# Types of backend that run the engine inside the gateway's process.
EMBEDDED_TYPES = frozenset({"llamacpp"})
BACKLOG = 2048


def embedded_refusal(backend_types: dict[str, str], workers: int) -> str | None:
    """Why ``workers`` cannot serve these backends, or None."""
    embedded = sorted(name for name, kind in backend_types.items() if kind in EMBEDDED_TYPES)
    if workers <= 1 or not embedded:
        return None
    return (
        f"nomoat: --workers {workers} cannot serve the embedded engine (backends: "
        f"{', '.join(embedded)}): each worker would load its own copy of the model. "
        'Run it as `nomoat edge` and route to it as a backend of type "edge", '
        "or serve with one worker."
    )


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound to ``host`` (an IPv6 address when it has a colon) and listening."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    return socket.create_server((host, port), family=family, backlog=BACKLOG)


def run_workers(workers: int, sock: socket.socket, worker: Callable[[int], int]) -> int:
    """Fork ``workers`` processes running ``worker(index)`` (each returns its
    exit code), pass stop signals on, wait for all; the worst exit code."""
    children: dict[int, int] = {}
    for index in range(workers):
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                code = worker(index)
            except BaseException:
                _log.exception("worker %d failed", index)
            finally:
                os._exit(code)
        children[pid] = index
    sock.close()  # the workers accept; the parent only waits
    stopping = False

    def stop(sig: int, frame: FrameType | None) -> None:
        # Always SIGTERM: a Ctrl-C reaches the workers too (one process
        # group), and a second SIGINT would make uvicorn skip the drain; a
        # second SIGTERM does nothing.
        nonlocal stopping
        stopping = True
        for pid in children:
            with contextlib.suppress(ProcessLookupError):  # already gone
                os.kill(pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    worst = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        index = children.pop(pid, -1)
        code = os.waitstatus_to_exitcode(status)
        if code != 0:
            worst = worst or (code if code > 0 else 1)
        if not stopping:
            _log.error("worker %d exited (%d) on its own: stopping the others", index, code)
            stop(signal.SIGTERM, None)
    return worst
