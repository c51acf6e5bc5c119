"""What tracing costs a request, in process: two copies of the real gateway
(as ``nomoat serve`` builds it) with a fake backend, one with tracing off and
one with tracing on (every request sampled, spans exported over OTLP
http/protobuf to ``tests/otlp_receiver.py`` in its own process), and an httpx
client, all on one event loop. Sequential requests, in batches that
alternate between the two, so both meet the same machine (a shared VM's
speed drifts over seconds).

    python loadtests/bench_tracing.py --runs 5 --requests 800

Figures per request, best of ``--runs`` runs: CPU of the event-loop thread
(``time.thread_time`` around each batch), CPU of the batch exporter's
thread (its own CPU clock) and of the last batch's export (flushed on the
loop's thread at the end of the run) added to it for the whole process,
and the latency p50 at the client. Off and on run the same client, so the
client's own CPU (httpx) is in both.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.settings import TelemetrySettings  # noqa: E402
from gateway.telemetry.setup import build_tracing  # noqa: E402
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


def _exporter_cpu() -> float:
    """CPU seconds of the batch span processor's threads so far."""
    total = 0.0
    for thread in threading.enumerate():
        if thread.name.startswith("OtelBatchSpan") and thread.native_id is not None:
            total += time.clock_gettime(time.pthread_getcpuclockid(thread.ident or 0))
    return total


async def measure(stream: bool, requests: int, endpoint: str, batch: int) -> dict[str, Figures]:
    built = build_tracing(TelemetrySettings(endpoint=endpoint, sampler="always_on"), env={})
    assert built is not None
    tracing, provider = built
    body = {**BODY, "stream": stream}
    loop_cpu = {"off": 0.0, "on": 0.0}
    latencies: dict[str, list[float]] = {"off": [], "on": []}
    async with (
        in_process_gateway(CONFIG) as off,
        in_process_gateway(CONFIG, tracing=tracing) as on,
    ):
        gateways = {"off": off, "on": on}
        for gw in gateways.values():
            for _ in range(WARM_UP):
                (await gw.http.post("/v1/chat/completions", json=body)).raise_for_status()
            gw.backend("a").calls.clear()
        provider.force_flush()
        gc.collect()
        exporter0 = _exporter_cpu()
        for _ in range(requests // batch):
            for mode, gw in gateways.items():
                times = latencies[mode]
                thread0 = time.thread_time()
                for _ in range(batch):
                    t0 = time.perf_counter()
                    response = await gw.http.post("/v1/chat/completions", json=body)
                    response.raise_for_status()
                    times.append(time.perf_counter() - t0)
                loop_cpu[mode] += time.thread_time() - thread0
                # The fake keeps every call (for tests), and with it the
                # request's context and spans: not what a server keeps.
                gw.backend("a").calls.clear()
        # The last spans, exported on this thread (force_flush does not hand
        # them to the exporter's thread).
        flush0 = time.thread_time()
        provider.force_flush()
        exporter = _exporter_cpu() - exporter0 + time.thread_time() - flush0
    provider.shutdown()
    count = requests // batch * batch
    return {
        "off": Figures(
            loop_cpu["off"] / count * 1000,
            loop_cpu["off"] / count * 1000,
            statistics.median(latencies["off"]) * 1000,
        ),
        "on": Figures(
            loop_cpu["on"] / count * 1000,
            (loop_cpu["on"] + exporter) / count * 1000,
            statistics.median(latencies["on"]) * 1000,
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--only", choices=["json", "stream"], default=None)
    parser.add_argument("--batch", type=int, default=50, help="requests in a row to one gateway")
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
                run = asyncio.run(measure(kind == "stream", args.requests, endpoint, args.batch))
                for mode, figures in run.items():
                    results[mode].append(figures)
            best = {
                mode: Figures(
                    min(f.loop_cpu_ms for f in runs),
                    min(f.process_cpu_ms for f in runs),
                    min(f.p50_ms for f in runs),
                )
                for mode, runs in results.items()
            }
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
