"""Request metrics on ``/metrics``, through ``prometheus-client``.

The OpenTelemetry GenAI metrics (semantic conventions as pinned in
:mod:`gateway.telemetry.semconv`; still in development) with their advised bucket
boundaries, named as OpenTelemetry's Prometheus exporter names them (dots to
underscores, the unit as a suffix), beside nomoat's own: requests by model,
deployment and status class, in flight, retries, fallbacks, cooldowns, hook
time. The state the server holds (engine load, deployments up, adapters) is
read at scrape time by :mod:`gateway.metrics_state`.

Labels are bounded by the configuration: the catalog's model names, the
deployments, backends and registered adapters, status classes and the
gateway's own error codes. Nothing a client writes becomes a label.

Why not the OpenTelemetry metrics SDK on the request path: one histogram
observation costs about 11 us through the SDK (its attribute set lookup and
locks), and a request makes six to nine. Nor ``prometheus-client``'s own
``Histogram`` and ``Counter``: about 1.5 us an observation (a lock per
bucket and sum). The observations are counted here in plain Python (0.2 us)
and ``prometheus-client`` writes the exposition from them at scrape time
(docs/benchmarks.md, "Telemetry overhead"). OTLP export, when asked for,
mirrors the same calls into the SDK (:mod:`gateway.metrics_otlp`).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Generic, Protocol, TypeVar

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from gateway import wire
from gateway.contract import Target
from gateway.exchange import Exchange, adapter_label
from gateway.telemetry import semconv as names
from gateway.telemetry.semconv import (
    DURATION_BUCKETS,
    HOOK_BUCKETS,
    SERVER_PROVIDER,
    TOKEN_BUCKETS,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
    prometheus_label,
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


class _Histogram:
    """One label set's histogram: a count per bucket (``le`` the bound; the
    last is +Inf) and the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # The first bound at or above the value: Prometheus' ``le``.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class _Counter:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self) -> None:
        self.value += 1.0


C = TypeVar("C", _Histogram, _Counter)


class _Family(Generic[C]):
    """A metric's children by label values, looked up in a dict.

    Recorded in plain Python rather than ``prometheus-client``'s ``Histogram``
    and ``Counter``: those take a lock per bucket and sum on every
    observation and check the amount, about 1.5 us an observation against
    0.2 us here, six to nine times a request (docs/benchmarks.md). Locks buy
    nothing here: every recording and every scrape run on the event loop.
    The exposition is still the library's (:meth:`collect` yields its metric
    families), so /metrics reads exactly as it did."""

    __slots__ = ("_make", "children", "documentation", "labels", "name")

    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], make: Callable[[], C]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labels = tuple(labels)
        self._make: Callable[[], C] = make
        self.children: dict[tuple[str, ...], C] = {}

    def __call__(self, *values: str) -> C:
        child = self.children.get(values)
        if child is None:
            child = self.children[values] = self._make()
        return child


class _Histograms(_Family[_Histogram]):
    def __init__(
        self, name: str, documentation: str, labels: Sequence[str], buckets: Sequence[float]
    ) -> None:
        bounds = tuple(float(bound) for bound in buckets)
        super().__init__(name, documentation, labels, lambda: _Histogram(bounds))
        # The `le` labels as the library writes them for its own histograms.
        self._le = [*(_go_float(bound) for bound in bounds), "+Inf"]

    def collect(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, child in self.children.items():
            cumulative = list(accumulate(child.counts))
            family.add_metric(list(values), list(zip(self._le, cumulative, strict=True)), child.sum)
        return family


def _go_float(value: float) -> str:
    text: str = floatToGoString(value)  # type: ignore[no-untyped-call]
    return text


class _Counters(_Family[_Counter]):
    def __init__(self, name: str, documentation: str, labels: Sequence[str]) -> None:
        super().__init__(name, documentation, labels, _Counter)

    def collect(self) -> Metric:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labels)
        for values, child in self.children.items():
            family.add_metric(list(values), child.value)
        return family


