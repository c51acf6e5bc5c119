"""Optional OTLP export of the request metrics, through the OpenTelemetry SDK.

Switched on by ``[metrics] otlp = true`` or ``OTEL_METRICS_EXPORTER=otlp``;
the standard variables say where and how (``OTEL_EXPORTER_OTLP_METRICS_ENDPOINT``
or ``OTEL_EXPORTER_OTLP_ENDPOINT``, ``..._PROTOCOL`` ``http/protobuf`` (the
default) or ``grpc``, ``..._HEADERS``, ``OTEL_SERVICE_NAME``,
``OTEL_RESOURCE_ATTRIBUTES``); ``OTEL_SDK_DISABLED=true`` wins over both.

Each call is recorded in ``prometheus-client`` first (``/metrics`` stays as
it is) and then in the SDK, whose instruments carry the conventions' names,
units and bucket boundaries. The SDK costs about ten times as much per
observation, which is why it is not on the request path unless asked for.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from gateway import wire
from gateway.contract import Target
from gateway.exchange import Exchange, adapter_label
from gateway.metrics import PrometheusMetrics
from gateway.metrics_names import (
    DURATION_BUCKETS,
    HOOK_BUCKETS,
    SCHEMA_URL,
    SERVER_PROVIDER,
    TOKEN_BUCKETS,
    TPOT_BUCKETS,
    TTFT_BUCKETS,
)
from gateway.settings import MetricsSettings

if TYPE_CHECKING:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricExporter

Attributes = dict[str, str]


def otlp_metrics_wanted(settings: MetricsSettings) -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = os.environ.get("OTEL_METRICS_EXPORTER", "")
    return settings.otlp or "otlp" in [e.strip() for e in exporters.split(",")]


def _exporter() -> MetricExporter:
    protocol = os.environ.get(
        "OTEL_EXPORTER_OTLP_METRICS_PROTOCOL",
        os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcExporter,
        )

        return GrpcExporter()
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter()


def _provider(interval_seconds: float) -> MeterProvider:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource

    buckets = {
        "gen_ai.client.operation.duration": DURATION_BUCKETS,
        "gen_ai.client.token.usage": TOKEN_BUCKETS,
        "gen_ai.server.request.duration": DURATION_BUCKETS,
        "gen_ai.server.time_to_first_token": TTFT_BUCKETS,
        "gen_ai.server.time_per_output_token": TPOT_BUCKETS,
        "nomoat.hook.duration": HOOK_BUCKETS,
    }
    views = [
        View(instrument_name=name, aggregation=ExplicitBucketHistogramAggregation(bounds))
        for name, bounds in buckets.items()
    ]
    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES are read by Resource.create.
    service = os.environ.get("OTEL_SERVICE_NAME") or "nomoat"
    reader = PeriodicExportingMetricReader(
        _exporter(), export_interval_millis=interval_seconds * 1000
    )
    return MeterProvider(
        metric_readers=[reader],
        resource=Resource.create({SERVICE_NAME: service}),
        views=views,
    )


class OtlpMetrics:
    """The request metrics recorded in ``prometheus-client`` and in the SDK."""

    def __init__(self, inner: PrometheusMetrics, interval_seconds: float) -> None:
        self._inner = inner
        self._provider = _provider(interval_seconds)
        meter = self._provider.get_meter("nomoat", schema_url=SCHEMA_URL)
        self._client_duration = meter.create_histogram(
            "gen_ai.client.operation.duration", "s", "GenAI operation duration."
        )
        self._token_usage = meter.create_histogram(
            "gen_ai.client.token.usage", "{token}", "Number of input and output tokens used."
        )
        self._server_duration = meter.create_histogram(
            "gen_ai.server.request.duration", "s", "Generative AI server request duration."
        )
        self._ttft = meter.create_histogram(
            "gen_ai.server.time_to_first_token", "s", "Time to generate first token."
        )
        self._tpot = meter.create_histogram(
            "gen_ai.server.time_per_output_token", "s", "Time per output token after the first."
        )
        self._requests = meter.create_counter("nomoat.requests", "{request}", "Requests.")
        self._in_flight = meter.create_up_down_counter(
            "nomoat.requests.in_flight", "{request}", "Requests being served."
        )
        self._retries = meter.create_counter("nomoat.retries", "{round}", "Retry rounds.")
        self._fallbacks = meter.create_counter("nomoat.fallbacks", "{model}", "Fallbacks tried.")
        self._cooldowns = meter.create_counter("nomoat.cooldowns", "{cooldown}", "Cooldowns.")
        self._hook_time = meter.create_histogram("nomoat.hook.duration", "s", "Time in hooks.")

    def shutdown(self) -> None:
        """Export what is left, then stop."""
        self._provider.shutdown()

    def request_started(self) -> None:
        self._inner.request_started()
        self._in_flight.add(1)

    def request_ended(self, exchange: Exchange, status: int, error: str | None) -> None:
        self._inner.request_ended(exchange, status, error)
        now = exchange.seconds()
        self._in_flight.add(-1)
        place = _place(exchange.model, exchange.deployment, exchange.backend)
        self._requests.add(
            1, {**place, "adapter": exchange.adapter, "status_class": f"{status // 100}xx"}
        )
        server = {**_genai(exchange.operation, SERVER_PROVIDER, exchange.model), **place}
        self._server_duration.record(now, {**server, **_error(error)})
        first = exchange.time_to_first_token()
        if error is not None or first is None:
            return
        self._ttft.record(first, server)
        tokens = exchange.output_tokens() or 0
        if tokens > 1:
            self._tpot.record((now - first) / (tokens - 1), server)

    def attempt_ended(
        self,
        exchange: Exchange,
        target: Target,
        backend: str,
        seconds: float,
        usage: wire.Usage | None,
        error: str | None,
    ) -> None:
        self._inner.attempt_ended(exchange, target, backend, seconds, usage, error)
        provider = self._inner.provider(backend)
        genai = _genai(exchange.operation, provider, target.engine_model)
        place = _place(exchange.model, target.deployment, backend)
        self._client_duration.record(seconds, {**genai, **place, **_error(error)})
        output = usage.completion_tokens if usage is not None else exchange.output_tokens()
        if output is None:
            return
        labels = {**genai, **place, "adapter": adapter_label(target)}
        if usage is not None:
            self._token_usage.record(usage.prompt_tokens, {**labels, "gen_ai.token.type": "input"})
        self._token_usage.record(output, {**labels, "gen_ai.token.type": "output"})

    def retried(self, model: str) -> None:
        self._inner.retried(model)
        self._retries.add(1, {"model": model})

    def fell_back(self, model: str, fallback: str) -> None:
        self._inner.fell_back(model, fallback)
        self._fallbacks.add(1, {"model": model, "fallback": fallback})

    def cooled_down(self, model: str, deployment: str, backend: str) -> None:
        self._inner.cooled_down(model, deployment, backend)
        self._cooldowns.add(1, _place(model, deployment, backend))

    def hook_timed(self, hook: str, stage: str, seconds: float) -> None:
        self._inner.hook_timed(hook, stage, seconds)
        self._hook_time.record(seconds, {"hook": hook, "stage": stage})


def _genai(operation: str, provider: str, model: str) -> Attributes:
    return {
        "gen_ai.operation.name": operation,
        "gen_ai.provider.name": provider,
        "gen_ai.request.model": model,
    }


def _place(model: str, deployment: str, backend: str) -> Attributes:
    return {"model": model, "deployment": deployment, "backend": backend}


def _error(error: str | None) -> Attributes:
    return {} if error is None else {"error.type": error}
