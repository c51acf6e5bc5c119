"""The request metrics' own recording (plain Python, exposed through
prometheus-client's metric families) writes exactly what the library's
``Histogram`` and ``Counter`` would for the same observations; and with
metrics and the access log off, requests are not observed at all."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway.exchange import Exchange
from gateway.metrics import NoMetrics, PrometheusMetrics
from gateway.observer import Observer, Unobserved, observing
from gateway.telemetry.semconv import HOOK_BUCKETS

HOOK = "nomoat_hook_duration_seconds"
RETRIES = "nomoat_retries_total"


def _family(text: str, name: str) -> list[str]:
    """The lines of one metric family in an exposition, ``_created`` left out."""
    return [
        line
        for line in text.splitlines()
        if re.match(rf"(# (HELP|TYPE) )?{name}(_bucket|_count|_sum)?[{{ ]", line)
    ]


def test_histograms_and_counters_read_as_prometheus_clients_own() -> None:
    # On a bound, between bounds, below the first, above the last, twice in one bucket.
    seconds = [HOOK_BUCKETS[0], 0.0003, 0.00001, 10.0, 0.0003, HOOK_BUCKETS[3]]
    ours = PrometheusMetrics({})
    registry = CollectorRegistry()
    theirs = Histogram(
        HOOK,
        "Time spent in each hook, by stage (request, response, error).",
        ("hook", "stage"),
        registry=registry,
        buckets=HOOK_BUCKETS,
    )
    retries = Counter(
        RETRIES,
        "Further rounds over a model's deployments after all of them failed.",
        ("model",),
        registry=registry,
    )
    for value in seconds:
        ours.hook_timed("guard", "request", value)
        theirs.labels("guard", "request").observe(value)
    ours.hook_timed("guard", "response", 0.002)
    theirs.labels("guard", "response").observe(0.002)
    for model in ("m", "m", "n"):
        ours.retried(model)
        retries.labels(model).inc()
    written = ours.render(CollectorRegistry()).decode()
    expected = generate_latest(registry).decode()
    assert _family(written, HOOK) == _family(expected, HOOK)
    assert _family(written, RETRIES) == _family(expected, RETRIES)
    assert 'le="0.0001",stage="request"} 2.0' in "\n".join(_family(written, HOOK))


async def _chunks() -> AsyncIterator[int]:
    yield 1


def test_with_nothing_listening_requests_are_not_observed() -> None:
    observer = observing(NoMetrics(), None, listening=False)
    assert isinstance(observer, Unobserved)
    first = observer.open("chat", "/v1/chat/completions")
    assert observer.open("chat", "/v1/chat/completions") is first
    observer.close(first, 200, None)
    assert not first.closed
    chunks = _chunks()
    assert observer.watching(chunks, first) is chunks


def test_with_metrics_on_each_request_has_its_exchange() -> None:
    metrics = PrometheusMetrics({})
    observer = observing(metrics, None, listening=True)
    assert type(observer) is Observer
    first = observer.open("chat", "/v1/chat/completions")
    second = observer.open("chat", "/v1/chat/completions")
    assert isinstance(first, Exchange) and first is not second
    assert metrics.in_flight == 2
    observer.close(first, 200, None)
    assert first.closed and metrics.in_flight == 1