class _Recorded:
    """The request metrics' families, in the registry (collected in order)."""

    def __init__(self, families: Sequence[_Histograms | _Counters]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        for family in self.families:
            yield family.collect()


@dataclass(frozen=True, slots=True)
class _Answered:
    """Where a successful request is recorded, for one (operation, model,
    deployment, backend, adapter): found with one dict lookup."""

    requests: _Counter
    duration: _Histogram
    first_token: _Histogram
    per_token: _Histogram


@dataclass(frozen=True, slots=True)
class _Called:
    """Where a successful call to an upstream is recorded, likewise."""

    duration: _Histogram
    input_tokens: _Histogram
    output_tokens: _Histogram


class _InFlight:
    """``nomoat_requests_in_flight``, from the recorder's count."""

    def __init__(self, metrics: PrometheusMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            names.PROM_IN_FLIGHT,
            "Requests to the OpenAI endpoints being served now (a stream until its last byte).",
            value=self._metrics.in_flight,
        )


class PrometheusMetrics:
    """The request metrics, in a registry of their own (one per server)."""

    def __init__(self, providers: dict[str, str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Backend name -> gen_ai.provider.name of its type.
        self._providers = providers
        genai = (names.OPERATION_NAME, names.PROVIDER_NAME, names.REQUEST_MODEL)
        client = server = tuple(map(prometheus_label, genai))
        error_type = prometheus_label(names.ERROR_TYPE)
        token_type = prometheus_label(names.TOKEN_TYPE)
        place = ("model", "deployment", "backend")
        self._client_duration = _Histograms(
            names.PROM_CLIENT_OPERATION_DURATION,
            "GenAI operation duration: each call nomoat made to an upstream or engine.",
            (*client, error_type, *place),
            DURATION_BUCKETS,
        )
        self._token_usage = _Histograms(
            names.PROM_CLIENT_TOKEN_USAGE,
            "Number of input and output tokens used, per call to an upstream or engine.",
            (*client, token_type, *place, "adapter"),
            TOKEN_BUCKETS,
        )
        self._server_duration = _Histograms(
            names.PROM_SERVER_REQUEST_DURATION,
            "Generative AI server request duration: arrival to last byte.",
            (*server, error_type, *place),
            DURATION_BUCKETS,
        )
        self._ttft = _Histograms(
            names.PROM_SERVER_TIME_TO_FIRST_TOKEN,
            "Time to generate the first token for successful streamed responses.",
            (*server, *place),
            TTFT_BUCKETS,
        )
        self._tpot = _Histograms(
            names.PROM_SERVER_TIME_PER_OUTPUT_TOKEN,
            "Time per output token after the first, for successful streamed responses.",
            (*server, *place),
            TPOT_BUCKETS,
        )
        self._requests = _Counters(
            names.PROM_REQUESTS,
            "Requests to the OpenAI endpoints, by model, deployment and status class.",
            ("model", "deployment", "backend", "adapter", "status_class"),
        )
        # A plain count read at scrape time.
        self.in_flight = 0
        self._retries = _Counters(
            names.PROM_RETRIES,
            "Further rounds over a model's deployments after all of them failed.",
            ("model",),
        )
        self._fallbacks = _Counters(
            names.PROM_FALLBACKS,
            "Times a model's fallback model was tried (model: the one asked for).",
            ("model", "fallback"),
        )
        self._cooldowns = _Counters(
            names.PROM_COOLDOWNS,
            "Times a deployment was put in cooldown after a failure.",
            place,
        )
        self._hook_time = _Histograms(
            names.PROM_HOOK_DURATION,
            "Time spent in each hook, by stage (request, response, error).",
            ("hook", "stage"),
            HOOK_BUCKETS,
        )
        r = self.registry
        r.register(
            _Recorded(
                (
                    self._client_duration,
                    self._token_usage,
                    self._server_duration,
                    self._ttft,
                    self._tpot,
                    self._requests,
                )
            )
        )
        r.register(_InFlight(self))
        r.register(_Recorded((self._retries, self._fallbacks, self._cooldowns, self._hook_time)))

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
            self._observe(tokens, (*labels, names.TOKEN_INPUT, *place), usage.prompt_tokens)
        self._observe(tokens, (*labels, names.TOKEN_OUTPUT, *place), output)

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
                self._token_usage(*genai, names.TOKEN_INPUT, *place),
                self._token_usage(*genai, names.TOKEN_OUTPUT, *place),
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
    def _observe(children: _Histograms, labels: tuple[str, ...], value: float) -> None:
        children(*labels).observe(value)

    # ---------------------------------------------------------------- reading

    def render(self, state: Collector) -> bytes:
        """The exposition: these metrics, then the server's state."""
        return generate_latest(self.registry) + generate_latest(state)
