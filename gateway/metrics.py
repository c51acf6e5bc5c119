"""Request metrics on ``/metrics``, through ``prometheus-client``.

The OpenTelemetry GenAI metrics (semantic conventions as pinned in
:mod:`gateway.metrics_names`; still in development) with their advised bucket
boundaries, named as OpenTelemetry's Prometheus exporter names them (dots to
underscores, the unit as a suffix), beside nomoat's own: requests by model,
deployment and status class, in flight, retries, fallbacks, cooldowns, hook
time. The state the server holds (engine load, deployments up, adapters) is
read at scrape time by :mod:`gateway.metrics_state`.

Labels are bounded by the configuration: the catalog's model names, the
deployments, backends and registered adapters, status classes and the
gateway's own error codes. Nothing a client writes becomes a label.

Why ``prometheus-client`` and not the OpenTelemetry metrics SDK on the request
path: one histogram observation costs about 1 us in ``prometheus-client``
(cached label children) against about 11 us through the SDK (its attribute
set lookup and locks), and a request makes eight or so
(docs/benchmarks.md). OTLP export, when asked for, mirrors the same calls
into the SDK (:mod:`gateway.metrics_otlp`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from gateway import wire
from gateway.contract import Target
from gateway.exchange import Exchange, adapter_label
from gateway.metrics_names import (
    DURATION_BUCKETS,
    HOOK_BUCKETS,
    SERVER_PROVIDER,
    TOKEN_BUCKETS,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
)


class RequestMetrics(Protocol):
    """What the pipeline, the hooks and the HTTP handler report."""

    def request_started(self) -> None: ...

    def request_ended(self, exchange: Exchange, status: int, error: str | None) -> None: ...

    def attempt_ended(
        self,
        exchange: Exchange,
        target: Target,
        backend: str,
        seconds: float,
        usage: wire.Usage | None,
        error: str | None,
    ) -> None: ...

    def retried(self, model: str) -> None: ...

    def fell_back(self, model: str, fallback: str) -> None: ...

    def cooled_down(self, model: str, deployment: str, backend: str) -> None: ...

    def hook_timed(self, hook: str, stage: str, seconds: float) -> None: ...


class NoMetrics:
    """``[metrics] enabled = false``: nothing recorded, nothing to pay."""

    def request_started(self) -> None:
        return

    def request_ended(self, exchange: Exchange, status: int, error: str | None) -> None:
        return

    def attempt_ended(
        self,
        exchange: Exchange,
        target: Target,
        backend: str,
        seconds: float,
        usage: wire.Usage | None,
        error: str | None,
    ) -> None:
        return

    def retried(self, model: str) -> None:
        return

    def fell_back(self, model: str, fallback: str) -> None:
        return

    def cooled_down(self, model: str, deployment: str, backend: str) -> None:
        return

    def hook_timed(self, hook: str, stage: str, seconds: float) -> None:
        return


M = TypeVar("M", Counter, Histogram)


class _Children(Generic[M]):
    """A metric's children by label values, looked up in a dict: the library's
    own ``labels()`` validates and copies on every call (about 1 us)."""

    __slots__ = ("_cache", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._cache: dict[tuple[str, ...], M] = {}

    def __call__(self, *values: str) -> M:
        child = self._cache.get(values)
        if child is None:
            child = self._cache[values] = self._metric.labels(*values)
        return child


def _histogram(
    registry: CollectorRegistry,
    name: str,
    doc: str,
    labels: Sequence[str],
    buckets: Sequence[float],
) -> Histogram:
    return Histogram(name, doc, labels, registry=registry, buckets=buckets)


@dataclass(frozen=True, slots=True)
class _Answered:
    """Where a successful request is recorded, for one (operation, model,
    deployment, backend, adapter): found with one dict lookup."""

    requests: Counter
    duration: Histogram
    first_token: Histogram
    per_token: Histogram


@dataclass(frozen=True, slots=True)
class _Called:
    """Where a successful call to an upstream is recorded, likewise."""

    duration: Histogram
    input_tokens: Histogram
    output_tokens: Histogram


class _InFlight:
    """``nomoat_requests_in_flight``, from the recorder's count."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "nomoat_requests_in_flight",
            "Requests to the OpenAI endpoints being served now (a stream until its last byte).",
            value=self._metrics.in_flight,
        )


