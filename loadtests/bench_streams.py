"""Streaming at scale: many concurrent streams through nomoat, beside direct.

Two fake upstreams (``loadtests/fake_upstream.py``, vLLM-shaped, chunks
``--gap-ms`` apart: one streaming 64 content chunks, one 200) and ``nomoat
serve`` (one worker unless ``--workers``) in front of them. In each shape the
same raw client opens the same streams straight at the fake (``direct``), then
through nomoat, and times every SSE event as its bytes arrive:

- burst: 128, 512 and 2,048 streams of 64 chunks, all started at once;
- held: 512 streams of 200 chunks, started evenly over 2 s (all open together
  for about 2 s).

Reported per shape and path: streams that failed, time to first chunk (TTFC:
from opening the connection to the first event) p50/p99, the gaps between
consecutive events p50/p99 (events that arrive in one read count once, so a
server that falls behind shows as a longer gap), and nomoat's added TTFC
(its percentile minus direct's).

A burst on a fresh gateway finds its connection pool to the upstream empty:
each of its streams also opens a connection (the kernel's handshake, the
event loop's wait for it). ``--again`` runs each burst a second time right
after the first, reported as "<shape>, again": the pool then holds the first
burst's connections (kept alive for 15 s), as it does for a gateway that has
served as many streams at once in the last seconds.

The client is one process on uvloop with an ``asyncio.Protocol`` per
connection (no coroutine per read), so it costs a few microseconds an event;
at 2,048 streams 20 ms apart that is still 100,000 events a second, more
than one core of this machine can take: say where the client is the limit.
Placement (``taskset``, 2 cores): nomoat alone on core 0; the fakes and the
client on core 1.

    .venv/bin/python loadtests/bench_streams.py --json /tmp/streams.json

Loopback only; the API key is a published test key.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import cast

HERE = Path(__file__).resolve().parent
KEY = "sk-bench-not-secret-0123456789"
KEY_HASH = "sha256:2986b7864d51218b9baebab55b680a48d99278107423662024d6fdb5e61234c6"
ENGINE_MODEL = "fake-slow-model"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class StreamTiming:
    opened: float
    first: float | None = None
    arrivals: list[float] = field(default_factory=list)
    done: bool = False
    error: str | None = None


class _Stream(asyncio.Protocol):
    """One streamed request: events timed as their bytes arrive."""

    def __init__(self, request: bytes, timing: StreamTiming, finished: asyncio.Future[None]):
        self._request = request
        self._timing = timing
        self._finished = finished
        self._head = True
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)
        self._transport.write(self._request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        timing = self._timing
        if self._head:
            self._head = False
            if not data.startswith(b"HTTP/1.1 200"):
                timing.error = data[:200].decode("latin-1", "replace")
                self._transport.close()
                return
        # Events end with a blank line; HTTP chunk framing uses \r\n only.
        seen = self._tail + data
        count = seen.count(b"\n\n")
        self._tail = seen[-1:]
        if count:
            if timing.first is None:
                timing.first = now - timing.opened
            timing.arrivals.append(now)
        if b"data: [DONE]" in seen:
            timing.done = True
            self._transport.close()
        elif b'data: {"error"' in seen:
            timing.error = "error event"
            self._transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._finished.done():
            self._finished.set_result(None)


def _request(port: int, model: str, key: str | None) -> bytes:
    body = json.dumps(
        {"model": model, "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    ).encode()
    head = [
        "POST /v1/chat/completions HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        "Connection: close",
    ]
    if key:
        head.append(f"Authorization: Bearer {key}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def _one(port: int, request: bytes, delay: float, seconds: float) -> StreamTiming:
    await asyncio.sleep(delay)
    loop = asyncio.get_running_loop()
    timing = StreamTiming(time.perf_counter())
    finished: asyncio.Future[None] = loop.create_future()
    try:
        async with asyncio.timeout(seconds):
            transport, _ = await loop.create_connection(
                lambda: _Stream(request, timing, finished), "127.0.0.1", port
            )
            try:
                await finished
            finally:
                transport.close()
    except (OSError, TimeoutError) as error:
        timing.error = f"{type(error).__name__}: {error}"
    if not timing.done and timing.error is None:
        timing.error = "ended without [DONE]"
    return timing


async def run_shape(
    port: int, model: str, key: str | None, streams: int, spread: float, seconds: float
) -> list[StreamTiming]:
    request = _request(port, model, key)
    return await asyncio.gather(
        *(_one(port, request, spread * i / streams, seconds) for i in range(streams))
    )


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=1000, method="inclusive")[round(q * 1000) - 1]


@dataclass
class Summary:
    streams: int
    failed: int
    ttfc_p50_ms: float
    ttfc_p99_ms: float
    gap_p50_ms: float
    gap_p99_ms: float
    errors: list[str]
    # CPU seconds the server process spent on the shape (user + system;
    # none for direct): what the shape cost, whatever else ran meanwhile.
    cpu_seconds: float | None = None


def summarize(timings: list[StreamTiming]) -> Summary:
    ok = [t for t in timings if t.done and t.first is not None]
    firsts = [t.first * 1000 for t in ok if t.first is not None]
    gaps = [
        (later - earlier) * 1000
        for t in ok
        for earlier, later in zip(t.arrivals, t.arrivals[1:], strict=False)
    ]
    errors = sorted({t.error for t in timings if t.error})[:5]
    return Summary(
        streams=len(timings),
        failed=len(timings) - len(ok),
        ttfc_p50_ms=_percentile(firsts, 0.50),
        ttfc_p99_ms=_percentile(firsts, 0.99),
        gap_p50_ms=_percentile(gaps, 0.50),
        gap_p99_ms=_percentile(gaps, 0.99),
        errors=errors,
    )


def _config(port: int, burst_port: int, held_port: int, client: str) -> str:
    return f"""
