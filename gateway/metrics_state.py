"""What the server holds, read at scrape time: the engines' own load signals,
hook failures, whether each deployment is up, in flight or cooling down, and
per-adapter usage and loads. Built fresh for each scrape (``prometheus-client``
families, rendered with the request metrics by
:meth:`gateway.metrics.PrometheusMetrics.render`)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from gateway.contract import AdapterCounters, Backend, BusyClock, ReportsLoad
from gateway.lora.stats import AdapterUsage
from gateway.stats import serves_adapters


@dataclass(frozen=True, slots=True)
class DeploymentState:
    up: bool
    in_flight: int = 0
    cooling_down: bool = False
    # Its models.*.deployments[].max_concurrency (None: no limit).
    max_concurrency: int | None = None


@dataclass(frozen=True)
class ServerState:
    """A scrape's view of the server, collected as ``prometheus-client``
    families. ``deployments`` is keyed by (model, deployment, backend)."""

    backends: Mapping[str, Backend]
    hook_failures: Mapping[str, int] = field(default_factory=dict)
    deployments: Mapping[tuple[str, str, str], DeploymentState] = field(default_factory=dict)
    adapter_usage: Mapping[str, AdapterUsage] = field(default_factory=dict)
    # Self-hosted nodes' busy and idle cost (gateway/accounting/nodes.py).
    costs: Collects | None = None
    capacity: CapacityState | None = None

    def collect(self) -> Iterator[Metric]:
        yield from _engine_families(self.backends)
        yield from _busy_family(self.backends)
        if self.costs is not None:
            yield from self.costs.collect()
        failures = CounterMetricFamily(
            "nomoat_hook_failures_total",
            "Hook calls that raised an unexpected error.",
            None,
            ["hook"],
        )
        for hook, count in sorted(self.hook_failures.items()):
            failures.add_metric([hook], count)
        yield failures
        yield from _deployment_families(self.deployments)
        yield from _adapter_families(self.backends, self.adapter_usage)
        if self.capacity is not None:
            yield from _capacity_families(self.deployments, self.capacity)


class Collects(Protocol):
    def collect(self) -> Iterator[Metric]: ...


def _busy_family(backends: Mapping[str, Backend]) -> Iterator[Metric]:
    busy = CounterMetricFamily(
        "nomoat_engine_busy_seconds",
        "Seconds the engine spent working (the embedded engine: in batch steps), since it started.",
        None,
        ["backend"],
    )
    for name, backend in sorted(backends.items()):
        if isinstance(backend, BusyClock):
            busy.add_metric([name], backend.busy_seconds())
    yield busy


def _engine_families(backends: Mapping[str, Backend]) -> Iterator[Metric]:
    running = GaugeMetricFamily(
        "nomoat_engine_requests_running", "Generations running in the engine.", None, ["backend"]
    )
    waiting = GaugeMetricFamily(
        "nomoat_engine_requests_waiting", "Requests queued for the engine.", None, ["backend"]
    )
    kv_usage = GaugeMetricFamily(
        "nomoat_engine_kv_cache_usage_ratio",
        "Share of the engine's KV cache in use, as the engine reports it.",
        None,
        ["backend"],
    )
    decoded = CounterMetricFamily(
        "nomoat_engine_decoded_tokens_total",
        "Tokens the engine itself reports having evaluated (prompt and generated).",
        None,
        ["backend"],
    )
    for name, backend in sorted(backends.items()):
        if not isinstance(backend, ReportsLoad):
            continue
        load = backend.load()
        running.add_metric([name], load.running)
        waiting.add_metric([name], load.waiting)
        if load.kv_cache_usage is not None:
            kv_usage.add_metric([name], load.kv_cache_usage)
        if load.decoded_tokens_total is not None:
            decoded.add_metric([name], load.decoded_tokens_total)
    yield from (running, waiting, kv_usage, decoded)


def _deployment_families(
    deployments: Mapping[tuple[str, str, str], DeploymentState],
) -> Iterator[Metric]:
    labels = ["model", "deployment", "backend"]
    up = GaugeMetricFamily(
        "nomoat_deployment_up",
        "Whether a deployment's backend can serve (1) or not (0).",
        None,
        labels,
    )
    in_flight = GaugeMetricFamily(
        "nomoat_deployment_in_flight",
        "Attempts started on a deployment and not ended (a stream until its last chunk).",
        None,
        labels,
    )
    cooling = GaugeMetricFamily(
        "nomoat_deployment_cooling_down",
        "Whether a deployment is in cooldown after a failure (1) or not (0).",
        None,
        labels,
    )
    for key, state in sorted(deployments.items()):
        up.add_metric(list(key), int(state.up))
        in_flight.add_metric(list(key), state.in_flight)
        cooling.add_metric(list(key), int(state.cooling_down))
    yield from (up, in_flight, cooling)


def _adapter_families(
    backends: Mapping[str, Backend], usage: Mapping[str, AdapterUsage]
) -> Iterator[Metric]:
    """Per adapter: what clients asked of it, and what each engine did with it."""

    def counter(name: str, help_text: str, labels: list[str]) -> CounterMetricFamily:
        return CounterMetricFamily(name, help_text, None, labels)

    requests = counter(
        "nomoat_adapter_requests_total", "Requests answered with the adapter.", ["adapter"]
    )
    prompt = counter(
        "nomoat_adapter_prompt_tokens_total", "Prompt tokens with the adapter.", ["adapter"]
    )
    completion = counter(
        "nomoat_adapter_completion_tokens_total",
        "Completion tokens generated with the adapter.",
        ["adapter"],
    )
    for adapter, entry in sorted(usage.items()):
        requests.add_metric([adapter], entry.requests)
        prompt.add_metric([adapter], entry.prompt_tokens)
        completion.add_metric([adapter], entry.completion_tokens)
    yield from (requests, prompt, completion)
    on_engine = ["backend", "adapter"]
    loads = counter("nomoat_adapter_loads_total", "Times an engine loaded the adapter.", on_engine)
    evictions = counter(
        "nomoat_adapter_evictions_total", "Times an engine unloaded the adapter.", on_engine
    )
    load_seconds = counter(
        "nomoat_adapter_load_seconds_total", "Seconds engines spent loading the adapter.", on_engine
    )
    loaded = GaugeMetricFamily(
        "nomoat_adapter_loaded", "Whether an engine holds the adapter now.", None, on_engine
    )
    for name, backend in sorted(backends.items()):
        if not serves_adapters(backend):
            continue
        held = backend.adapters_loaded()
        counters = backend.adapter_counters()
        for adapter in sorted(set(counters) | held):
            count = counters.get(adapter, AdapterCounters())
            loads.add_metric([name, adapter], count.loads)
            evictions.add_metric([name, adapter], count.evictions)
            load_seconds.add_metric([name, adapter], count.load_seconds)
            loaded.add_metric([name, adapter], int(adapter in held))
    yield from (loads, evictions, load_seconds, loaded)


@dataclass(frozen=True, slots=True)
class CapacityState:
    """Requests held back by max_concurrency, and which worker of ``nomoat
    serve --workers N`` answered the scrape (each serves its own figures)."""

    waiting: int = 0
    waits: int = 0
    timeouts: int = 0
    worker: int = 0
    workers: int = 1


def _capacity_families(
    deployments: Mapping[tuple[str, str, str], DeploymentState], capacity: CapacityState
) -> Iterator[Metric]:
    limits = GaugeMetricFamily(
        "nomoat_deployment_max_concurrency",
        "A deployment's max_concurrency (only those that have one).",
        None,
        ["model", "deployment", "backend"],
    )
    for key, state in sorted(deployments.items()):
        if state.max_concurrency is not None:
            limits.add_metric(list(key), state.max_concurrency)
    yield limits
    yield GaugeMetricFamily(
        "nomoat_capacity_waiting",
        "Requests waiting for a deployment below its max_concurrency.",
        capacity.waiting,
    )
    yield CounterMetricFamily(
        "nomoat_capacity_waits",
        "Requests that found every deployment at its max_concurrency and waited.",
        capacity.waits,
    )
    yield CounterMetricFamily(
        "nomoat_capacity_timeouts",
        "Requests whose wait for a free slot ran out (503).",
        capacity.timeouts,
    )
    info = GaugeMetricFamily(
        "nomoat_worker_info",
        "The worker that answered (nomoat serve --workers N): every figure here is its own.",
        None,
        ["worker"],
    )
    info.add_metric([str(capacity.worker)], 1)
    yield info
    yield GaugeMetricFamily(
        "nomoat_workers",
        "Worker processes serving this port (nomoat serve --workers N).",
        capacity.workers,
    )
