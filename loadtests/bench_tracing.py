"""What tracing costs a request, in process: the real gateway (as
``nomoat serve`` builds it) with a fake backend and an httpx client on one
event loop (``gateway.testing.inprocess``), sequential requests, tracing off
against tracing on (every request sampled, spans exported over OTLP
http/protobuf to ``tests/otlp_receiver.py`` in its own process), the two
alternating, best of N runs each.

    python loadtests/bench_tracing.py --runs 5 --requests 800

Figures per request: CPU of the event-loop thread (``time.thread_time``),
CPU of the whole process (``time.process_time``: the batch exporter's
thread too, its last batch flushed inside the measurement), and the
latency p50 at the client. Off and on run the same client, so the client's
own CPU (httpx) is in both.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.settings import TelemetrySettings  # noqa: E402
from gateway.telemetry.setup import build_tracing  # noqa: E402
from gateway.telemetry.spans import Tracing  # noqa: E402
from gateway.testing.inprocess import in_process_gateway  # noqa: E402

CONFIG = """
[backends.a]
type = "fake"

[models.m]
deployments = [{ backend = "a" }]
"""
BODY = {
    "model": "m",
    "messages": [{"role": "user", "content": "Hello"}],
    "temperature": 0.5,
    "top_p": 0.9,
    "max_tokens": 20,
    "seed": 7,
}
WARM_UP = 100


@dataclass
class Figures:
    loop_cpu_ms: float
    process_cpu_ms: float
    p50_ms: float


async def measure(stream: bool, requests: int, endpoint: str | None) -> Figures:
    tracing: Tracing | None = None
    provider = None
    if endpoint is not None:
        built = build_tracing(TelemetrySettings(endpoint=endpoint, sampler="always_on"), env={})
        assert built is not None
        tracing, provider = built
    body = {**BODY, "stream": stream}
    async with in_process_gateway(CONFIG, tracing=tracing) as gw:
        for _ in range(WARM_UP):
            (await gw.http.post("/v1/chat/completions", json=body)).raise_for_status()
        if provider is not None:
            provider.force_flush()
        gc.collect()
        latencies = []
        thread0, process0 = time.thread_time(), time.process_time()
        for _ in range(requests):
            t0 = time.perf_counter()
            response = await gw.http.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            latencies.append(time.perf_counter() - t0)
        thread1 = time.thread_time()
        if provider is not None:
            provider.force_flush()
        process1 = time.process_time()
    if provider is not None:
        provider.shutdown()
    return Figures(
        (thread1 - thread0) / requests * 1000,
        (process1 - process0) / requests * 1000,
        statistics.median(latencies) * 1000,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--only", choices=["json", "stream"], default=None)
    # "on" alone: for a profiler (py-spy record -- python loadtests/bench_tracing.py --modes on).
    parser.add_argument("--modes", nargs="+", choices=["off", "on"], default=["off", "on"])
    args = parser.parse_args()
    # The client's own log line per request is not the gateway's cost.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    receiver = subprocess.Popen(
        [sys.executable, "-m", "tests.otlp_receiver", "/dev/null"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None
        ports = dict(item.split("=") for item in receiver.stdout.readline().split())
        endpoint = f"http://127.0.0.1:{ports['http']}"
        kinds = [args.only] if args.only else ["json", "stream"]
        for kind in kinds:
            results: dict[str, list[Figures]] = {"off": [], "on": []}
            for _ in range(args.runs):
                for mode in args.modes:
                    figures = asyncio.run(
                        measure(kind == "stream", args.requests, endpoint if mode == "on" else None)
                    )
                    results[mode].append(figures)
            best = {
                mode: Figures(
                    min(f.loop_cpu_ms for f in runs),
                    min(f.process_cpu_ms for f in runs),
                    min(f.p50_ms for f in runs),
                )
                for mode, runs in results.items()
            }
            if len(best) < 2:
                print(kind, best, flush=True)
                continue
            off, on = best["off"], best["on"]
            print(
                f"{kind}: loop CPU {off.loop_cpu_ms:.3f} -> {on.loop_cpu_ms:.3f} ms "
                f"({on.loop_cpu_ms / off.loop_cpu_ms:.2f}x); process CPU "
                f"{off.process_cpu_ms:.3f} -> {on.process_cpu_ms:.3f} ms "
                f"({on.process_cpu_ms / off.process_cpu_ms:.2f}x); p50 {off.p50_ms:.3f} -> "
                f"{on.p50_ms:.3f} ms (+{on.p50_ms - off.p50_ms:.3f})",
                flush=True,
            )
    finally:
        receiver.terminate()
        receiver.wait()


if __name__ == "__main__":
    main()