[server]
host = "127.0.0.1"
port = {port}
api_key_hashes = ["{KEY_HASH}"]
log_level = "warning"

[limits]
# The default (512) sheds a burst of 2,048 with 503s: the benchmark is about
# relaying them, so every stream is let in.
max_requests = 8192

[plugins]
disabled = ["llamacpp"]

[backends.burst]
type = "vllm"
base_url = "http://127.0.0.1:{burst_port}/v1"
models = ["{ENGINE_MODEL}"]
stream_client = "{client}"

[backends.held]
type = "vllm"
base_url = "http://127.0.0.1:{held_port}/v1"
models = ["{ENGINE_MODEL}"]
stream_client = "{client}"

[models.burst]
deployments = [{{ backend = "burst", model = "{ENGINE_MODEL}" }}]

[models.held]
deployments = [{{ backend = "held", model = "{ENGINE_MODEL}" }}]
"""


def _cpu_seconds(pid: int) -> float:
    """The process's and its children's CPU time so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = sum(int(f) for f in fields[11:15])  # utime, stime, cutime, cstime
    return ticks / os.sysconf("SC_CLK_TCK")


def _pinned(core: int | None, command: list[str]) -> list[str]:
    if core is None or shutil.which("taskset") is None:
        return command
    return ["taskset", "-c", str(core), *command]


def _wait_ready(url: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as reply:
                if reply.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"{url} not ready")


@dataclass(frozen=True)
class Shape:
    name: str
    model: str
    streams: int
    spread: float


