"""What the request metrics and the access log cost one request, in CPU
microseconds, measured in isolation (no server, no other load in the way):
every call a JSON answer and a stream make to them, as the pipeline and the
HTTP handler make them, with ``prometheus-client`` and, for comparison, with
the OpenTelemetry SDK recording the same metrics (the OTLP mirror).

    .venv/bin/python loadtests/bench_telemetry_calls.py [--requests N]

A shared machine's noise swamps a difference of a few percent in the
overhead benchmark (bench_overhead.py); this one isolates the part that is
telemetry's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway import wire
from gateway.access_log import AccessLog
from gateway.contract import Target
from gateway.metrics import NoMetrics, PrometheusMetrics, RequestMetrics
from gateway.observer import Observer

TARGET = Target("fake-model", "fake-model", "fake-model/0")
USAGE = wire.Usage(prompt_tokens=12, completion_tokens=6, total_tokens=18)


def one_request(observer: Observer, recorder: RequestMetrics, stream: bool) -> None:
    """The calls one request makes, in order (gateway/app.py, gateway/pipeline.py)."""
    exchange = observer.open("chat", "/v1/chat/completions")
    exchange.request_id, exchange.key_id = "chatcmpl-0123456789abcdef", "2986b7864d51"
    exchange.requested, exchange.stream = "fake-model", stream
    exchange.model = "fake-model"
    exchange.attempts += 1
    exchange.answered_by(TARGET, "fake-0")
    if stream:
        exchange.first_token_at = exchange.arrived + 0.001
    exchange.usage = USAGE
    recorder.attempt_ended(exchange, TARGET, "fake-0", 0.002, USAGE, None)
    observer.close(exchange, 200, None)


def per_request_us(run: Callable[[], None], requests: int, repeats: int = 5) -> float:
    samples = []
    for _ in range(repeats):
        started = time.process_time()
        for _ in range(requests):
            run()
        samples.append((time.process_time() - started) / requests * 1e6)
    return statistics.median(samples)


async def measure(requests: int) -> dict[str, float]:
    providers = {"fake-0": "vllm"}
    log = AccessLog(Path(os.devnull))
    figures = {}
    setups: dict[str, tuple[RequestMetrics, AccessLog | None]] = {
        "nothing (metrics and access log off)": (NoMetrics(), None),
        "metrics (prometheus-client; the defaults)": (PrometheusMetrics(providers), None),
        "access log": (NoMetrics(), log),
        "metrics and access log": (PrometheusMetrics(providers), log),
    }
    if "--with-otlp" in sys.argv:
        from gateway.metrics_otlp import OtlpMetrics

        os.environ.setdefault("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
        setups["metrics with the OTLP mirror (SDK)"] = (
            OtlpMetrics(PrometheusMetrics(providers), 3600),
            None,
        )
    for name, (recorder, access) in setups.items():
        observer = Observer(recorder, access)
        for stream in (False, True):
            label = f"{name}, {'stream' if stream else 'JSON'}"
            figures[label] = per_request_us(
                lambda o=observer, r=recorder, s=stream: one_request(o, r, s), requests
            )
            log._pending.clear()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--with-otlp", action="store_true", help="also the SDK mirror")
    args = parser.parse_args()
    figures = asyncio.run(measure(args.requests))
    base = {
        kind: figures[f"nothing (metrics and access log off), {kind}"]
        for kind in ("JSON", "stream")
    }
    print("| recording | CPU us per request | added to nothing |")
    print("|---|---|---|")
    for label, value in figures.items():
        kind = label.rsplit(", ", 1)[1]
        print(f"| {label} | {value:.2f} | {value - base[kind]:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