class PrometheusMetrics:
    """The request metrics, in a registry of their own (one per server)."""

    def __init__(self, providers: dict[str, str]) -> None:
        # `_created` series double every counter and histogram and nothing
        # here reads them. The switch is the library's, process-wide.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry(auto_describe=True)
        # Backend name -> gen_ai.provider.name of its type.
        self._providers = providers
        r = self.registry
        client = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")
        place = ("model", "deployment", "backend")
        server = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model")
        self._client_duration = _Children(
            _histogram(
                r,
                "gen_ai_client_operation_duration_seconds",
                "GenAI operation duration: each call nomoat made to an upstream or engine.",
                (*client, "error_type", *place),
                DURATION_BUCKETS,
            )
        )
        self._token_usage = _Children(
            _histogram(
                r,
                "gen_ai_client_token_usage",
                "Number of input and output tokens used, per call to an upstream or engine.",
                (*client, "gen_ai_token_type", *place, "adapter"),
                TOKEN_BUCKETS,
            )
        )
        self._server_duration = _Children(
            _histogram(
                r,
                "gen_ai_server_request_duration_seconds",
                "Generative AI server request duration: arrival to last byte.",
                (*server, "error_type", *place),
                DURATION_BUCKETS,
            )
        )
        self._ttft = _Children(
            _histogram(
                r,
                "gen_ai_server_time_to_first_token_seconds",
                "Time to generate the first token for successful streamed responses.",
                (*server, *place),
                TTFT_BUCKETS,
            )
        )
        self._tpot = _Children(
            _histogram(
                r,
                "gen_ai_server_time_per_output_token_seconds",
                "Time per output token after the first, for successful streamed responses.",
                (*server, *place),
                TPOT_BUCKETS,
            )
        )
        self._requests = _Children(
            Counter(
                "nomoat_requests_total",
                "Requests to the OpenAI endpoints, by model, deployment and status class.",
                ("model", "deployment", "backend", "adapter", "status_class"),
                registry=r,
            )
        )
        # A plain count read at scrape time: a Gauge takes a lock twice a request.
        self.in_flight = 0
        r.register(_InFlight(self))
        self._retries = _Children(
            Counter(
                "nomoat_retries_total",
                "Further rounds over a model's deployments after all of them failed.",
                ("model",),
                registry=r,
            )
        )
        self._fallbacks = _Children(
            Counter(
                "nomoat_fallbacks_total",
                "Times a model's fallback model was tried (model: the one asked for).",
                ("model", "fallback"),
                registry=r,
            )
        )
        self._cooldowns = _Children(
            Counter(
                "nomoat_cooldowns_total",
                "Times a deployment was put in cooldown after a failure.",
                place,
                registry=r,
            )
        )
        self._hook_time = _Children(
            _histogram(
                r,
                "nomoat_hook_duration_seconds",
                "Time spent in each hook, by stage (request, response, error).",
                ("hook", "stage"),
                HOOK_BUCKETS,
            )
        )

        self._answered: dict[tuple[str, ...], _Answered] = {}
        self._called: dict[tuple[str, ...], _Called] = {}

    def provider(self, backend: str) -> str:
        """gen_ai.provider.name of a backend (by its name in the config)."""
        return self._providers.get(backend, "")

    # -------------------------------------------------------------- recording

    def request_started(self) -> None:
        self.in_flight += 1

    def request_ended(self, exchange: Exchange, status: int, error: str | None) -> None:
        now = exchange.seconds()
        self.in_flight -= 1
        if error is None and status == 200:
            self._answered_ok(exchange, now)
            return
        model, deployment, backend = exchange.model, exchange.deployment, exchange.backend
        self._requests(model, deployment, backend, exchange.adapter, f"{status // 100}xx").inc()
        op = exchange.operation
        self._observe(
            self._server_duration,
            (op, SERVER_PROVIDER, model, error or "", model, deployment, backend),
            now,
        )
        first = exchange.time_to_first_token()
        if error is not None or first is None:
            return
        place = (op, SERVER_PROVIDER, model, model, deployment, backend)
        self._observe(self._ttft, place, first)
        tokens = exchange.output_tokens() or 0
        if tokens > 1:
            self._observe(self._tpot, place, (now - first) / (tokens - 1))

    def _answered_ok(self, exchange: Exchange, now: float) -> None:
        """The common case, on children found with one lookup."""
        key = (
            exchange.operation,
            exchange.model,
            exchange.deployment,
            exchange.backend,
            exchange.adapter,
        )
        to = self._answered.get(key)
        if to is None:
            op, model, deployment, backend, adapter = key
            place = (op, SERVER_PROVIDER, model, model, deployment, backend)
            to = self._answered[key] = _Answered(
                self._requests(model, deployment, backend, adapter, "2xx"),
                self._server_duration(op, SERVER_PROVIDER, model, "", model, deployment, backend),
                self._ttft(*place),
                self._tpot(*place),
            )
        to.requests.inc()
        to.duration.observe(now)
        first = exchange.time_to_first_token()
        if first is None:
            return
        to.first_token.observe(first)
        tokens = exchange.output_tokens() or 0
        if tokens > 1:
            to.per_token.observe((now - first) / (tokens - 1))

    def attempt_ended(
        self,
        exchange: Exchange,
        target: Target,
        backend: str,
        seconds: float,
        usage: wire.Usage | None,
        error: str | None,
    ) -> None:
        if error is None and usage is not None:
            self._called_ok(exchange, target, backend, seconds, usage)
            return
        provider = self.provider(backend)
        model, deployment, op = exchange.model, target.deployment, exchange.operation
        engine = target.engine_model
        self._observe(
            self._client_duration,
            (op, provider, engine, error or "", model, deployment, backend),
            seconds,
        )
        output = usage.completion_tokens if usage is not None else exchange.output_tokens()
        if output is None:
            return
        tokens = self._token_usage
        labels = (op, provider, engine)
        place = (model, deployment, backend, adapter_label(target))
        if usage is not None:
            self._observe(tokens, (*labels, "input", *place), usage.prompt_tokens)
        self._observe(tokens, (*labels, "output", *place), output)

    def _called_ok(
        self, exchange: Exchange, target: Target, backend: str, seconds: float, usage: wire.Usage
    ) -> None:
        """The common case, on children found with one lookup."""
        adapter = adapter_label(target)
        model, deployment, engine = exchange.model, target.deployment, target.engine_model
        key = (exchange.operation, model, deployment, backend, engine, adapter)
        to = self._called.get(key)
        if to is None:
            genai = (exchange.operation, self.provider(backend), engine)
            place = (model, deployment, backend, adapter)
            to = self._called[key] = _Called(
                self._client_duration(*genai, "", model, deployment, backend),
                self._token_usage(*genai, "input", *place),
                self._token_usage(*genai, "output", *place),
            )
        to.duration.observe(seconds)
        to.input_tokens.observe(usage.prompt_tokens)
        to.output_tokens.observe(usage.completion_tokens)

    def retried(self, model: str) -> None:
        self._retries(model).inc()

    def fell_back(self, model: str, fallback: str) -> None:
        self._fallbacks(model, fallback).inc()

    def cooled_down(self, model: str, deployment: str, backend: str) -> None:
        self._cooldowns(model, deployment, backend).inc()

    def hook_timed(self, hook: str, stage: str, seconds: float) -> None:
        self._observe(self._hook_time, (hook, stage), seconds)

    @staticmethod
    def _observe(children: _Children[Histogram], labels: tuple[str, ...], value: float) -> None:
        children(*labels).observe(value)

    # ---------------------------------------------------------------- reading

    def render(self, state: Collector) -> bytes:
        """The exposition: these metrics, then the server's state."""
        return generate_latest(self.registry) + generate_latest(state)