SHAPES = (
    Shape("burst 128", "burst", 128, 0.0),
    Shape("burst 512", "burst", 512, 0.0),
    Shape("burst 2048", "burst", 2048, 0.0),
    Shape("held 512", "held", 512, 2.0),
)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gap-ms", type=float, default=20.0, help="between chunks upstream")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--server-core", type=int, default=0)
    parser.add_argument("--client-core", type=int, default=1)
    parser.add_argument("--no-pin", action="store_true", help="no taskset")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per stream")
    parser.add_argument("--only", action="append", default=[], help="shape names to run")
    parser.add_argument("--nomoat-cmd", default=f"{sys.executable} -m gateway.cli serve")
    parser.add_argument(
        "--client",
        choices=("own", "aiohttp"),
        default="own",
        help="the relay's upstream client (backends' stream_client)",
    )
    parser.add_argument(
        "--again",
        action="store_true",
        help="run each burst a second time, its upstream connections kept from the first",
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    server_core = None if args.no_pin else args.server_core
    client_core = None if args.no_pin else args.client_core
    if client_core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {client_core})
    burst_port, held_port, port = _free_port(), _free_port(), _free_port()
    fake = [sys.executable, str(HERE / "fake_upstream.py"), "--chunk-delay-ms", str(args.gap_ms)]
    processes = [
        subprocess.Popen(
            _pinned(client_core, [*fake, "--port", str(p), "--chunks", str(n)]),
            stdout=subprocess.DEVNULL,
        )
        for p, n in ((burst_port, 64), (held_port, 200))
    ]
    shapes = [s for s in SHAPES if not args.only or s.name in args.only]
    if args.again:
        shapes = [
            again
            for shape in shapes
            for again in (
                (shape, replace(shape, name=f"{shape.name}, again"))
                if shape.spread == 0
                else (shape,)
            )
        ]
    results: dict[str, dict[str, Summary]] = {}
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "nomoat.toml"
        config.write_text(_config(port, burst_port, held_port, args.client))
        command = [*args.nomoat_cmd.split(), "--config", str(config)]
        if args.workers > 1:
            command += ["--workers", str(args.workers)]
        log = (Path(tmp) / "nomoat.log").open("wb")
        # The ledger (accounting) in the run's directory, never the user's.
        env = {**os.environ, "XDG_DATA_HOME": tmp}
        processes.append(
            subprocess.Popen(
                _pinned(server_core, command), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        )
        try:
            _wait_ready(f"http://127.0.0.1:{port}/ready", time.monotonic() + 120)
            runner = _runner()
            for shape in shapes:
                upstream = burst_port if shape.model == "burst" else held_port
                direct = runner.run(
                    run_shape(
                        upstream, ENGINE_MODEL, None, shape.streams, shape.spread, args.timeout
                    )
                )
                time.sleep(1.0)
                server = processes[-1].pid
                cpu_before = _cpu_seconds(server)
                through = runner.run(
                    run_shape(port, shape.model, KEY, shape.streams, shape.spread, args.timeout)
                )
                cpu = _cpu_seconds(server) - cpu_before
                time.sleep(1.0)
                results[shape.name] = {
                    "direct": summarize(direct),
                    "nomoat": replace(summarize(through), cpu_seconds=cpu),
                }
                _print_shape(shape.name, results[shape.name])
            runner.close()
        finally:
            for process in processes:
                process.terminate()
            for process in processes:
                process.wait(30)
            log.close()
    load_after = os.getloadavg()
    print(f"load average (1, 5, 15 min): before {load_before}, after {load_after}")
    if args.json is not None:
        data = {
            "gap_ms": args.gap_ms,
            "workers": args.workers,
            "client": args.client,
            "load_before": load_before,
            "load_after": load_after,
            "shapes": {k: {p: asdict(s) for p, s in v.items()} for k, v in results.items()},
        }
        args.json.write_text(json.dumps(data, indent=2))
    return 0


def _runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _print_shape(name: str, paths: dict[str, Summary]) -> None:
    direct, nomoat = paths["direct"], paths["nomoat"]
    print(f"== {name}")
    print("path    streams failed  TTFC p50  TTFC p99   gap p50   gap p99  (ms)")
    for label, s in paths.items():
        print(
            f"{label:7} {s.streams:7} {s.failed:6} {s.ttfc_p50_ms:9.1f} {s.ttfc_p99_ms:9.1f} "
            f"{s.gap_p50_ms:9.1f} {s.gap_p99_ms:9.1f}"
        )
        for error in s.errors:
            print(f"        error: {error}")
    if nomoat.cpu_seconds is not None:
        print(
            f"nomoat CPU {nomoat.cpu_seconds:.2f} s, "
            f"{nomoat.cpu_seconds * 1000 / max(nomoat.streams, 1):.2f} ms a stream"
        )
    print(
        f"added TTFC p50 {nomoat.ttfc_p50_ms - direct.ttfc_p50_ms:.1f} ms, "
        f"p99 {nomoat.ttfc_p99_ms - direct.ttfc_p99_ms:.1f} ms; "
        f"gap p99 {nomoat.gap_p99_ms / direct.gap_p99_ms:.2f}x direct's"
    )


if __name__ == "__main__":
    sys.exit(main())
